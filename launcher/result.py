"""`TrainingResult`: what a run returns and writes to `result.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingResult:
    success: bool
    """True when training finished and the final model was written."""
    global_step: int = 0
    """Optimizer steps done (including those of resumed runs)."""
    runtime_sec: float = 0.0
    """Wall time of this run, seconds."""
    last_checkpoint_path: str | None = None
    """Newest complete step checkpoint (or the final model when no step checkpoint was kept)."""
    final_loss: float | None = None
    """Token-weighted training loss of the last logging window."""
    summary: dict[str, Any] = field(default_factory=dict)
    """train_loss, eval_loss, num_train_tokens, tokens_per_sec, world_size, peak_memory_bytes, ..."""
    error: str | None = None
    """Why the run failed, when it did."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> "TrainingResult":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, path: str | os.PathLike) -> None:
        write_atomic(path, self.to_json() + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> "TrainingResult":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` so readers only ever see the old or the new whole file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
