"""What a run tells the outside world while it goes: `status.json` and `metrics.jsonl`.

Only the main process writes. `status.json` is replaced atomically, so a reader never sees half a
file; `metrics.jsonl` is appended one line per record, and a torn last line (a run killed mid-write)
is skipped on read and cut off when a resumed run reopens the file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from launcher.result import write_atomic

STATUS_FIELDS = ("status", "current_step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_sec",
                 "eta_sec", "validation_loss", "timestamp", "error_message")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StatusFile:
    """`status.json`, with every contract field present; `update(**fields)` merges and rewrites."""

    def __init__(self, path: Path | None, forward: Callable[[dict], None] | None = None):
        self.path = path
        self.forward = forward
        self.fields: dict[str, Any] = dict.fromkeys(STATUS_FIELDS)

    def update(self, **fields: Any) -> None:
        self.fields.update({k: _finite_or_none(v) for k, v in fields.items()})
        self.fields["timestamp"] = time.time()
        if self.path is not None:
            write_atomic(self.path, json.dumps(self.fields, indent=2, default=str) + "\n")
        if self.forward is not None:
            self.forward(dict(self.fields))


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, flushed as written."""

    def __init__(self, path: Path | None, *, keep_until_step: int | None = None):
        self.path = path
        if path is None:
            return
        records = read_jsonl(path) if keep_until_step is not None else []
        kept = [r for r in records if r.get("step", 0) <= (keep_until_step or 0)]
        # A resumed run rewrites the file without the records of steps it is about to redo
        # (and without a line torn by a kill), then appends.
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            handle.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSONL file, skipping a torn or corrupt line instead of failing."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
