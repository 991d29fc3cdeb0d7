"""Several processes on one CPU machine (gloo), DeepSpeed ZeRO-2/3, preemption and failing ranks.

These start real `accelerate launch` / torchrun process groups, so each test takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (REPO, ROUNDING_SAFE_ADAM, assert_same_weights, chat_records, final_weights, launcher_command,
                     process_tree, run_launcher, small_job, subprocess_env, wait_for)
from launcher import load_config, run_job
from loop.checkpoint import COMPLETE_MARKER
from loop.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

# Epochs of the examples in file order, batched differently by one process and by two.
BY_EPOCH = {"hyperparams.max_steps": -1, "data.shuffle": False, **ROUNDING_SAFE_ADAM}


def job(folder: Path, model_dir: Path, records: list, **dotted) -> Path:
    return small_job(folder, model_dir, records, **BY_EPOCH, **dotted)


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, tiny_model_dir) -> Path:
    """One process, batch 8, 2 epochs over 32 examples in file order: the weights to match."""
    folder = tmp_path_factory.mktemp("reference")
    config = load_config(job(folder, tiny_model_dir, chat_records(32), **{"hyperparams.batch_size": 8,
                                                                          "hyperparams.num_epochs": 2}))
    assert run_job(config).success
    return config.output_path


def common_weights(a: dict, b: dict) -> tuple[dict, dict]:
    """DeepSpeed may or may not write the tied lm_head copy; compare the tensors both have."""
    shared = a.keys() & b.keys()
    assert "model.embed_tokens.weight" in shared
    return {k: a[k] for k in shared}, {k: b[k] for k in shared}


def test_two_processes_give_the_weights_of_one_with_twice_the_batch(tmp_path, tiny_model_dir, one_process_reference):
    config = load_config(job(tmp_path, tiny_model_dir, chat_records(32), **{
        "hyperparams.batch_size": 4, "hyperparams.num_epochs": 2, "launch.num_processes": 2}))
    result = run_job(config)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    assert result.global_step == 8
    assert json.loads((config.output_path / "result.json").read_text())["summary"]["world_size"] == 2
    assert_same_weights(final_weights(one_process_reference), final_weights(config.output_path))


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_trains_checkpoints_and_resumes_exactly(tmp_path, tiny_model_dir, one_process_reference, stage):
    config = load_config(job(tmp_path, tiny_model_dir, chat_records(32), **{
        "hyperparams.batch_size": 4, "hyperparams.num_epochs": 2, "hyperparams.save_steps": 4,
        "hyperparams.save_total_limit": 5, "launch.num_processes": 2, "launch.accelerate_config": stage}))
    result = run_job(config)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    first = final_weights(config.output_path)
    assert_same_weights(*common_weights(final_weights(one_process_reference), first), rel=1e-4)

    checkpoints = config.output_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000004", "step_000008"]
    shutil.rmtree(checkpoints / "step_000008")
    shutil.rmtree(config.output_path / "final")
    resumed = run_job(config)
    assert resumed.success, resumed.error
    assert resumed.summary["resumed_from"].endswith("step_000004")
    assert_same_weights(first, final_weights(config.output_path), rel=0.0)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir,
                                                                                num_processes):
    settings = {"hyperparams.num_epochs": 30, "hyperparams.save_steps": 1000, "hyperparams.save_total_limit": 2,
                "launch.num_processes": num_processes}
    whole = load_config(job(tmp_path / "whole", tiny_model_dir, chat_records(12), **settings))
    stopped = job(tmp_path / "stopped", tiny_model_dir, chat_records(12), **settings)
    output = tmp_path / "stopped" / "out"
    process = subprocess.Popen(launcher_command("run", stopped), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: _has_trained(output), timeout=120, interval=0.05), "no step 3 within 2 minutes"
    finally:
        process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, out[-3000:]
    result = json.loads((output / "result.json").read_text())
    assert result["success"] is False and result["error"].startswith("preempted")
    checkpoint = Path(result["last_checkpoint_path"])
    assert (checkpoint / COMPLETE_MARKER).exists()
    assert json.loads((output / "status.json").read_text())["status"] == "preempted"

    rerun = run_launcher("run", stopped)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((output / "result.json").read_text())
    assert resumed["success"] and resumed["summary"]["resumed_from"] == str(checkpoint)
    assert run_job(whole).success
    assert_same_weights(final_weights(whole.output_path), final_weights(output), rel=0.0)


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_the_result_names_that_rank(tmp_path, tiny_model_dir):
    # A scheduler may signal one process only. The other rank hears of it in the step's all-reduce;
    # both save at the same step, and result.json (the main process's alone) says where the signal went.
    stopped = job(tmp_path, tiny_model_dir, chat_records(12), **{"hyperparams.num_epochs": 30,
                                                                 "hyperparams.save_steps": 1000,
                                                                 "launch.num_processes": 2})
    output = tmp_path / "out"
    process = subprocess.Popen(launcher_command("run", stopped), cwd=REPO, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: _has_trained(output), timeout=120, interval=0.05), "no step 3 within 2 minutes"
        os.kill(_descendant_with_rank(process.pid, 1), signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == EXIT_PREEMPTED, out[-3000:]
    result = json.loads((output / "result.json").read_text())
    assert result["error"].startswith("preempted: stopped by SIGTERM on rank 1 at step "), result["error"]
    checkpoint = Path(result["last_checkpoint_path"])
    assert (checkpoint / COMPLETE_MARKER).exists()
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((output / "status.json").read_text())["status"] == "preempted"


def _descendant_with_rank(ancestor: int, rank: int) -> int:
    """The pid of the process under `ancestor` whose environment has RANK=`rank` (a launched worker)."""
    for pid in process_tree(ancestor)[1:]:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it just ended
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no process with RANK={rank} under {ancestor}")


def _has_trained(output: Path) -> bool:
    status = output / "status.json"
    try:
        return json.loads(status.read_text()).get("current_step", 0) >= 3
    except (OSError, ValueError):
        return False


def test_a_rank_that_raises_brings_the_job_down_with_its_name(tmp_path, tiny_model_dir):
    # Rank 0 fails at its first optimizer step; rank 1 is left waiting in the next collective. Injected
    # from outside the product: a `sitecustomize` module on PYTHONPATH, which every worker imports at start.
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import torch\n\n"
        "    def step(self, *args, **kwargs):\n"
        "        raise RuntimeError('rank 0 broke at its first optimizer step')\n\n"
        "    torch.optim.AdamW.step = step\n")
    failing = job(tmp_path, tiny_model_dir, chat_records(24), **{"launch.num_processes": 2,
                                                                 "launch.timeout_minutes": 5})
    # A job that hangs instead of failing raises TimeoutExpired here.
    process = run_launcher("run", failing, timeout=150, env=subprocess_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}"))
    assert process.returncode == 1, process.stderr[-3000:]
    assert "error: training failed: rank 0:" in process.stderr and "rank 0 broke" in process.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["success"] is False and result["error"].startswith("rank 0: RuntimeError: rank 0 broke")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs")
def test_fsdp_trains_checkpoints_resumes_and_gathers_the_final_model(tmp_path, tiny_model_dir, one_process_reference):
    config = load_config(job(tmp_path, tiny_model_dir, chat_records(32), **{
        "hyperparams.batch_size": 4, "hyperparams.num_epochs": 2, "hyperparams.save_steps": 4,
        "hyperparams.save_total_limit": 5, "launch.num_processes": 2, "launch.accelerate_config": "fsdp"}))
    result = run_job(config)
    assert result.success, result.error
    first = final_weights(config.output_path)
    assert_same_weights(*common_weights(final_weights(one_process_reference), first), rel=1e-3)
    shutil.rmtree(config.output_path / "checkpoints" / "step_000008")
    shutil.rmtree(config.output_path / "final")
    resumed = run_job(config)
    assert resumed.success and resumed.summary["resumed_from"].endswith("step_000004")
    assert_same_weights(first, final_weights(config.output_path), rel=1e-5)


def test_torchrun_without_the_cpu_flag_still_gives_two_real_ranks(tmp_path, tiny_model_dir):
    """The trap in ENVIRONMENT.md: two processes that each believe they are alone."""
    two_ranks = job(tmp_path, tiny_model_dir, chat_records(16), **{"hyperparams.batch_size": 2})
    env = {k: v for k, v in subprocess_env().items() if k != "ACCELERATE_USE_CPU"}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(_free_port()), "-m", "launcher", "run", str(two_ranks)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["summary"]["world_size"] == 2
    assert result["global_step"] == 4  # 16 examples / (2 per process x 2 processes)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_lora_and_qlora_with_two_processes_match_one_process(tmp_path, tiny_model_dir, four_bit):
    pytest.importorskip("peft")
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    adapters = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
                "model.load_in_4bit": four_bit, "hyperparams.num_epochs": 2}
    one = load_config(job(tmp_path / "one", tiny_model_dir, chat_records(16), **adapters,
                          **{"hyperparams.batch_size": 8}))
    two = load_config(job(tmp_path / "two", tiny_model_dir, chat_records(16), **adapters,
                          **{"hyperparams.batch_size": 4, "launch.num_processes": 2}))
    first, second = run_job(one), run_job(two)
    assert first.success, first.error
    assert second.success, second.error
    assert second.summary["world_size"] == 2
    weights = [load_file(c.output_path / "final" / "adapter_model.safetensors") for c in (one, two)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert_same_weights(*weights, rel=1e-4)
