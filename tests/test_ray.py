"""`launch.backend = "ray"`: the loop in Ray Train's TorchTrainer workers, against `accelerate launch`.

Ray starts here as a local cluster of 2 CPUs (no dashboard, its files in a short temporary folder),
shared by this module's tests (a driver in a subprocess joins it through RAY_ADDRESS), and is shut
down after them; then no process of it may be left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import (REPO, assert_same_weights, chat_records, complete_checkpoints, current_step, final_weights,
                     launcher_command, read_metrics, small_job, subprocess_env, wait_for)
from launcher import ConfigError, load_config, run_job
from loop.preemption import EXIT_PREEMPTED

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray Train: pip install 'trainer-engine[ray]'")

# 16 examples, 2 per process per step, 2 processes: 4 steps an epoch, 40 steps over 10 epochs, so that a
# SIGTERM relayed to the workers (a second or two, with Ray's signal check and the workers' poll) arrives
# long before the end even when the steps are fast.
JOB = {"hyperparams.batch_size": 2, "hyperparams.max_steps": 40, "launch.num_processes": 2}
DRIVER_TIMEOUT = 300  # seconds for a driver on a busy 2-core machine; a hang fails the test, not the suite


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for this module's tests (its address); afterwards no process of it may be running."""
    # Ray puts Unix sockets under its temporary folder, and their paths must fit in 107 bytes.
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    context = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=True)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        assert wait_for(lambda: not processes_mentioning(folder), timeout=30), processes_mentioning(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model_dir) -> Path:
    """JOB under `accelerate launch` with as many processes: the output folder every Ray run must match."""
    folder = tmp_path_factory.mktemp("accelerate")
    result = run_job(load_config(small_job(folder, tiny_model_dir, chat_records(16), **JOB)))
    assert result.success, result.error
    return folder / "out"


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the running processes that contain `text` (Ray's own carry its session folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in command:
                found.append(command)
    return found


def assert_trained_like(output: Path, reference: Path) -> None:
    """Every step's loss and the final weights of `output` are those of `reference`."""
    steps = [(r["step"], r["loss"]) for r in read_metrics(output)]
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference)]
    assert [s for s, _ in steps] == [s for s, _ in expected] == list(range(1, JOB["hyperparams.max_steps"] + 1))
    for (step, loss), (_, want) in zip(steps, expected):
        assert abs(loss - want) <= 1e-5 * abs(want), f"step {step}: {loss} != {want}"
    assert_same_weights(final_weights(reference), final_weights(output))


@pytest.mark.slow
def test_ray_workers_train_like_accelerate_launch_with_as_many_processes(tmp_path, tiny_model_dir, local_ray,
                                                                         launched):
    on_ray = load_config(small_job(tmp_path, tiny_model_dir, chat_records(16), **JOB, **{"launch.backend": "ray"}))
    result = run_job(on_ray)
    assert result.success, result.error
    assert result.global_step == JOB["hyperparams.max_steps"] and result.summary["world_size"] == 2
    written = json.loads((on_ray.output_path / "result.json").read_text())
    assert written["success"] and written["summary"]["world_size"] == 2
    assert_trained_like(on_ray.output_path, launched)


@pytest.mark.slow
def test_sigterm_to_the_ray_driver_saves_on_every_worker_and_the_rerun_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                        local_ray, launched):
    job = small_job(tmp_path, tiny_model_dir, chat_records(16), **JOB, **{"launch.backend": "ray"})
    output = tmp_path / "out"
    driver = subprocess.Popen(launcher_command("run", job), cwd=REPO, env=subprocess_env(RAY_ADDRESS=local_ray),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: current_step(output) >= 2 or driver.poll() is not None, timeout=DRIVER_TIMEOUT)
        driver.send_signal(signal.SIGTERM)  # to `python -m launcher run` only, as a scheduler would
        out, _ = driver.communicate(timeout=DRIVER_TIMEOUT)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()

    # The workers heard of it through the driver, saved one checkpoint at the same step, and stopped.
    assert driver.returncode == EXIT_PREEMPTED, out[-3000:]
    result = json.loads((output / "result.json").read_text())
    assert result["error"].startswith("preempted: stopped by SIGTERM to the Ray driver at step "), result["error"]
    assert result["summary"]["world_size"] == 2
    assert json.loads((output / "status.json").read_text())["status"] == "preempted"
    checkpoint = Path(result["last_checkpoint_path"])
    assert checkpoint in [path for _, path in complete_checkpoints(output)]
    stopped_at = json.loads((checkpoint / "progress.json").read_text())["progress"]["step"]
    assert 2 <= stopped_at < JOB["hyperparams.max_steps"]
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    resumed = run_job(load_config(job))  # the rerun, from this process, on the same cluster
    assert resumed.success, resumed.error
    assert resumed.summary["resumed_from"] == str(checkpoint)
    assert_trained_like(output, launched)


def test_ray_backend_with_an_accelerate_config_is_refused(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, **{"launch.backend": "ray",
                                                                 "launch.accelerate_config": "multi_gpu"}))
    with pytest.raises(ConfigError, match="launch.accelerate_config is read by `accelerate launch` only"):
        run_job(config)
    assert not (tmp_path / "out").exists()
