"""Watching a run end to end: TensorBoard through Accelerate, sample generations, status while running."""

from __future__ import annotations

import json

import pytest

from helpers import assert_same_weights, chat_records, final_weights, read_metrics, small_job
from launcher.config import ConfigError, load_config
from launcher.report import status_text
from loop.train import train


def test_tensorboard_event_files_hold_the_loss(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(small_job(tmp_path, tiny_model_dir, validation_records=chat_records(4, 100),
                                   **{"environment.report_to": ["tensorboard"]}))
    assert train(config).success
    event_files = list(config.output_path.rglob("events.out.tfevents.*"))
    assert event_files
    losses: dict[str, list[tuple[int, float]]] = {}
    for path in event_files:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        for tag in set(accumulator.Tags()["scalars"]) & {"train/loss", "eval/loss"}:
            losses.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    # The values of metrics.jsonl, step for step (TensorBoard keeps float32).
    for tag, key in (("train/loss", "loss"), ("eval/loss", "eval_loss")):
        logged = sorted(losses[tag])
        expected = [(r["step"], r[key]) for r in read_metrics(config.output_path, key)]
        assert [step for step, _ in logged] == [step for step, _ in expected], tag
        assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), tag


def test_an_unknown_or_missing_tracker_is_refused_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean `tensorboard`"):
        load_config(small_job(tmp_path, tiny_model_dir, **{"environment.report_to": ["tensorbord"]}))
    with pytest.raises(ConfigError, match="'aim' tracker is not installed"):
        load_config(small_job(tmp_path, tiny_model_dir, **{"environment.report_to": ["aim"]}))


def test_a_run_with_previews_ends_with_the_weights_of_one_without(tmp_path, tiny_model_dir):
    settings = {"hyperparams.max_steps": 6, "data.shuffle": True}
    plain = load_config(small_job(tmp_path / "plain", tiny_model_dir, chat_records(16),
                                  validation_records=chat_records(4, 100), **settings))
    previewed = load_config(small_job(
        tmp_path / "previewed", tiny_model_dir, chat_records(16), validation_records=chat_records(4, 100), **settings,
        **{"monitoring.preview_steps": 2, "monitoring.preview_max_new_tokens": 6,
           "monitoring.preview_prompts": ["say hi"]}))
    assert train(plain).success and train(previewed).success
    assert_same_weights(final_weights(plain.output_path), final_weights(previewed.output_path), rel=0.0)
    previews = [json.loads(line) for line in (previewed.output_path / "previews.jsonl").read_text().splitlines()]
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert previews[0]["samples"][0]["prompt"].count("say hi") == 1
    status = json.loads((previewed.output_path / "status.json").read_text())
    assert status["preview"]["step"] == 6


def test_status_of_a_running_job(tmp_path, tiny_model_dir):
    """`status` read from the folder while the run goes: the loop's status hook reads it at step 6,
    after the step-5 checkpoint, so nothing waits on a clock."""
    config = load_config(small_job(tmp_path, tiny_model_dir, **{"hyperparams.max_steps": 8,
                                                                "hyperparams.save_steps": 5}))
    seen: dict[int, str] = {}

    def read_status(fields: dict) -> None:
        if fields["status"] == "running" and fields["current_step"] == 6 and 6 not in seen:
            seen[6] = status_text(config.output_path)

    assert train(config, status_writer=read_status).success
    text = seen[6]
    assert "state: running" in text and "step: 6 / 8" in text and "last checkpoint: step 5" in text, text
    assert "state: completed" in status_text(config.output_path)
