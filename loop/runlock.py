"""One output folder, one run: `output_dir/.lock` names the process that owns the folder.

A second run on the same folder while the first is alive is refused; a lock left by a process
that died (same host, pid gone) is taken over. Only the main process takes the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from launcher.config import ConfigError

LOCK_NAME = ".lock"


class OutputInUseError(ConfigError):
    """Another live run owns the output folder."""


class OutputLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = self._read()
                if current is not None and self._is_alive(current):
                    raise OutputInUseError(
                        f"output.output_dir {self.path.parent} is in use by process {current.get('pid')} on "
                        f"{current.get('host')} (since {time.ctime(current.get('started', 0))}). Wait for it to "
                        "finish, stop it, or choose another output.output_dir. If that process is gone, delete "
                        f"{self.path}.") from None
                self.path.unlink(missing_ok=True)  # stale: its owner died without releasing it
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return
        raise OutputInUseError(f"could not take the lock {self.path}; another run is starting in the same folder")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # torn or empty: its writer died mid-write

    @staticmethod
    def _is_alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # cannot see processes on another machine: assume it is alive
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return True
