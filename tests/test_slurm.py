"""examples/slurm/train.sbatch, run by bash as SLURM would, with `srun` and `scontrol` as shims.

The batch script runs once (SLURM runs it on the first node); the `srun` shim starts its task once
per node of a two-node allocation on this machine, each with that node's SLURM_NODEID, and passes
on the signals it gets, as srun does. So the script's own logic is what runs: the main host from
the node list, the port from the job id, one machine rank per node, SIGUSR1 before the time limit
passed to every rank, and the requeue. The requeued job is the same script run again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, chat_records, complete_checkpoints, small_job, subprocess_env, wait_for
from test_multinode import kill_tree

pytestmark = pytest.mark.slow

SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
TIMEOUT = 400

SRUN = '''#!{python}
"""srun for tests: start the task once per node of the allocation, on this machine, as srun starts it on
each node, and pass on the signals srun passes on; exit with the highest exit code of the tasks."""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["SHIM_LOG"], "a") as log:
    log.write("srun " + " ".join(options + args) + "\\n")
hosts = os.environ["SLURM_JOB_NODELIST"].split(",")
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node),
                                         SLURM_LOCALID="0", SLURMD_NODENAME=hosts[node]))
         for node in range(int(os.environ["SLURM_NNODES"]))]

def forward(signum, frame):
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signum)

for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT"):
    signal.signal(getattr(signal, name), forward)
while any(task.poll() is None for task in tasks):
    time.sleep(0.1)
sys.exit(max(task.returncode for task in tasks))
'''

SCONTROL = '''#!/bin/bash
# scontrol for tests: the two subcommands train.sbatch uses.
case "$1 $2" in
  "show hostnames") echo "$3" | tr ',' '\\n' ;;
  requeue\\ *) echo "scontrol requeue $2" >> "$SHIM_LOG" ;;
  *) echo "scontrol shim: not supported: $*" >&2; exit 1 ;;
esac
'''


def install_shims(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", SRUN.format(python=sys.executable)), ("scontrol", SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def job_id_with_free_port() -> int:
    """A job id whose port (29500 + id % 1000, as the script computes it) is free on this machine."""
    for job_id in range(os.getpid() % 1000, os.getpid() % 1000 + 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 29500 + job_id % 1000))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port in 29500-30499")


def sbatch(job: Path, shims: Path, job_id: int, log: Path, **extra: str) -> subprocess.Popen:
    env = subprocess_env(ACCELERATE_USE_CPU="1", SHIM_LOG=str(shims / "calls.log"), SLURM_JOB_ID=str(job_id),
                         SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2", SLURM_NODEID="0",
                         SLURM_GPUS_ON_NODE="1", **extra)
    env["PATH"] = os.pathsep.join([str(shims), str(Path(sys.executable).parent), env["PATH"]])
    with open(log, "w") as handle:
        return subprocess.Popen(["bash", str(SBATCH), str(job), "accelerate_configs/multi_node.yaml"], cwd=REPO,
                                env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def current_step(output: Path) -> int:
    try:
        return json.loads((output / "status.json").read_text()).get("current_step") or 0
    except (OSError, ValueError):
        return 0


def test_sbatch_script_stops_at_the_time_limit_warning_requeues_and_the_requeued_job_finishes(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, chat_records(16), **{
        "hyperparams.batch_size": 8, "hyperparams.max_steps": 40,  # one step an epoch: see test_multinode.JOB "hyperparams.save_steps": 100,
        "launch.timeout_minutes": 2, "launch.preflight_seconds": 30})
    output = tmp_path / "out"
    shims = install_shims(tmp_path / "shims")
    job_id = job_id_with_free_port()

    batch = sbatch(job, shims, job_id, tmp_path / "slurm-1.out")
    try:
        assert wait_for(lambda: current_step(output) >= 3 or batch.poll() is not None, timeout=TIMEOUT)
        batch.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does five minutes before the time limit
        batch.wait(timeout=TIMEOUT)
    finally:
        if batch.poll() is None:
            kill_tree(batch.pid)
    log = (tmp_path / "slurm-1.out").read_text(errors="replace")
    assert batch.returncode == 3, log[-4000:]
    calls = " ".join((shims / "calls.log").read_text().split())
    assert f"--main_process_ip 127.0.0.1 --main_process_port {29500 + job_id % 1000}" in calls
    assert "--machine_rank $SLURM_NODEID" in calls and "--num_processes 2" in calls
    assert calls.endswith(f"scontrol requeue {job_id}")
    # Both ranks saved one checkpoint and stopped; rank 1 heard the signal from its own node's launcher.
    result = json.loads((output / "result.json").read_text())
    assert result["error"].startswith("preempted: stopped by SIGUSR1") and result["summary"]["world_size"] == 2
    checkpoint = Path(result["last_checkpoint_path"])
    assert [path for _, path in complete_checkpoints(output)] == [checkpoint]
    assert "[rank 1] WARNING loop.preemption: received SIGUSR1" in log

    requeued = sbatch(job, shims, job_id, tmp_path / "slurm-2.out", SLURM_RESTART_COUNT="1")
    try:
        requeued.wait(timeout=TIMEOUT)
    finally:
        if requeued.poll() is None:
            kill_tree(requeued.pid)
    log = (tmp_path / "slurm-2.out").read_text(errors="replace")
    assert requeued.returncode == 0, log[-4000:]
    assert (shims / "calls.log").read_text().count("scontrol requeue") == 1
    resumed = json.loads((output / "result.json").read_text())
    assert resumed["success"] and resumed["global_step"] == 40 and resumed["summary"]["world_size"] == 2
    assert resumed["summary"]["resumed_from"] == str(checkpoint)
