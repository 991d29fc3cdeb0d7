"""The output folder's one owner: who may write into it, and every file the run keeps there.

    check_output_dir(path)                     # cheap, before anything loads: refuses an unusable folder
    run_dir = RunDir(path, is_main=accelerator.is_main_process)
    run_dir.open(job_toml=..., identity=..., run_id=..., keep_until_step=...)   # after every check passed
    run_dir.status.update(status="running"); run_dir.metrics.write({...})
    run_dir.write_result(result); run_dir.close()

Nothing is written into `output_dir` before `open`, and `open` is called only after the job, the
model, the data and the checkpoint to resume from were all accepted: a refused job leaves the
folder as it found it. The folder holds:

    .trainer-engine-run   marks a folder as this project's run folder: the run id and the model identity
    .lock                 the process that owns the folder now (a kernel lock, released when it dies)
    job.toml              the resolved job of the run
    manifest.json         what the run was made of (`loop.manifest`): data, tokenizer, model, versions, hardware
    status.json, metrics.jsonl, previews.jsonl, train.log, result.json, report.md, loss.png
    checkpoints/, final/  written by `loop.checkpoint` and `loop.model`

A folder that holds anything else and no marker is someone else's: the job is refused and nothing
in it is touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from launcher.config import ConfigError
from launcher.result import TrainingResult, write_atomic
from loop.status import MetricsLog, StatusFile

logger = logging.getLogger(__name__)

MARKER = ".trainer-engine-run"
LOCK_NAME = ".lock"
LEGACY_IDENTITY = "lock.json"  # where runs before the marker recorded the model identity
MANIFEST = "manifest.json"


class OutputDirError(ConfigError):
    """`output.output_dir` cannot hold this run."""


class OutputInUseError(OutputDirError):
    """Another live run owns the output folder."""


# --- before anything loads ----------------------------------------------------------------------

def is_run_folder(path: Path, *, to_write: bool = False) -> bool:
    """True when `path` holds a run of this project: its marker, or the status or result of a run of
    an earlier version (which to write into must also hold that run's job.toml)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    if to_write and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
        return True  # a run killed between taking the lock and writing its marker
    has_state = any((path / name).is_file() for name in ("status.json", "result.json", LEGACY_IDENTITY))
    return has_state and (not to_write or (path / "job.toml").is_file())


def check_output_dir(path: Path) -> None:
    """Refuse (`OutputDirError`, exit 2) a folder that this run could not or must not write into.

    Takes microseconds: call it before loading the model or the data.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output.output_dir: {path} is a file; choose a folder path")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise OutputDirError(f"output.output_dir: {path} lies under {existing}, which is a file; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK) or _is_read_only_mount(existing):
        raise OutputDirError(f"output.output_dir: {existing} is not writable; choose a folder you can write to")
    if path.is_dir() and any(path.iterdir()) and not is_run_folder(path, to_write=True):
        names = sorted(p.name for p in path.iterdir())[:5]
        raise OutputDirError(
            f"output.output_dir: {path} already holds files that are not a run of this project "
            f"({', '.join(names)}{', ...' if len(names) == 5 else ''}); nothing there is overwritten. "
            "Choose a new or empty folder, e.g. a subfolder such as outputs/run.")


def _is_read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_marker(path: Path) -> dict | None:
    """The folder's marker record (run id, model identity), or None for a new or legacy folder."""
    path = Path(path)
    for name in (MARKER, LEGACY_IDENTITY):
        try:
            record = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            if name == LEGACY_IDENTITY:
                return {"run_id": None, "identity": record}
            return record
    return None


# --- the folder, owned ---------------------------------------------------------------------------

class RunDir:
    """The output folder of one run. Only the main process writes; other ranks get no-op writers."""

    def __init__(self, output_dir: Path, *, is_main: bool):
        self.path = Path(output_dir)
        self.is_main = is_main
        self.lock = ProcessLock(self.path / LOCK_NAME)
        self.status = StatusFile(None)
        self.metrics = MetricsLog(None)
        self.previews = MetricsLog(None)
        self.is_open = False
        marker = read_marker(self.path) or {}
        self.recorded_run_id: str | None = marker.get("run_id")
        self.recorded_identity: dict | None = marker.get("identity")

    def open(self, *, job_toml: str, identity: dict, run_id: str, keep_until_step: int | None,
             with_previews: bool = False, status_forward=None, manifest: dict | None = None) -> None:
        """Own the folder and open its files. Raises `OutputInUseError` while another live run owns it.

        `manifest` (see `loop.manifest`), when given, is written to manifest.json by the main process."""
        if self.is_main:
            check_output_dir(self.path)  # again: the folder may have changed while the model loaded
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            record = {"run_id": run_id, "identity": identity, "project": "trainer-engine"}
            write_atomic(self.path / MARKER, json.dumps(record, indent=2) + "\n")
            write_atomic(self.path / "job.toml", job_toml)
            if manifest is not None:
                write_atomic(self.path / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
            _log_to_file(self.path / "train.log")
        self.status = StatusFile(self.path / "status.json" if self.is_main else None, forward=status_forward)
        self.metrics = MetricsLog(self.path / "metrics.jsonl" if self.is_main else None, keep_until_step=keep_until_step)
        self.previews = MetricsLog(self.path / "previews.jsonl" if self.is_main and with_previews else None,
                                   keep_until_step=keep_until_step)
        self.is_open = True

    def write_result(self, result: TrainingResult) -> None:
        """result.json; only into a folder this run owns (a refused job writes nothing)."""
        if self.is_open:
            result.write(self.path / "result.json")

    def close(self) -> None:
        self.lock.release()
        _stop_log_file(self.path / "train.log")


def completed_result(output_dir: Path, job_toml: str) -> TrainingResult | None:
    """The result of this very job's completed run in `output_dir`, or None.

    Rerunning a finished job changes nothing: its result, final model and checkpoints stay as they are.
    """
    path = Path(output_dir)
    if not (path / MARKER).is_file() or not (path / "final").is_dir():
        return None
    try:
        same_job = (path / "job.toml").read_text(encoding="utf-8") == job_toml
        result = TrainingResult.read(path / "result.json") if same_job else None
    except (OSError, ValueError, TypeError):
        return None
    return result if result is not None and result.success else None


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


# --- the process lock ----------------------------------------------------------------------------

class ProcessLock:
    """`output_dir/.lock`: an exclusive kernel lock (flock) held for the owner's lifetime, and a record
    of the owner for messages. The kernel frees the lock when the owner dies, however it dies, so a
    rerun after a kill takes over even where pids repeat (pid 1 in a container). A record naming a
    live process that is not holding the lock (an older version of this project) is still respected,
    matched by pid and process start time so a reused pid is not mistaken for it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise self._in_use(self._read()) from None
            # The holder may have removed the file between our open and our flock: then we hold a
            # lock on a file nobody else sees. Only the lock on the file at the path counts.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._read_fd(fd)
            if owner and _is_alive_elsewhere(owner):
                os.close(fd)
                raise self._in_use(owner)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_this_process()).encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return
        raise OutputInUseError(f"could not take the lock {self.path}; another run is starting in the same folder")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one else's lock is removed
        finally:
            os.close(self._fd)
            self._fd = None

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _read_fd(fd: int) -> dict | None:
        try:
            record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
        except ValueError:
            return None  # empty or torn: its writer died mid-write
        return record if isinstance(record, dict) else None

    def _in_use(self, owner: dict | None) -> OutputInUseError:
        owner = owner or {}
        since = time.ctime(owner["started"]) if isinstance(owner.get("started"), (int, float)) else "unknown"
        return OutputInUseError(
            f"output.output_dir {self.path.parent} is in use by process {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')} (since {since}). Wait for it to finish, stop it, or choose another "
            f"output.output_dir. If that process is gone, delete {self.path}.")


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "start_ticks": _start_ticks(os.getpid()), "started": time.time()}


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_alive_elsewhere(owner: dict) -> bool:
    """Whether the recorded owner may still be running although it does not hold the kernel lock."""
    if owner.get("host") != socket.gethostname():
        return True  # a process on another machine cannot be seen from here: respect it
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return False  # recorded before this machine last booted
    try:
        pid = int(owner.get("pid", -1))
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError, TypeError):
        return True
    recorded = owner.get("start_ticks")
    return recorded is None or recorded == _start_ticks(pid)


# --- train.log -------------------------------------------------------------------------------------

def _log_to_file(path: Path) -> None:
    """A copy of this process's log lines in the output folder."""
    root = logging.getLogger()
    if any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in root.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def _stop_log_file(path: Path) -> None:
    """Close the copy opened by `_log_to_file`, so a later run in this process does not write to it."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "baseFilename", None) == os.path.abspath(path)]:
        root.removeHandler(handler)
        handler.close()
