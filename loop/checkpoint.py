"""Step checkpoints: the one module that decides when to save, what is complete, and where to resume.

Layout of `output_dir/checkpoints/step_000050/`:
    Accelerate's `save_state` files   model, optimizer, scheduler, scaler, RNG state of every process
    progress.json                     step, epoch, data position, tokens seen, and the run's shape
    COMPLETE                          written last; a folder without it is never resumed from

A checkpoint is written into `.tmp-step_000050/` and renamed when complete, so a kill at any moment
leaves either the old set of checkpoints or the old set plus one complete new one (and maybe a
temporary folder, removed by the next run). Progress is read from `progress.json`, never parsed
from folder names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from launcher.config import ConfigError
from launcher.result import write_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
PROGRESS_FILE = "progress.json"
_OURS = re.compile(r"^(\.tmp-)?step_\d{6,}$")


class ResumeError(ConfigError):
    """A checkpoint that cannot continue this job as configured."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint and restored on resume."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch the next micro-batch comes from (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of that epoch already consumed by each process."""
    num_tokens: int = 0
    """Tokens that carried loss so far, all processes."""
    num_input_tokens: int = 0
    """Non-padding tokens seen so far, all processes."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state.get(f.name, getattr(self, f.name)))


@dataclass(frozen=True)
class RunShape:
    """Settings a resumed run must share with the run that saved the checkpoint."""

    batch_size: int
    gradient_accumulation: int
    world_size: int
    num_train_examples: int
    seed: int


class Checkpointer:
    def __init__(self, accelerator, output_dir: Path, *, save_steps: int, save_total_limit: int, shape: RunShape):
        self.accelerator = accelerator
        self.root = Path(output_dir) / "checkpoints"
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.shape = shape
        self.last_path: Path | None = None
        self.last_step: int | None = None  # step of last_path

    # --- saving ---------------------------------------------------------------------------------
    def maybe_save(self, progress: Progress, *, force: bool = False) -> Path | None:
        """Save when the interval says so (or `force`); called by the loop after every step."""
        due = self.save_steps > 0 and progress.step % self.save_steps == 0
        if not (due or force) or progress.step == 0:
            return None
        return self.save(progress)

    def save(self, progress: Progress) -> Path:
        accelerator = self.accelerator
        name = f"step_{progress.step:06d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            record = {"progress": progress.state_dict(), "shape": asdict(self.shape)}
            write_atomic(tmp / PROGRESS_FILE, json.dumps(record, indent=2) + "\n")
            write_atomic(tmp / COMPLETE_MARKER, "")
            _fsync_dir(tmp)
            if final.exists():  # the same step saved by a run that was later killed: ours to replace
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._apply_retention()
        accelerator.wait_for_everyone()
        self.last_path, self.last_step = final, progress.step
        logger.info("saved checkpoint %s", final)
        return final

    def _apply_retention(self) -> None:
        complete = self.complete_checkpoints()
        for path, _ in complete[: max(0, len(complete) - self.save_total_limit)]:
            shutil.rmtree(path, ignore_errors=True)

    # --- finding and loading --------------------------------------------------------------------
    def complete_checkpoints(self) -> list[tuple[Path, int]]:
        """(path, step) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and _OURS.match(path.name) and not path.name.startswith(".tmp-") \
                    and (path / COMPLETE_MARKER).exists():
                try:
                    step = json.loads((path / PROGRESS_FILE).read_text())["progress"]["step"]
                except (OSError, ValueError, KeyError):
                    continue
                found.append((path, step))
        return sorted(found, key=lambda item: item[1])

    def remove_incomplete(self) -> None:
        """Delete temporary and unmarked checkpoint folders a killed run left behind (ours only),
        and apply retention, which a kill between a save and its clean-up may have left undone."""
        if not self.accelerator.is_main_process or not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.is_dir() and _OURS.match(path.name) and not (path / COMPLETE_MARKER).exists():
                logger.info("removing incomplete checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)
        self._apply_retention()

    def resolve_resume(self, resume: str, *, overwrite: bool) -> Path | None:
        """The checkpoint to continue from, or None for a fresh start; refuses to clobber a run."""
        if resume == "never":
            if self.complete_checkpoints() and not overwrite:
                raise ResumeError(
                    f"output.resume = \"never\" but {self.root} holds checkpoints of an earlier run. "
                    "Set output.resume = \"auto\" to continue it, choose a new output.output_dir, "
                    "or set output.overwrite = true to replace it.")
            return None
        if resume == "auto":
            complete = self.complete_checkpoints()
            return complete[-1][0] if complete else None
        path = Path(resume)
        if not (path / COMPLETE_MARKER).exists() or not (path / PROGRESS_FILE).exists():
            raise ResumeError(f"output.resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER} "
                              f"or {PROGRESS_FILE}); pick a folder under checkpoints/ or use \"auto\"")
        return path

    def load(self, path: Path) -> Progress:
        """Restore every process's state from `path`; returns the saved progress."""
        record = json.loads((path / PROGRESS_FILE).read_text())
        saved = RunShape(**record["shape"])
        differences = [f"{name}: checkpoint {getattr(saved, name)}, now {getattr(self.shape, name)}"
                       for name in asdict(saved) if getattr(saved, name) != getattr(self.shape, name)]
        if differences:
            raise ResumeError(
                f"cannot resume exactly from {path}: the run's shape changed ({'; '.join(differences)}). "
                "Restore the original settings, or start a fresh run with a new output.output_dir "
                "(or output.resume = \"never\" with output.overwrite = true).")
        self.accelerator.load_state(str(path))
        progress = Progress()
        progress.load_state_dict(record["progress"])
        self.last_path, self.last_step = path, progress.step
        return progress


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
