"""The output folder's owner (`loop/run_dir.py`): which folders a run may write into, and the process
lock that lets exactly one run own a folder.

    pytest tests/test_run_dir.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loop.run_dir import LOCK_NAME, MARKER, OutputDirError, OutputInUseError, ProcessLock, check_output_dir

REPO = Path(__file__).resolve().parent.parent


# --- which folders a run may write into ------------------------------------------------------------

def test_new_empty_and_own_folders_are_usable(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / MARKER).write_text('{"run_id": "a"}')
    (tmp_path / "ours" / "anything.txt").write_text("a run's own folder may hold anything")
    check_output_dir(tmp_path / "ours")
    (tmp_path / "killed-early").mkdir()
    (tmp_path / "killed-early" / LOCK_NAME).write_text("")  # killed between lock and marker
    check_output_dir(tmp_path / "killed-early")


@pytest.mark.parametrize("layout, expected", [
    ({"job.toml": "# my notes", "report.md": "mine", "final/my_weights.bin": "w"}, "not a run of this project"),
    ({"result.json": "{}"}, "not a run of this project"),  # a result.json alone is no run of ours to write over
])
def test_a_folder_of_someone_elses_files_is_refused(tmp_path, layout, expected):
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(OutputDirError, match=expected):
        check_output_dir(tmp_path)


def test_a_file_and_a_path_under_a_file_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputDirError, match="which is a file"):
        check_output_dir(tmp_path / "file" / "out")


def _can_mount_read_only() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    return subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o ro tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_read_only(), reason="needs `unshare --mount` to make a read-only filesystem")
def test_a_folder_on_a_read_only_filesystem_is_refused(tmp_path):
    """Root can write into any folder whatever its mode bits, but not into a read-only mount."""
    mount = tmp_path / "ro"
    mount.mkdir()
    check = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
             "from loop.run_dir import check_output_dir, OutputDirError\n"
             f"try:\n    check_output_dir({str(mount / 'out')!r})\nexcept OutputDirError as e:\n    print(e)\n")
    done = subprocess.run(["unshare", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o ro tmpfs {mount} && {sys.executable} -c \"$0\"", check],
                          capture_output=True, text=True, timeout=60)
    assert "is not writable" in done.stdout, done.stdout + done.stderr


# --- the process lock -----------------------------------------------------------------------------

RACE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from loop.run_dir import OutputInUseError, ProcessLock
    folder, start = Path(sys.argv[1]), float(sys.argv[2])
    while time.time() < start:
        pass
    lock = ProcessLock(folder / ".lock")
    try:
        lock.acquire()
    except OutputInUseError:
        print("refused", flush=True)
        sys.exit(0)
    print("won", flush=True)
    sys.stdin.readline()  # hold it until every racer has tried
    lock.release()
""")


def test_exactly_one_of_four_racing_processes_takes_the_lock(tmp_path):
    """The lock's record is never seen half-written, and a lock nobody holds is never taken twice."""
    script = tmp_path / "race.py"
    script.write_text(RACE.format(repo=str(REPO)))
    trials = int(os.environ.get("TRAINER_ENGINE_LOCK_TRIALS", "50"))
    import time

    for trial in range(trials):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        if trial % 3 == 1:
            (folder / LOCK_NAME).write_text("")  # torn record of a dead writer
        elif trial % 3 == 2:
            (folder / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": os.uname().nodename}))
        start = time.time() + 0.4
        racers = [subprocess.Popen([sys.executable, str(script), str(folder), str(start)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for _ in range(4)]
        said = [p.stdout.readline().strip() for p in racers]  # each has tried once the line is there
        outcomes = sorted(p.communicate(input="\n", timeout=60)[0].strip() or word for p, word in zip(racers, said))
        assert outcomes == ["refused", "refused", "refused", "won"], f"trial {trial}: {outcomes}"


def test_the_lock_is_freed_by_the_kernel_when_its_owner_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from loop.run_dir import ProcessLock
        from pathlib import Path
        ProcessLock(Path({str(tmp_path)!r}) / ".lock").acquire()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputInUseError, match=f"in use by process {holder.pid}"):
            ProcessLock(tmp_path / LOCK_NAME).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = ProcessLock(tmp_path / LOCK_NAME)
    lock.acquire()  # SIGKILL left the file and its record; the kernel lock went with the process
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_is_told_apart_by_its_start_time(tmp_path):
    """A record naming this very pid (a container's pid 1 after a restart) but another start time is
    stale; a record of a live process with its real start time (an older version's lock, not held
    by the kernel) is respected."""
    from loop.run_dir import _this_process

    me = _this_process()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**me, "start_ticks": me["start_ticks"] - 1}))
    lock = ProcessLock(tmp_path / LOCK_NAME)
    lock.acquire()
    lock.release()

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from loop.run_dir import _start_ticks

        record = {**me, "pid": sleeper.pid, "start_ticks": _start_ticks(sleeper.pid)}
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(OutputInUseError, match=f"process {sleeper.pid}"):
            ProcessLock(tmp_path / LOCK_NAME).acquire()
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "start_ticks": record["start_ticks"] + 7}))
        lock = ProcessLock(tmp_path / LOCK_NAME)
        lock.acquire()  # same pid, other start time: that process is not the owner
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def _can_unshare_pid() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs `unshare --pid` (Linux, root or user namespaces)")
def test_a_run_killed_as_pid_1_in_a_container_is_taken_over_by_the_next_pid_1(tmp_path):
    """Both runs are pid 1 in their own PID namespace, as in a restarted container."""
    body = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from loop.run_dir import ProcessLock
        assert os.getpid() == 1, os.getpid()
        ProcessLock(Path({str(tmp_path)!r}) / ".lock").acquire()
        print("took the lock as pid", os.getpid(), flush=True)
        if sys.argv[1] == "die":
            os.kill(os.getpid(), 9)
    """)
    script = tmp_path / "container.py"
    script.write_text(body)
    command = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)]
    first = subprocess.run(command + ["die"], capture_output=True, text=True, timeout=60)
    assert "took the lock as pid 1" in first.stdout, first.stderr
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == 1  # its record stays behind
    second = subprocess.run(command + ["live"], capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "took the lock as pid 1" in second.stdout, second.stderr
