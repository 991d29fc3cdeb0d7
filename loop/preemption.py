"""Stopping cleanly when the scheduler says so.

SLURM, Kubernetes and cloud spot instances send SIGTERM (SLURM's `--signal` can send SIGUSR1) some
time before they kill a job. The handler only sets a flag; the loop shares the flag with the other
processes in the all-reduce it already does at the start of every step, so all ranks stop at the
same step, save a resumable checkpoint, and exit with `EXIT_PREEMPTED`. Rerunning the same command
resumes from that checkpoint.

A process whose loop runs outside the main thread cannot install signal handlers (Ray Train calls
its workers' function in a thread). There the signal goes to another process, which relays it:

    with relaying_stop_requests(poll):   # poll() -> None, until it returns what asked for the stop
        train(config)

sets every `StopFlag` of this process as the signal itself would have.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
RELAY_POLL_SECONDS = 0.5
"""How often `relaying_stop_requests` asks for a stop request made elsewhere."""

_relayed: str | None = None  # what asked for a stop through `relaying_stop_requests`, for every StopFlag here


class Preempted(Exception):
    """Raised by the loop after the checkpoint of a requested stop is saved."""


class StopFlag:
    """Set by SIGTERM or SIGUSR1 while installed (a context manager), or by a relayed stop request;
    read once per step."""

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
        if self.signal_name is None and _relayed is not None:
            self.signal_name = _relayed
        return self.signal_name is not None


@contextlib.contextmanager
def relaying_stop_requests(poll: Callable[[], str | None]) -> Iterator[None]:
    """While open, a thread calls `poll()` every `RELAY_POLL_SECONDS`; the first answer that is not None
    (what asked for the stop, e.g. "SIGTERM to the Ray driver") sets every `StopFlag` of this process.
    If `poll` raises, the relay ends with a warning and the run goes on without it. Closing clears the
    request."""
    global _relayed
    closed = threading.Event()

    def relay() -> None:
        global _relayed
        while not closed.wait(RELAY_POLL_SECONDS):
            try:
                requested = poll()
            except Exception as error:  # the run must not fail for it; say what is lost
                if not closed.is_set():
                    logger.warning("stop requests can no longer be relayed (%s: %s): this run will not stop at a "
                                   "checkpoint when asked to", type(error).__name__, error)
                return
            if requested is not None and not closed.is_set():
                _relayed = requested
                logger.warning("received %s: stopping after a checkpoint at the next step boundary", _relayed)
                return

    thread = threading.Thread(target=relay, name="trainer-engine-stop-relay", daemon=True)
    thread.start()
    try:
        yield
    finally:
        closed.set()
        thread.join(timeout=RELAY_POLL_SECONDS * 4)
        _relayed = None
