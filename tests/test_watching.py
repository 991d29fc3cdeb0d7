"""Watching a run end to end: TensorBoard through Accelerate, sample generations, status while running."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from launcher.report import status_text
from loop.train import train
from test_loop import assert_same_weights, chat_records, final_weights, write_job

REPO = Path(__file__).resolve().parent.parent


def test_tensorboard_event_files_hold_the_loss(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(write_job(tmp_path, tiny_model_dir, validation=4, hyperparams=["max_steps = 4"],
                                   environment=['report_to = ["tensorboard"]']))
    assert train(config).success
    event_files = list(config.output_path.rglob("events.out.tfevents.*"))
    assert event_files
    scalars = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path.parent))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert "train/loss" in scalars and "eval/loss" in scalars


def test_an_unknown_or_missing_tracker_is_refused_before_training(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean `tensorboard`"):
        load_config(write_job(tmp_path, tiny_model_dir, environment=['report_to = ["tensorbord"]']))
    with pytest.raises(ConfigError, match="'aim' tracker is not installed"):
        load_config(write_job(tmp_path, tiny_model_dir, environment=['report_to = ["aim"]']))


def test_a_run_with_previews_ends_with_the_weights_of_one_without(tmp_path, tiny_model_dir):
    hyper = ["batch_size = 2", "max_steps = 6"]
    records = chat_records(16, seed=2)
    plain = load_config(write_job(tmp_path / "plain", tiny_model_dir, records=records, validation=4,
                                  hyperparams=hyper, data=["shuffle = true"]))
    previewed = load_config(write_job(
        tmp_path / "previewed", tiny_model_dir, records=records, validation=4, hyperparams=hyper,
        data=["shuffle = true"],
        monitoring=["preview_steps = 2", "preview_max_new_tokens = 6", 'preview_prompts = ["say hi"]']))
    assert train(plain).success and train(previewed).success
    assert_same_weights(final_weights(plain.output_path), final_weights(previewed.output_path), rel=0.0)
    previews = [json.loads(line) for line in (previewed.output_path / "previews.jsonl").read_text().splitlines()]
    assert [p["step"] for p in previews] == [2, 4, 6]
    assert previews[0]["samples"][0]["prompt"].count("say hi") == 1
    status = json.loads((previewed.output_path / "status.json").read_text())
    assert status["preview"]["step"] == 6


def test_status_of_a_running_job(tmp_path, tiny_model_dir):
    job = write_job(tmp_path, tiny_model_dir, records=chat_records(12), hyperparams=[
        "batch_size = 2", "num_epochs = 60", "save_steps = 5"])
    process = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(job)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        text = ""
        while time.time() < deadline:
            text = status_text(tmp_path / "out") if (tmp_path / "out" / "status.json").exists() else ""
            if "state: running" in text and "last checkpoint: step" in text:
                break
            time.sleep(0.1)
        assert "state: running" in text and "/ 360" in text and "last checkpoint: step" in text, text
    finally:
        process.kill()
        process.wait()
