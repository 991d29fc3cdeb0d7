"""The training loop on the tiny offline model: exact accumulation, exact resume, the non-finite
guard, checkpoint retention, the final model, status and metrics."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess

import pytest
import torch

from helpers import (EXPLODING, REPO, ROUNDING_SAFE_ADAM, assert_same_weights, chat_records, final_weights,
                     launcher_command, read_metrics, run_launcher, small_job, subprocess_env, wait_for)
from launcher.config import ConfigError, load_config
from loop.checkpoint import COMPLETE_MARKER
from loop.run_dir import MARKER
from loop.train import train

# Epochs rather than small_job's 4 steps, the examples in file order.
BY_EPOCH = {"hyperparams.max_steps": -1, "data.shuffle": False}
SAME_DATA_OTHER_BATCHES = {**BY_EPOCH, **ROUNDING_SAFE_ADAM}


def supervised_tokens(config, first: int | None = None) -> int:
    """Supervised (loss-carrying) tokens of the job's first `first` prepared training rows, counted from
    the rows themselves rather than by the loop."""
    from loop.data import build_datasets, load_tokenizer

    rows = build_datasets(config, load_tokenizer(config)).train
    rows = rows.select(range(first)) if first is not None else rows
    return sum(sum(1 for label in row["labels"][1:] if label != -100) for row in rows)


# --- exact accumulation --------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,accumulation", [(2, 4), (1, 8)])
def test_accumulation_gives_the_weights_of_one_large_batch(tmp_path, tiny_model_dir, batch_size, accumulation):
    records = chat_records(24)
    big = load_config(small_job(tmp_path / "big", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES, **{
        "hyperparams.batch_size": 8, "hyperparams.gradient_accumulation": 1, "hyperparams.num_epochs": 2}))
    small = load_config(small_job(tmp_path / "small", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES, **{
        "hyperparams.batch_size": batch_size, "hyperparams.gradient_accumulation": accumulation,
        "hyperparams.num_epochs": 2}))
    result_big, result_small = train(big), train(small)
    assert result_big.success and result_small.success
    assert result_big.global_step == result_small.global_step == 6
    assert result_big.summary["num_train_tokens"] == result_small.summary["num_train_tokens"]
    assert_same_weights(final_weights(big.output_path), final_weights(small.output_path))


def test_a_partial_last_window_is_normalised_by_its_own_tokens(tmp_path, tiny_model_dir):
    # 10 examples: batch 1 x 4 makes windows of 4, 4 and 2 micro-batches; batch 2 x 2 groups the same examples.
    records = chat_records(10)
    a = load_config(small_job(tmp_path / "a", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES, **{
        "hyperparams.batch_size": 1, "hyperparams.gradient_accumulation": 4}))
    b = load_config(small_job(tmp_path / "b", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES, **{
        "hyperparams.batch_size": 2, "hyperparams.gradient_accumulation": 2}))
    assert train(a).global_step == train(b).global_step == 3
    assert_same_weights(final_weights(a.output_path), final_weights(b.output_path))


def test_unnormalised_accumulation_would_differ(tmp_path, tiny_model_dir):
    """Guards the test above: different groupings of the same data do change the weights."""
    records = chat_records(24)
    a = load_config(small_job(tmp_path / "a", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES,
                              **{"hyperparams.batch_size": 8}))
    b = load_config(small_job(tmp_path / "b", tiny_model_dir, records, **SAME_DATA_OTHER_BATCHES,
                              **{"hyperparams.batch_size": 4}))
    train(a), train(b)
    with pytest.raises(AssertionError):
        assert_same_weights(final_weights(a.output_path), final_weights(b.output_path))


# --- checkpoints and exact resume ----------------------------------------------------------------

def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    settings = {"hyperparams.batch_size": 3, "hyperparams.gradient_accumulation": 2, "hyperparams.num_epochs": 3,
                "hyperparams.max_steps": -1, "hyperparams.save_steps": 3, "hyperparams.save_total_limit": 10,
                "data.shuffle": True}
    whole = load_config(small_job(tmp_path / "whole", tiny_model_dir, chat_records(24), **settings))
    assert train(whole).global_step == 12
    parted = load_config(small_job(tmp_path / "parted", tiny_model_dir, chat_records(24), **settings))
    first = train(parted)
    # Pretend the run died right after step 3 (mid-epoch): keep only that checkpoint.
    checkpoints = parted.output_path / "checkpoints"
    for path in sorted(checkpoints.iterdir())[1:]:
        shutil.rmtree(path)
    (parted.output_path / "final" / "model.safetensors").unlink()
    (parted.output_path / "result.json").unlink()
    resumed = train(parted)
    assert first.success and resumed.success
    assert resumed.summary["resumed_from"].endswith("step_000003")
    assert resumed.global_step == 12
    assert_same_weights(final_weights(whole.output_path), final_weights(parted.output_path), rel=0.0)
    # The records of the redone steps are not duplicated.
    assert [r["step"] for r in read_metrics(parted.output_path)] == list(range(1, 13))


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    settings = {**BY_EPOCH, "hyperparams.num_epochs": 40, "hyperparams.save_steps": 5,
                "hyperparams.save_total_limit": 2}
    whole = load_config(small_job(tmp_path / "whole", tiny_model_dir, **settings))
    job = small_job(tmp_path / "killed", tiny_model_dir, **settings)
    output = tmp_path / "killed" / "out"
    process = subprocess.Popen(launcher_command("run", job), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: any((output / "checkpoints").glob(f"step_*/{COMPLETE_MARKER}")), timeout=120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (output / "final").exists(), "the run finished before it could be killed"
    rerun = run_launcher("run", job)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads((output / "result.json").read_text())
    assert result["success"] and result["summary"]["resumed_from"]
    train(whole)
    assert_same_weights(final_weights(whole.output_path), final_weights(output), rel=0.0)


def test_retention_keeps_the_newest_complete_checkpoints_and_clears_leftovers(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, **{
        "hyperparams.save_steps": 2, "hyperparams.save_total_limit": 2, "hyperparams.max_steps": 10}))
    checkpoints = config.output_path / "checkpoints"
    (checkpoints / ".tmp-step_000004").mkdir(parents=True)   # a save that was killed
    (config.output_path / MARKER).write_text('{"run_id": "killed-run"}')  # by a run of ours
    (checkpoints / "step_000099").mkdir()                    # renamed but never marked complete
    (checkpoints / "notes").mkdir()                          # not ours: left alone
    result = train(config)
    assert result.success
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes", "step_000008", "step_000010"]
    assert result.last_checkpoint_path == str(checkpoints / "step_000010")
    progress = json.loads((checkpoints / "step_000010" / "progress.json").read_text())
    assert progress["progress"]["step"] == 10
    assert (checkpoints / "step_000010" / COMPLETE_MARKER).exists()


def test_a_fresh_run_refuses_to_replace_an_earlier_runs_checkpoints(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.save_steps": 2, "hyperparams.max_steps": 2})
    assert train(load_config(job)).success
    with pytest.raises(ConfigError, match="output.overwrite"):
        train(load_config(job, overrides={"output.resume": "never"}))
    assert train(load_config(job, overrides={"output.resume": "never", "output.overwrite": True})).success


def test_resuming_with_another_batch_size_is_refused(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.save_steps": 2, "hyperparams.max_steps": 2,
                                                "hyperparams.batch_size": 2})
    assert train(load_config(job)).success
    with pytest.raises(ConfigError, match="batch_size: checkpoint 2, now 1"):
        train(load_config(job, overrides={"hyperparams.batch_size": 1, "hyperparams.max_steps": 4}))


# --- failures ------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, **EXPLODING, **{
        "hyperparams.save_steps": 1, "hyperparams.max_steps": 30, "hyperparams.warmup_steps": 0}))
    result = train(config)
    assert not result.success
    assert "non-finite" in result.error
    failed_step = result.global_step + 1
    assert f"at step {failed_step}" in result.error
    status = json.loads((config.output_path / "status.json").read_text())
    assert status["status"] == "failed" and "non-finite" in status["error_message"]
    saved = json.loads((config.output_path / "result.json").read_text())
    assert saved["success"] is False and saved["global_step"] == result.global_step
    assert result.last_checkpoint_path.endswith(f"step_{result.global_step:06d}")
    assert not (config.output_path / "final").exists()


# --- what a run leaves behind --------------------------------------------------------------------

def test_final_model_loads_and_generates_and_the_run_reports(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(small_job(tmp_path, tiny_model_dir, chat_records(24), validation_records=chat_records(6, 100),
                                   **BY_EPOCH, **{"hyperparams.batch_size": 4, "hyperparams.num_epochs": 2,
                                                  "hyperparams.eval_steps": 3, "environment.logging_steps": 2}))
    result = train(config)
    assert result.success, result.error
    final = config.output_path / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert model.config.use_cache

    status = json.loads((config.output_path / "status.json").read_text())
    assert status["status"] == "completed" and status["current_step"] == status["total_steps"] == 12
    for key in ("epoch", "loss", "learning_rate", "tokens_per_sec", "eta_sec", "validation_loss", "timestamp",
                "error_message"):
        assert key in status
    train_records = read_metrics(config.output_path)
    eval_records = read_metrics(config.output_path, "eval_loss")
    assert [r["step"] for r in train_records] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in eval_records] == [3, 6, 9, 12]
    for key in ("epoch", "learning_rate", "grad_norm", "num_tokens", "tokens_per_sec", "elapsed_sec"):
        assert key in train_records[0]
    assert train_records[-1]["epoch"] == pytest.approx(2.0)
    summary = result.summary
    assert summary["eval_loss"] == pytest.approx(eval_records[-1]["eval_loss"])
    assert summary["train_loss"] == pytest.approx(train_records[-1]["loss"])
    # Two epochs: every supervised token of the prepared data, twice.
    assert summary["num_train_tokens"] == train_records[-1]["num_tokens"] == 2 * supervised_tokens(config)
    assert summary["world_size"] == 1
    assert load_config(config.output_path / "job.toml") == config


def test_validation_loss_is_token_weighted(tmp_path, tiny_model_dir):
    """The eval loss equals sum(token losses) / tokens over the whole validation set, batch size aside."""
    config = load_config(small_job(tmp_path, tiny_model_dir, validation_records=chat_records(5, 100),
                                   **{"hyperparams.batch_size": 2, "hyperparams.max_steps": 1}))
    from transformers import AutoModelForCausalLM

    from loop.data import build_dataloader, build_datasets, load_tokenizer
    from loop.train import build_accelerator, evaluate, summed_token_loss

    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    accelerator = build_accelerator(config)
    loader = accelerator.prepare(build_dataloader(data.validation, config, tokenizer, shuffle=False, batch_size=2))
    loss = evaluate(model, loader, accelerator)
    one_by_one = build_dataloader(data.validation, config, tokenizer, shuffle=False, batch_size=1)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in one_by_one:
            row_loss, row_tokens = summed_token_loss(model, batch)
            total, tokens = total + float(row_loss.sum()), tokens + int(row_tokens.sum())
    assert loss == pytest.approx(total / tokens, rel=1e-6)
    assert model.training  # evaluate puts the model back in training mode


@pytest.mark.parametrize("profile,data_file", [("chat", "chat.jsonl"), ("alpaca", "alpaca.jsonl"),
                                               ("sharegpt", "sharegpt.jsonl"), ("completion", "completion.jsonl"),
                                               ("text", "text.jsonl")])
def test_each_profile_trains_its_example_format(tmp_path, tiny_model_dir, profile, data_file):
    records = [json.loads(line) for line in (REPO / "examples" / "data" / data_file).read_text().splitlines()]
    config = load_config(small_job(tmp_path, tiny_model_dir, records[:12], **{
        "profile.name": profile, "hyperparams.batch_size": 4, "hyperparams.max_steps": 2, "data.shuffle": False}))
    result = train(config)
    assert result.success, result.error
    # Two steps of 4 examples in file order: the supervised tokens of the first 8 prepared rows.
    assert result.summary["num_train_tokens"] == supervised_tokens(config, first=8)
    # Step 1 is measured before any update: a random model's token-mean loss is about ln(vocabulary).
    vocabulary = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert read_metrics(config.output_path)[0]["loss"] == pytest.approx(math.log(vocabulary), rel=0.05)


def test_retention_left_undone_by_a_kill_is_applied_when_the_run_restarts(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.save_steps": 2, "hyperparams.save_total_limit": 2,
                                                "hyperparams.max_steps": 6})
    config = load_config(job)
    assert train(config).success
    checkpoints = config.output_path / "checkpoints"
    # A kill after a save's rename but before its clean-up leaves one complete checkpoint too many.
    shutil.copytree(checkpoints / "step_000004", checkpoints / "step_000002")
    progress = checkpoints / "step_000002" / "progress.json"
    record = json.loads(progress.read_text())
    record["progress"]["step"] = 2
    progress.write_text(json.dumps(record))
    (config.output_path / "result.json").unlink()  # the kill came before the run finished
    assert train(config).success  # resumes at step 6: nothing left to train, nothing new saved
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000006"]


def test_summed_token_loss_matches_the_models_own_mean_loss(tmp_path, tiny_model_dir):
    """Per-row sums over supervised tokens, divided by their count, give transformers' mean loss."""
    config = load_config(small_job(tmp_path, tiny_model_dir, **{"hyperparams.batch_size": 4}))
    from transformers import AutoModelForCausalLM

    from loop.data import build_dataloader, build_datasets, load_tokenizer
    from loop.train import summed_token_loss

    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = next(iter(build_dataloader(data.train, config, tokenizer, shuffle=False, batch_size=4)))
    with torch.no_grad():
        row_losses, row_tokens = summed_token_loss(model, batch)
        expected = model(**batch).loss
    assert row_losses.shape == row_tokens.shape == (4,)
    assert (row_tokens == (batch["labels"][:, 1:] != -100).sum(dim=1)).all()
    assert float(row_losses.sum() / row_tokens.sum()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("schedule,transformers_name", [("cosine", "cosine"), ("linear", "linear"),
                                                        ("constant", "constant_with_warmup")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_transformers(tmp_path, tiny_model_dir, schedule, transformers_name, warmup):
    from transformers import get_scheduler

    from loop.train import build_scheduler

    config = load_config(small_job(tmp_path, tiny_model_dir, **{"hyperparams.lr_scheduler": schedule,
                                                                 "hyperparams.warmup_steps": warmup}))
    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5) for _ in range(2))
    ours_schedule = build_scheduler(ours, config, total_steps=10)
    theirs_schedule = get_scheduler(transformers_name, theirs, num_warmup_steps=warmup, num_training_steps=10)
    for _ in range(12):  # past the end too
        assert ours_schedule.get_last_lr()[0] == pytest.approx(theirs_schedule.get_last_lr()[0], abs=1e-12)
        ours.step(), theirs.step(), ours_schedule.step(), theirs_schedule.step()


def test_train_log_holds_only_its_own_run(tmp_path, tiny_model_dir):
    """Two runs in one process: the first run's train.log is closed when it ends."""
    first = load_config(small_job(tmp_path / "a", tiny_model_dir, **{"hyperparams.max_steps": 1}))
    second = load_config(small_job(tmp_path / "b", tiny_model_dir, **{"hyperparams.max_steps": 2}))
    assert train(first).success and train(second).success
    first_log = (first.output_path / "train.log").read_text()
    second_log = (second.output_path / "train.log").read_text()
    assert first_log.count("step 1  loss") == 1 and "step 2  loss" not in first_log
    assert second_log.count("step 1  loss") == 1 and "step 2  loss" in second_log
