"""Stopping cleanly when the scheduler says so.

SLURM, Kubernetes and cloud spot instances send SIGTERM (SLURM's `--signal` can send SIGUSR1) some
time before they kill a job. The handler only sets a flag; the loop shares the flag with the other
processes in the all-reduce it already does at the start of every step, so all ranks stop at the
same step, save a resumable checkpoint, and exit with `EXIT_PREEMPTED`. Rerunning the same command
resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the loop after the checkpoint of a requested stop is saved."""


class StopFlag:
    """Set by SIGTERM or SIGUSR1 while installed (a context manager); read once per step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # handlers can only live there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: stopping after a checkpoint at the next step boundary", self.signal_name)

    @property
    def is_set(self) -> bool:
        return self.signal_name is not None
