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
import time
from pathlib import Path

import pytest
import torch

from launcher import load_config, run_job
from launcher.demo import build_tiny_model
from loop.checkpoint import COMPLETE_MARKER
from loop.preemption import EXIT_PREEMPTED
from test_loop import assert_same_weights, chat_records, final_weights, write_job

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory, model_dir) -> Path:
    """One process, batch 8, 2 epochs over 32 examples in file order: the weights to match."""
    folder = tmp_path_factory.mktemp("reference")
    config = load_config(write_job(folder, model_dir, records=chat_records(32, seed=3),
                                   hyperparams=["batch_size = 8", "num_epochs = 2"]))
    assert run_job(config).success
    return config.output_path


def common_weights(a: dict, b: dict) -> tuple[dict, dict]:
    """DeepSpeed may or may not write the tied lm_head copy; compare the tensors both have."""
    shared = a.keys() & b.keys()
    assert "model.embed_tokens.weight" in shared
    return {k: a[k] for k in shared}, {k: b[k] for k in shared}


def test_two_processes_give_the_weights_of_one_with_twice_the_batch(tmp_path, model_dir, one_process_reference):
    config = load_config(write_job(tmp_path, model_dir, records=chat_records(32, seed=3),
                                   hyperparams=["batch_size = 4", "num_epochs = 2"], launch=["num_processes = 2"]))
    result = run_job(config)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    assert result.global_step == 8
    assert json.loads((config.output_path / "result.json").read_text())["summary"]["world_size"] == 2
    assert_same_weights(final_weights(one_process_reference), final_weights(config.output_path))


@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_trains_checkpoints_and_resumes_exactly(tmp_path, model_dir, one_process_reference, stage):
    config = load_config(write_job(
        tmp_path, model_dir, records=chat_records(32, seed=3),
        hyperparams=["batch_size = 4", "num_epochs = 2", "save_steps = 4", "save_total_limit = 5"],
        launch=["num_processes = 2", f'accelerate_config = "{stage}"']))
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
def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path, model_dir, num_processes):
    hyper = ["batch_size = 2", "num_epochs = 30", "save_steps = 1000", "save_total_limit = 2"]
    launch = [f"num_processes = {num_processes}"]
    records = chat_records(12, seed=4)
    whole = load_config(write_job(tmp_path / "whole", model_dir, records=records, hyperparams=hyper, launch=launch))
    job = write_job(tmp_path / "stopped", model_dir, records=records, hyperparams=hyper, launch=launch)
    output = tmp_path / "stopped" / "out"
    command = [sys.executable, "-m", "launcher", "run", str(job)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _has_trained(output):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, out[-3000:]
    result = json.loads((output / "result.json").read_text())
    assert result["success"] is False and result["error"].startswith("preempted")
    checkpoint = Path(result["last_checkpoint_path"])
    assert (checkpoint / COMPLETE_MARKER).exists()
    assert json.loads((output / "status.json").read_text())["status"] == "preempted"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((output / "result.json").read_text())
    assert resumed["success"] and resumed["summary"]["resumed_from"] == str(checkpoint)
    assert run_job(whole).success
    assert_same_weights(final_weights(whole.output_path), final_weights(output), rel=0.0)


def _has_trained(output: Path) -> bool:
    status = output / "status.json"
    try:
        return json.loads(status.read_text()).get("current_step", 0) >= 3
    except (OSError, ValueError):
        return False


def test_a_rank_that_raises_brings_the_job_down_with_its_name(tmp_path, model_dir):
    (tmp_path / "flaky_profile.py").write_text(
        "import os\n"
        "from profiles import ChatProfile\n\n"
        "class FlakyProfile(ChatProfile):\n"
        "    def messages(self, example, index):\n"
        "        if index == 5 and os.environ.get('RANK') == '0':\n"
        "            raise RuntimeError('flaky profile broke on record 5')\n"
        "        return super().messages(example, index)\n")
    job = write_job(tmp_path, model_dir, profile=['name = "flaky_profile:FlakyProfile"'],
                    launch=["num_processes = 2", "timeout_minutes = 5"], data=['cache_dir = "cache"'])
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    started = time.time()
    process = subprocess.run([sys.executable, "-m", "launcher", "run", str(job)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=240)
    assert time.time() - started < 120, "the job hung instead of failing"
    assert process.returncode == 1, process.stderr[-3000:]
    # It failed while preparing data, before the output folder was owned: nothing is written there,
    # and the launching process reports the failing rank.
    assert not (tmp_path / "out").exists()
    assert "error: training failed: rank 0:" in process.stderr and "flaky profile broke on record 5" in process.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="FSDP needs 2 CUDA GPUs")
def test_fsdp_trains_checkpoints_resumes_and_gathers_the_final_model(tmp_path, model_dir, one_process_reference):
    config = load_config(write_job(
        tmp_path, model_dir, records=chat_records(32, seed=3),
        hyperparams=["batch_size = 4", "num_epochs = 2", "save_steps = 4", "save_total_limit = 5"],
        launch=["num_processes = 2", 'accelerate_config = "fsdp"']))
    result = run_job(config)
    assert result.success, result.error
    first = final_weights(config.output_path)
    assert_same_weights(*common_weights(final_weights(one_process_reference), first), rel=1e-3)
    shutil.rmtree(config.output_path / "checkpoints" / "step_000008")
    shutil.rmtree(config.output_path / "final")
    resumed = run_job(config)
    assert resumed.success and resumed.summary["resumed_from"].endswith("step_000004")
    assert_same_weights(first, final_weights(config.output_path), rel=1e-5)


def test_torchrun_without_the_cpu_flag_still_gives_two_real_ranks(tmp_path, model_dir):
    """The trap in ENVIRONMENT.md: two processes that each believe they are alone."""
    job = write_job(tmp_path, model_dir, records=chat_records(16), hyperparams=["batch_size = 2"])
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(_free_port()), "-m", "launcher", "run", str(job)],
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
def test_lora_and_qlora_with_two_processes_match_one_process(tmp_path, model_dir, four_bit):
    pytest.importorskip("peft")
    if four_bit:
        pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    lora = ["enabled = true", "r = 4", "alpha = 8", "dropout = 0.0"]
    model = [f"load_in_4bit = {'true' if four_bit else 'false'}"]
    records = chat_records(16, seed=6)
    one = load_config(write_job(tmp_path / "one", model_dir, records=records, lora=lora, model=model,
                                hyperparams=["batch_size = 8", "num_epochs = 2"]))
    two = load_config(write_job(tmp_path / "two", model_dir, records=records, lora=lora, model=model,
                                hyperparams=["batch_size = 4", "num_epochs = 2"], launch=["num_processes = 2"]))
    first, second = run_job(one), run_job(two)
    assert first.success, first.error
    assert second.success, second.error
    assert second.summary["world_size"] == 2
    adapters = [load_file(c.output_path / "final" / "adapter_model.safetensors") for c in (one, two)]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert_same_weights(*adapters, rel=1e-4)
