"""One output folder, one run: a second run on a folder a live run owns is refused; a dead owner's lock is taken over.

    pytest tests/reliability/test_output_lock.py -q

The live-owner test starts a real run, freezes it with SIGSTOP once it trains (a stopped process is
alive, and the folder cannot change under the comparison), starts a second `python -m launcher run`
on the same job, then lets the first continue (SIGCONT) to success.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import (
    REPO,
    launcher_command,
    read_json_if_present,
    run_cli,
    run_launcher,
    small_job,
    snapshot,
    subprocess_env,
    wait_for,
)
from loop.run_dir import MARKER

HOST = socket.gethostname()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_a_second_run_on_a_live_runs_folder_is_refused_and_the_first_finishes(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.max_steps": 40, "hyperparams.save_steps": 10})
    output = tmp_path / "out"
    first = subprocess.Popen(launcher_command("run", job), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        def training() -> bool:
            try:
                status = json.loads((output / "status.json").read_text())
            except (OSError, ValueError):
                return False
            return status.get("status") == "running" and (status.get("current_step") or 0) >= 1

        assert wait_for(training, timeout=240), "the first run never reported training"
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(output)
        owner = json.loads((output / ".lock").read_text())
        assert owner["pid"] == first.pid and owner["host"] == HOST

        started = time.monotonic()
        second = run_launcher("run", job, timeout=240)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        message = second.stderr
        assert f"in use by process {first.pid} on {HOST}" in message, message[-2000:]
        assert "choose another output.output_dir" in message and "Traceback" not in message + second.stdout
        assert time.monotonic() - started < 200
        assert snapshot(output) == before, "the refused run changed the first run's folder"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    result = read_json_if_present(output / "result.json")
    assert result["success"] and result["global_step"] == 40
    assert not (output / ".lock").exists()


@pytest.mark.parametrize("lock_text", [
    pytest.param(lambda: json.dumps({"pid": dead_pid(), "host": HOST, "started": time.time() - 60}), id="dead-pid"),
    pytest.param(lambda: "", id="empty"),
    pytest.param(lambda: '{"pid": 12', id="torn"),
])
def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, tiny_model_dir, capsys, lock_text):
    job = small_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    output.mkdir()
    (output / ".lock").write_text(lock_text())
    code, out, err = run_cli(["run", job], capsys)
    assert code == 0, (out + err)[-2000:]
    assert read_json_if_present(output / "result.json")["success"]
    assert not (output / ".lock").exists()


@pytest.mark.parametrize("owner", ["live-process-here", "other-host"])
def test_a_lock_of_a_live_or_unknowable_owner_is_respected(tmp_path, tiny_model_dir, capsys, owner):
    job = small_job(tmp_path, tiny_model_dir)
    output = tmp_path / "out"
    output.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pid, host = (sleeper.pid, HOST) if owner == "live-process-here" else (dead_pid(), "another-machine-07")
        (output / ".lock").write_text(json.dumps({"pid": pid, "host": host, "started": time.time()}))
        (output / MARKER).write_text('{"run_id": "earlier"}')
        (output / "sentinel.txt").write_text("an earlier run's file")
        before = snapshot(output)
        code, out, err = run_cli(["run", job], capsys)
        text = out + err
        assert code == 2, text[-2000:]
        assert f"in use by process {pid} on {host}" in text and "Traceback" not in text
        assert snapshot(output) == before
    finally:
        sleeper.kill()
        sleeper.wait()
