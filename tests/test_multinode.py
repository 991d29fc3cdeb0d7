"""Two nodes simulated on one machine: two `accelerate launch --num_machines 2` commands at once.

Each "node" is its own `accelerate launch` (torchrun's agent) with its machine rank, one rank each,
gloo on CPU, meeting at 127.0.0.1; both train the same job into the same output folder, as nodes on
a shared filesystem do. A node is stopped with SIGTERM, killed with SIGKILL, never started, or
given a folder of its own, and what the other node and the rerun do is checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (REPO, assert_same_weights, chat_records, complete_checkpoints, current_step, final_weights,
                     process_tree, read_metrics, small_job, subprocess_env, wait_for)
from launcher import load_config, run_job

pytestmark = pytest.mark.slow

# 48 examples, 2 per rank per step, 2 ranks: 12 steps an epoch, 40 steps, a checkpoint every 10. The
# stops and checkpoints the tests resume from (20, 30, a SIGTERM after step 13) lie inside an epoch after
# the first, where the sampler's order depends on the epoch: resuming there with several processes is
# exact only if the loop sets the epoch before skipping the batches already seen.
NUM_EXAMPLES, STEPS_PER_EPOCH = 48, 12
JOB = {"hyperparams.batch_size": 2, "hyperparams.max_steps": 40, "hyperparams.save_steps": 10,
       "hyperparams.save_total_limit": 2, "launch.timeout_minutes": 1, "launch.preflight_seconds": 10}
NODE_TIMEOUT = 300  # seconds a node may take on a busy 2-core machine; a hang fails the test, not the suite
EXIT_REPORTED = re.compile(r"exitcode\s*:\s*(\d+)")  # torchrun's report of each failed rank


def write_two_node_job(folder: Path, model_dir: Path, **overrides) -> Path:
    return small_job(folder, model_dir, chat_records(NUM_EXAMPLES), **{**JOB, **overrides})


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory, tiny_model_dir) -> Path:
    """The same job on one machine with as many processes (2): the output folder to match."""
    folder = tmp_path_factory.mktemp("one-machine")
    result = run_job(load_config(write_two_node_job(folder, tiny_model_dir, **{"launch.num_processes": 2})))
    assert result.success, result.error
    return folder / "out"


class Nodes:
    """`accelerate launch` once per simulated node, each in its own process group, output to a file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, job: Path, machine_rank: int, port: int, *, script: list[str] | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "accelerate.commands.launch",
                   "--config_file", str(REPO / "accelerate_configs" / "multi_node.yaml"),
                   "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   *(script or ["-m", "launcher", "run", str(job)])]
        log = self.folder / f"node{machine_rank}-{len(self.logs)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(ACCELERATE_USE_CPU="1"), stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        self.logs.append(log)
        return process

    def start_both(self, job: Path, other_job: Path | None = None) -> list[subprocess.Popen]:
        port = free_port()
        return [self.start(job, 0, port), self.start(other_job or job, 1, port)]

    def run_both(self, job: Path, other_job: Path | None = None) -> list[int]:
        return [p.wait(timeout=NODE_TIMEOUT) for p in self.start_both(job, other_job)]

    def output(self, process: subprocess.Popen) -> str:
        return self.logs[self.processes.index(process)].read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait()


