"""`launch.backend = "ray"`: the loop in Ray Train's TorchTrainer workers, against `accelerate launch`.

Ray starts here as a local cluster of 2 CPUs (no dashboard, its files in a short temporary folder)
and is shut down after the test, which then checks that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import assert_same_weights, chat_records, final_weights, read_metrics, small_job, wait_for
from launcher import ConfigError, load_config, run_job

ray = pytest.importorskip("ray", reason="the Ray backend needs Ray Train: pip install 'trainer-engine[ray]'")

# 16 examples, 2 per process per step, 2 processes: 6 steps over 1.5 epochs.
JOB = {"hyperparams.batch_size": 2, "hyperparams.max_steps": 6, "launch.num_processes": 2}


@pytest.fixture
def local_ray():
    """A local Ray cluster for one test; afterwards no process of it may be running."""
    # Ray puts Unix sockets under its temporary folder, and their paths must fit in 107 bytes.
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=folder, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
        assert wait_for(lambda: not processes_mentioning(folder), timeout=30), processes_mentioning(folder)
        shutil.rmtree(folder, ignore_errors=True)


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


@pytest.mark.slow
def test_ray_workers_train_like_accelerate_launch_with_as_many_processes(tmp_path, tiny_model_dir, local_ray):
    records = chat_records(16)
    launched = load_config(small_job(tmp_path / "accelerate", tiny_model_dir, records, **JOB))
    on_ray = load_config(small_job(tmp_path / "ray", tiny_model_dir, records, **JOB, **{"launch.backend": "ray"}))
    reference = run_job(launched)
    assert reference.success, reference.error

    result = run_job(on_ray)
    assert result.success, result.error
    assert result.global_step == 6 and result.summary["world_size"] == 2
    written = json.loads((on_ray.output_path / "result.json").read_text())
    assert written["success"] and written["summary"]["world_size"] == 2
    steps = [(r["step"], r["loss"]) for r in read_metrics(on_ray.output_path)]
    expected = [(r["step"], r["loss"]) for r in read_metrics(launched.output_path)]
    assert [s for s, _ in steps] == [s for s, _ in expected] == list(range(1, 7))
    for (step, loss), (_, want) in zip(steps, expected):
        assert abs(loss - want) <= 1e-5 * abs(want), f"step {step}: {loss} != {want}"
    assert_same_weights(final_weights(launched.output_path), final_weights(on_ray.output_path))


def test_ray_backend_with_an_accelerate_config_is_refused(tmp_path, tiny_model_dir):
    config = load_config(small_job(tmp_path, tiny_model_dir, **{"launch.backend": "ray",
                                                                 "launch.accelerate_config": "multi_gpu"}))
    with pytest.raises(ConfigError, match="launch.accelerate_config is read by `accelerate launch` only"):
        run_job(config)
    assert not (tmp_path / "out").exists()
