"""Failures and signals while training, in process (fast): what is left behind and how a rerun continues.

    pytest tests/reliability/test_failures.py -q

- a learning rate that explodes: exit 1, the result names the non-finite value, the checkpoints saved
  before are intact and load, no `final/`;
- a full disk (`OSError(28)`) during the 2nd checkpoint (or the final save): the run fails with an error
  naming the disk, the 1st checkpoint stays complete, the half-written one never counts as complete,
  and a rerun without the fault resumes from the 1st and ends with the uninterrupted weights;
- SIGUSR1, a stop relayed to a loop running in a thread (as in Ray's workers), and SIGTERM arriving in
  the middle of a checkpoint save: a resumable stop, then an exact rerun;
- Ctrl-C (KeyboardInterrupt): the rerun continues from the newest complete checkpoint, and the output
  folder is not left locked to the interrupted (still living) process.

SIGTERM under one and two processes and a failing rank are covered in tests/test_launch.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXPLODING, complete_checkpoints, read_json_if_present, run_cli, small_job
from launcher.config import load_config
from loop.preemption import relaying_stop_requests
from loop.train import train

DISK_FULL = OSError(28, "No space left on device")
STEPS, SAVE_STEPS = 12, 3


def run_cli_text(args, capsys) -> tuple[int, str]:
    """`run_cli` with stdout and stderr together."""
    code, out, err = run_cli(args, capsys)
    return code, out + err


def resumable_job(folder: Path, model_dir: Path) -> Path:
    return small_job(folder, model_dir, **{"hyperparams.max_steps": STEPS, "hyperparams.save_steps": SAVE_STEPS,
                                           "hyperparams.save_total_limit": 5, "hyperparams.warmup_steps": 2})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> dict[str, torch.Tensor]:
    config = load_config(resumable_job(tmp_path_factory.mktemp("uninterrupted"), tiny_model_dir))
    result = train(config)
    assert result.success, result.error
    return load_file(config.output_path / "final" / "model.safetensors")


def assert_equal_weights(output: Path, reference: dict[str, torch.Tensor]) -> None:
    weights = load_file(output / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    assert not [name for name in reference if not torch.equal(weights[name], reference[name])]


def assert_resumes_exactly(job: Path, output: Path, checkpoint: Path, reference) -> None:
    """A rerun without the fault continues from `checkpoint` and ends with the uninterrupted weights."""
    result = train(load_config(job))
    assert result.success, result.error
    assert result.summary["resumed_from"] == str(checkpoint)
    assert result.global_step == STEPS
    assert_equal_weights(output, reference)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert all((p / "COMPLETE").is_file() for p in (output / "checkpoints").iterdir()), "a partial checkpoint is left"
    assert not (output / ".lock").exists()


# --- a learning rate that explodes -------------------------------------------------------------------

def test_an_exploding_learning_rate_fails_with_exit_1_and_keeps_the_earlier_checkpoints(tmp_path, tiny_model_dir,
                                                                                       capsys):
    from transformers import AutoModelForCausalLM

    # Linear warmup to an exploding peak: step 1 trains at lr 0, so its checkpoint holds the initial weights;
    # the weights then grow until a step meets a non-finite value (about step 9).
    job = small_job(tmp_path, tiny_model_dir, **EXPLODING, **{
        "hyperparams.warmup_steps": 4, "hyperparams.max_steps": 30, "hyperparams.save_steps": 1,
        "hyperparams.save_total_limit": 30})
    output = tmp_path / "out"
    code, text = run_cli_text(["run", job], capsys)
    assert code == 1, text
    assert "non-finite" in text and "Traceback" not in text
    result = read_json_if_present(output / "result.json")
    assert result["success"] is False and "non-finite" in result["error"]
    failed_step = result["global_step"] + 1
    assert f"at step {failed_step}" in result["error"] and "learning_rate" in result["error"]
    status = read_json_if_present(output / "status.json")
    assert status["status"] == "failed" and "non-finite" in status["error_message"]
    assert not (output / "final").exists() and not (output / ".tmp-final").exists()

    checkpoints = complete_checkpoints(output)
    assert [step for step, _ in checkpoints] == list(range(1, failed_step)), "the failed step must not be saved"
    assert result["last_checkpoint_path"] == str(checkpoints[-1][1])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected_keys = set(model.state_dict())
    for step, path in checkpoints:
        for name in ("model.safetensors", "optimizer.bin", "progress.json", "COMPLETE"):
            assert (path / name).is_file(), f"{path} lacks {name}"
        assert json.loads((path / "progress.json").read_text())["progress"]["step"] == step
        optimizer_state = torch.load(path / "optimizer.bin", weights_only=True)
        assert optimizer_state["state"], f"{path}: empty optimizer state"
        weights = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        assert set(weights) | set(missing) == expected_keys
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{path} holds non-finite weights"
    # The first checkpoint (lr 0 so far) still computes a finite loss.
    model.load_state_dict(load_file(checkpoints[0][1] / "model.safetensors"), strict=False)
    ids = torch.arange(1, 33).unsqueeze(0)
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert not (output / ".lock").exists()


# --- a full disk ---------------------------------------------------------------------------------------

def fill_disk_on_second_checkpoint(monkeypatch, where: str) -> list[str]:
    """Make the 2nd step checkpoint hit ENOSPC after writing part of itself; returns the failed paths."""
    import accelerate

    failed: list[str] = []
    if where == "save_state":
        real_save_state = accelerate.Accelerator.save_state
        calls = {"n": 0}

        def save_state(self, output_dir=None, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                # Half a weights file, then the disk is full.
                (Path(output_dir) / "model.safetensors").write_bytes(b"\x00" * 1024)
                failed.append(output_dir)
                raise DISK_FULL
            return real_save_state(self, output_dir, *args, **kwargs)

        monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    else:  # the optimizer file (torch.save), after the weights were written whole
        real_torch_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and f".tmp-step_{2 * SAVE_STEPS:06d}" in str(f):
                Path(f).write_bytes(b"PK\x03\x04" + b"\x00" * 512)  # a torn zip archive
                failed.append(str(f))
                raise DISK_FULL
            return real_torch_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    return failed


@pytest.mark.parametrize("where", ["save_state", "optimizer_file"])
def test_a_full_disk_during_the_second_checkpoint(tmp_path, tiny_model_dir, uninterrupted, monkeypatch, capsys,
                                                   where):
    from loop.checkpoint import complete_checkpoints as product_scan

    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    failed = fill_disk_on_second_checkpoint(monkeypatch, where)
    code, text = run_cli_text(["run", job], capsys)
    assert failed, "the fault was never injected"
    assert code == 1, text
    result = read_json_if_present(output / "result.json")
    assert result["success"] is False
    assert "No space left on device" in result["error"] and "OSError" in result["error"], result["error"]
    assert "No space left on device" in text and "Traceback" not in text.split("error: training failed")[-1]
    assert result["global_step"] == 2 * SAVE_STEPS
    status = read_json_if_present(output / "status.json")
    assert status["status"] == "failed" and "No space left on device" in status["error_message"]
    assert not (output / "final").exists()

    first = output / "checkpoints" / f"step_{SAVE_STEPS:06d}"
    assert [path for _, path in complete_checkpoints(output)] == [first]
    assert [path for path, _ in product_scan(output)] == [first]  # what resume, status and report see
    assert result["last_checkpoint_path"] == str(first)
    assert json.loads((first / "progress.json").read_text())["progress"]["step"] == SAVE_STEPS
    assert not (output / ".lock").exists()

    monkeypatch.undo()  # the disk has room again
    assert_resumes_exactly(job, output, first, uninterrupted)


def test_a_full_disk_during_the_final_save(tmp_path, tiny_model_dir, uninterrupted, monkeypatch, capsys):
    import transformers.modeling_utils as modeling_utils

    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"

    def save_file(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)
        raise DISK_FULL

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
    code, text = run_cli_text(["run", job], capsys)
    assert code == 1, text
    result = read_json_if_present(output / "result.json")
    assert result["success"] is False and "No space left on device" in result["error"]
    assert not (output / "final").exists(), "a half-written final model must not appear as final/"
    last = output / "checkpoints" / f"step_{STEPS:06d}"
    assert complete_checkpoints(output)[-1][1] == last
    monkeypatch.undo()
    result = train(load_config(job))
    assert result.success and result.summary["resumed_from"] == str(last)
    assert_equal_weights(output, uninterrupted)
    assert not (output / ".tmp-final").exists()


# --- signals -------------------------------------------------------------------------------------------

def signal_at_step(step: int, signum: int):
    """A status writer that sends `signum` to this process once the run reports `step`."""
    sent = []

    def write(fields: dict) -> None:
        if not sent and (fields.get("current_step") or 0) >= step and fields.get("status") == "running":
            sent.append(step)
            os.kill(os.getpid(), signum)

    return write


def test_sigusr1_stops_at_a_step_boundary_with_a_checkpoint_and_the_rerun_is_exact(tmp_path, tiny_model_dir,
                                                                                 uninterrupted):
    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    result = train(load_config(job), status_writer=signal_at_step(4, signal.SIGUSR1))
    assert not result.success and result.error.startswith("preempted") and "SIGUSR1" in result.error
    assert result.summary["preempted"] is True
    stopped = Path(result.last_checkpoint_path)
    assert (stopped / "COMPLETE").is_file() and stopped.name == f"step_{result.global_step:06d}"
    assert read_json_if_present(output / "status.json")["status"] == "preempted"
    assert not (output / ".lock").exists()
    assert_resumes_exactly(job, output, stopped, uninterrupted)


def test_a_relayed_stop_stops_a_loop_in_a_thread_like_a_signal_and_the_rerun_is_exact(tmp_path, tiny_model_dir,
                                                                                    uninterrupted):
    """Ray Train runs the loop in a thread, where no signal handler can be installed; its driver takes
    the signal and the workers relay it (`relaying_stop_requests`), which must stop the loop as well."""
    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    reached, relayed, outcome = threading.Event(), threading.Event(), {}

    def write(fields: dict) -> None:  # holds the loop after step 4 until the relay has passed the request on
        if (fields.get("current_step") or 0) >= 4 and fields.get("status") == "running" and not reached.is_set():
            reached.set()
            assert relayed.wait(timeout=30)

    def poll() -> str | None:
        if not reached.is_set():
            return None
        relayed.set()
        return "SIGTERM to the driver"

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with relaying_stop_requests(poll):
        thread = threading.Thread(target=lambda: outcome.update(result=train(load_config(job), status_writer=write)))
        thread.start()
        thread.join(timeout=300)
    result = outcome["result"]
    assert result.error.startswith("preempted: stopped by SIGTERM to the driver at step "), result.error
    assert result.summary["preempted"] is True and 4 <= result.global_step < STEPS
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # none installed from the thread
    stopped = Path(result.last_checkpoint_path)
    assert stopped.name == f"step_{result.global_step:06d}" and (stopped / "COMPLETE").is_file()
    assert read_json_if_present(output / "status.json")["status"] == "preempted"
    assert_resumes_exactly(job, output, stopped, uninterrupted)  # in the main thread: the request is gone


def test_sigterm_inside_a_checkpoint_save_finishes_that_save_and_stops_there(tmp_path, tiny_model_dir,
                                                                            uninterrupted, monkeypatch):
    import accelerate

    real_save_state = accelerate.Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the 1st checkpoint is being written
        return real_save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    result = train(load_config(job))
    assert not result.success and result.error.startswith("preempted") and "SIGTERM" in result.error
    first = output / "checkpoints" / f"step_{SAVE_STEPS:06d}"
    # The stop comes at the next step boundary, which is the step just saved: no second save of it.
    assert result.global_step == SAVE_STEPS and result.last_checkpoint_path == str(first)
    assert calls["n"] == 1
    assert [path for _, path in complete_checkpoints(output)] == [first]
    monkeypatch.undo()
    assert_resumes_exactly(job, output, first, uninterrupted)


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler, even when the test process inherited SIGINT ignored (a background
    job of a non-interactive shell does), so that SIGINT raises KeyboardInterrupt as at a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_leaves_a_resumable_folder(tmp_path, tiny_model_dir, uninterrupted):
    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(job), status_writer=signal_at_step(5, signal.SIGINT))
    newest = complete_checkpoints(output)[-1][1]
    assert newest.name == f"step_{SAVE_STEPS:06d}"
    for name in ("status.json", "result.json"):
        read_json_if_present(output / name)
    # A process killed by Ctrl-C leaves its lock to a dead pid, which the next run takes over; here the
    # interrupted process lives on (a notebook, a script that catches KeyboardInterrupt), so drop its lock
    # the way a dead owner's would be, to test the resume itself. See the next test for the lock.
    (output / ".lock").unlink(missing_ok=True)
    assert_resumes_exactly(job, output, newest, uninterrupted)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_an_interrupted_run_does_not_keep_the_output_folder_locked(tmp_path, tiny_model_dir, capsys):
    """After KeyboardInterrupt the run is over: the same process may run the job again.

    Bug: loop/train.py `train` releases the lock only on return or ConfigError, so a BaseException
    (KeyboardInterrupt, SystemExit) leaves `.lock` naming this live process, and every later run in
    the same process (a notebook after Ctrl-C) is refused: "in use by process <own pid>".
    """
    job = resumable_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(job), status_writer=signal_at_step(2, signal.SIGINT))
    lock = output / ".lock"
    owner = json.loads(lock.read_text()) if lock.exists() else None
    code, text = run_cli_text(["run", job], capsys)
    assert code == 0, f"the rerun was refused (lock left: {owner}, this pid {os.getpid()}):\n{text[-1500:]}"