@pytest.fixture
def nodes(tmp_path):
    started = Nodes(tmp_path)
    yield started
    started.stop_all()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it, as when their machine goes down. (torchrun starts
    each rank in a session of its own: killing the launcher's process group leaves the ranks running.)"""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def losses(output: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output)]


def assert_same_losses(a: list[tuple[int, float]], b: list[tuple[int, float]], rel: float = 1e-5) -> None:
    assert [step for step, _ in a] == [step for step, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= rel * abs(y), f"step {step}: {x} != {y}"


def test_two_nodes_train_like_one_machine_with_as_many_processes(tmp_path, tiny_model_dir, nodes, one_machine):
    job = write_two_node_job(tmp_path, tiny_model_dir)
    assert nodes.run_both(job) == [0, 0], nodes.output(nodes.processes[0])[-3000:]
    output = tmp_path / "out"

    result = json.loads((output / "result.json").read_text())
    assert result["success"] and result["global_step"] == 40 and result["summary"]["world_size"] == 2
    assert_same_losses(losses(output), losses(one_machine))
    assert len(losses(output)) == 40
    assert_same_weights(final_weights(one_machine), final_weights(output))
    # Each checkpoint is complete and holds the state of both ranks, one per node.
    checkpoints = complete_checkpoints(output)
    assert [step for step, _ in checkpoints] == [30, 40]
    for _, path in checkpoints:
        assert (path / "random_states_0.pkl").is_file() and (path / "random_states_1.pkl").is_file()
    # The preflight measured the link and left nothing behind.
    assert "preflight: 2 ranks on 2 node(s) joined" in nodes.output(nodes.processes[0])
    assert "link node 0 <-> node 1" in nodes.output(nodes.processes[0])
    assert not list(tmp_path.rglob(".trainer-engine-shared-*"))


def test_two_processes_resume_mid_epoch_like_the_uninterrupted_run(tmp_path, one_machine):
    """A copy of the one-machine run, taken back to its checkpoint at step 30 (step 6 of the third
    epoch), resumes there with its 2 processes: each later step's loss and the final weights are
    those of the run that never stopped."""
    shutil.copytree(one_machine.parent, tmp_path / "run")  # job.toml, data and out/, with relative paths
    output = tmp_path / "run" / "out"
    assert [step for step, _ in complete_checkpoints(output)] == [30, 40]
    assert 30 % STEPS_PER_EPOCH and 30 > STEPS_PER_EPOCH
    for later in ("checkpoints/step_000040", "final"):
        shutil.rmtree(output / later)
    (output / "result.json").unlink()

    result = run_job(load_config(tmp_path / "run" / "job.toml"))
    assert result.success, result.error
    assert result.summary["resumed_from"] == str(output / "checkpoints" / "step_000030")
    assert_same_losses(losses(output), losses(one_machine))
    assert_same_weights(final_weights(one_machine), final_weights(output))


def test_sigterm_to_one_node_saves_on_every_rank_and_the_rerun_resumes_exactly(tmp_path, tiny_model_dir, nodes,
                                                                                 one_machine):
    job = write_two_node_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    first, second = nodes.start_both(job)
    assert wait_for(lambda: current_step(output) > STEPS_PER_EPOCH or first.poll() is not None, timeout=NODE_TIMEOUT)
    second.send_signal(signal.SIGTERM)  # to node 1's launcher only, as a scheduler stopping one machine would
    codes = [first.wait(timeout=NODE_TIMEOUT), second.wait(timeout=NODE_TIMEOUT)]

    # Rank 0 on node 0 heard of the stop through the step's all-reduce; both ranks saved and exited 3.
    assert codes[0] != 0 and codes[1] != 0  # accelerate launch exits 1 whenever a rank exits non-zero
    assert set(EXIT_REPORTED.findall(nodes.output(first))) == {"3"}, nodes.output(first)[-3000:]
    assert "[rank 1] WARNING loop.preemption: received SIGTERM" in nodes.output(second)
    result = json.loads((output / "result.json").read_text())
    assert result["error"].startswith("preempted") and result["summary"]["world_size"] == 2
    assert json.loads((output / "status.json").read_text())["status"] == "preempted"
    checkpoint = Path(result["last_checkpoint_path"])
    assert checkpoint in [path for _, path in complete_checkpoints(output)]
    stopped_at = json.loads((checkpoint / "progress.json").read_text())["progress"]["step"]
    assert STEPS_PER_EPOCH < stopped_at < 40
    assert stopped_at % STEPS_PER_EPOCH, f"stopped at the epoch boundary {stopped_at}; the test needs a mid-epoch stop"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()

    assert nodes.run_both(job) == [0, 0]
    resumed = json.loads((output / "result.json").read_text())
    assert resumed["success"] and resumed["summary"]["resumed_from"] == str(checkpoint)
    assert_same_losses(losses(output), losses(one_machine))
    assert_same_weights(final_weights(one_machine), final_weights(output))


def test_a_killed_node_fails_the_other_within_the_timeout_naming_it_and_the_rerun_resumes(tmp_path, tiny_model_dir,
                                                                                          nodes, one_machine):
    job = write_two_node_job(tmp_path, tiny_model_dir)  # launch.timeout_minutes = 1
    output = tmp_path / "out"
    first, second = nodes.start_both(job)
    assert wait_for(lambda: current_step(output) >= 22 or first.poll() is not None, timeout=NODE_TIMEOUT)
    kill_tree(second.pid)  # node 1's launcher and its rank vanish at once
    killed = time.monotonic()
    first.wait(timeout=NODE_TIMEOUT)
    failed_after = time.monotonic() - killed

    assert first.returncode != 0
    assert failed_after < 60, f"node 0 took {failed_after:.0f} s to fail; launch.timeout_minutes is 1"
    result = json.loads((output / "result.json").read_text())
    assert not result["success"]
    assert result["error"].startswith("lost rank 1 (node 1"), result["error"]
    # The rerun resumes from the newest complete checkpoint and ends where an uninterrupted run ends.
    newest_step, newest = complete_checkpoints(output)[-1]
    assert newest_step in (20, 30)  # inside an epoch after the first
    assert nodes.run_both(job) == [0, 0]
    resumed = json.loads((output / "result.json").read_text())
    assert resumed["success"] and resumed["summary"]["resumed_from"] == str(newest)
    assert_same_losses(losses(output), losses(one_machine))
    assert_same_weights(final_weights(one_machine), final_weights(output))


def test_a_node_whose_ranks_never_start_is_named_within_seconds(tmp_path, tiny_model_dir, nodes):
    """Node 1's launcher joins the rendezvous but its rank never reaches training (a stuck machine):
    node 0 names the missing rank after launch.preflight_seconds, not after launch.timeout_minutes."""
    job = write_two_node_job(tmp_path, tiny_model_dir, **{"launch.preflight_seconds": 5, "launch.timeout_minutes": 10})
    stuck = tmp_path / "stuck.py"
    stuck.write_text("import time\ntime.sleep(600)\n")
    port = free_port()
    started = time.monotonic()
    first = nodes.start(job, 0, port)
    nodes.start(job, 1, port, script=[str(stuck)])
    first.wait(timeout=NODE_TIMEOUT)
    took = time.monotonic() - started

    output = nodes.output(first)
    assert first.returncode == 1 and set(EXIT_REPORTED.findall(output)) == {"1"}, output[-3000:]
    assert "error: PreflightError: preflight: 1 of 2 ranks did not join within 5 s: rank 1 (node 1)" in output
    assert "Joined: rank 0 (node 0, host " in output
    assert took < 120, f"node 0 took {took:.0f} s (start-up included) to name the missing node"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_folder_per_node_is_refused_naming_output_dir(tmp_path, tiny_model_dir, nodes):
    """Without a shared filesystem each node has its own copy of the folder: refused (exit 2) at start."""
    jobs = [write_two_node_job(tmp_path / f"machine{n}", tiny_model_dir) for n in (0, 1)]
    codes = nodes.run_both(jobs[0], jobs[1])

    assert codes == [1, 1]  # accelerate launch's code for a rank that exited non-zero
    for rank, process in enumerate(nodes.processes):
        output = nodes.output(process)
        assert set(EXIT_REPORTED.findall(output)) == {"2"}, output[-3000:]
        own = tmp_path / f"machine{rank}" / "out"
        assert (f"error: output.output_dir: {own} is not one folder shared by every node: node 1 (host "
                in output), output[-3000:]
    assert not (tmp_path / "machine0" / "out").exists() and not (tmp_path / "machine1" / "out").exists()
    assert not list(tmp_path.rglob(".trainer-engine-shared-*"))
