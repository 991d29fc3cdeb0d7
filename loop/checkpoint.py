"""Step checkpoints: the one module that decides when to save, what is complete, and where to resume.

Layout of `output_dir/checkpoints/step_000050/`:
    Accelerate's `save_state` files   model, optimizer, scaler, RNG state of every process (tensors,
                                      loaded with `weights_only=True`; nothing here is unpickled)
    progress.json                     the run id, step, epoch, data position, tokens seen, the
                                      scheduler's state, the run's shape, settings and data digest
                                      (and with `data.streaming`, the stream's place: `stream`)
    COMPLETE                          written last: the size of every file above. A folder without
                                      it is never resumed from; one whose files differ is corrupt

A checkpoint is written into `.tmp-step_000050/` and renamed when complete, so a kill at any moment
leaves either the old set of checkpoints or the old set plus one complete new one (and maybe a
temporary folder, removed by the next run). Progress is read from `progress.json`, never parsed
from folder names. Resume takes only checkpoints of the folder's own run (its run id), checks that
the job still trains the same thing (`RESUME_SETTINGS`, the data digest), and falls back past a
corrupt newest checkpoint to the newest one that loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from launcher.config import ConfigError, JobConfig, toml_value
from launcher.result import write_atomic

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
PROGRESS_FILE = "progress.json"
_OURS = re.compile(r"^(\.tmp-)?step_\d{6,}$")
# Serialised files Accelerate loads itself, all with weights_only=True; anything else that can hold
# a pickle is refused rather than loaded.
_PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
LEGACY_RUN_ID = "legacy"  # checkpoints (and folders) of versions that recorded no run id

# Job keys that shape what a resumed run computes. A change to one is refused on resume; the keys in
# ALLOWED_CHANGES continue with the new value when `output.resume_changes = "allow"`.
RESUME_SETTINGS = (
    "model.dtype", "model.attn_implementation", "model.load_in_4bit", "model.gradient_checkpointing",
    "data.max_length", "data.packing", "data.shuffle", "data.on_bad_record", "data.too_long", "data.chat_template",
    "data.group_by_length", "data.pad_to_multiple_of", "data.streaming", "data.stream_buffer",
    "profile.name", "profile.system_prompt", "profile.train_on",
    "hyperparams.batch_size", "hyperparams.gradient_accumulation", "hyperparams.learning_rate",
    "hyperparams.lr_scheduler", "hyperparams.warmup_steps", "hyperparams.num_epochs", "hyperparams.max_steps",
    "hyperparams.max_grad_norm", "hyperparams.weight_decay", "hyperparams.adam_betas", "hyperparams.adam_epsilon",
    "hyperparams.fp_precision", "hyperparams.seed", "hyperparams.save_steps", "hyperparams.eval_steps",
    "monitoring.validation_split", "monitoring.validation_max_samples",
    "lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.modules_to_save",
)
ALLOWED_CHANGES = (
    "hyperparams.max_steps", "hyperparams.num_epochs", "hyperparams.learning_rate", "hyperparams.lr_scheduler",
    "hyperparams.warmup_steps", "hyperparams.max_grad_norm", "hyperparams.weight_decay", "hyperparams.adam_betas",
    "hyperparams.adam_epsilon", "hyperparams.save_steps", "hyperparams.eval_steps",
)


class ResumeError(ConfigError):
    """A checkpoint that cannot continue this job as configured."""


class CheckpointError(Exception):
    """A checkpoint folder that is incomplete, corrupt or holds what this project never writes."""


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
            value = state.get(f.name, getattr(self, f.name))
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"progress.{f.name} is {value!r}, not a count")
            setattr(self, f.name, value)


@dataclass(frozen=True)
class RunShape:
    """Settings a resumed run must share with the run that saved the checkpoint, whatever is allowed."""

    batch_size: int
    gradient_accumulation: int
    world_size: int
    num_train_examples: int
    seed: int


def resume_settings(config: JobConfig) -> dict:
    """The values of `RESUME_SETTINGS` in this job, as JSON values."""
    sections = config.to_dict()
    return {key: sections[key.split(".")[0]][key.split(".")[1]] for key in RESUME_SETTINGS}


class Checkpointer:
    def __init__(self, accelerator, output_dir: Path, *, save_steps: int, save_total_limit: int, shape: RunShape,
                 scheduler, settings: dict, data_digest: str, stream=None):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.root = self.output_dir / "checkpoints"
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.shape = shape
        self.scheduler = scheduler
        self.settings = settings
        self.data_digest = data_digest
        self.stream = stream
        """With `data.streaming`: the `StreamLoader`, whose place is saved and restored with the step."""
        self.run_id: str | None = None  # the run's id: the resumed checkpoint's, or a new run's
        self.resume_changes: dict = {}  # {key: (old, new)} applied on resume
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
            record = {"run_id": self.run_id, "progress": progress.state_dict(), "shape": asdict(self.shape),
                      "scheduler": self.scheduler.state_dict(), "settings": self.settings, "data": self.data_digest}
            if self.stream is not None:  # the same on every process: each reads the whole stream
                record["stream"] = self.stream.state_dict(progress.batches_in_epoch)
            write_atomic(tmp / PROGRESS_FILE, json.dumps(record, indent=2) + "\n")
            write_atomic(tmp / COMPLETE_MARKER, json.dumps({"files": _file_sizes(tmp)}, indent=1) + "\n")
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
        """Keep this run's newest `save_total_limit` complete checkpoints (at least the newest)."""
        mine = [(path, step) for path, step, run_id in _scan(self.output_dir) if run_id == self.run_id]
        for path, _ in mine[: max(0, len(mine) - max(self.save_total_limit, 1))]:
            shutil.rmtree(path, ignore_errors=True)

    def remove_incomplete(self, *, keep_other_runs: bool = True) -> None:
        """Delete temporary and unmarked checkpoint folders a killed run left behind (ours only), and
        apply retention, which a kill between a save and its clean-up may have left undone. A fresh
        run (`keep_other_runs=False`) also removes complete checkpoints of the runs it replaces, so
        nothing in the folder can resume into another run's weights."""
        if not self.accelerator.is_main_process or not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.is_dir() and not path.is_symlink() and _OURS.match(path.name) and \
                    not (path / COMPLETE_MARKER).exists():
                logger.info("removing incomplete checkpoint %s", path)
                shutil.rmtree(path, ignore_errors=True)
        if not keep_other_runs:
            for path, _, run_id in _scan(self.output_dir):
                if run_id != self.run_id:
                    logger.info("removing checkpoint %s of the replaced run %s", path, run_id)
                    shutil.rmtree(path, ignore_errors=True)
        self._apply_retention()

    # --- finding and loading --------------------------------------------------------------------
    def restore(self, config: JobConfig, recorded_run_id: str | None, total_steps: int) -> tuple[Path | None, Progress]:
        """Load the checkpoint this job continues from, on every process; (None, Progress()) for a
        fresh start. Raises `ResumeError` when the folder holds a run this job may not continue."""
        output = config.output
        if output.resume == "never":
            if _scan(self.output_dir) and not output.overwrite:
                raise ResumeError(
                    f"output.resume = \"never\" but {self.root} holds checkpoints of an earlier run. "
                    "Set output.resume = \"auto\" to continue it, choose a new output.output_dir, "
                    "or set output.overwrite = true to replace it.")
            return None, Progress()
        if output.resume != "auto":
            path = Path(output.resume)
            try:
                return path, self._load(path, self._verified(path), config, total_steps)
            except CheckpointError as error:
                raise ResumeError(f"output.resume: {path} cannot be resumed from: {error}. Pick a complete "
                                  "folder under checkpoints/, or use \"auto\"") from None

        current = recorded_run_id or LEGACY_RUN_ID
        candidates = [(path, step) for path, step, run_id in _scan(self.output_dir) if run_id == current]
        for path, _ in reversed(candidates):
            try:
                record = self._verified(path)
                return path, self._load(path, record, config, total_steps)
            except CheckpointError as error:
                logger.warning("checkpoint %s cannot be resumed from (%s); trying the one before it", path, error)
        if candidates:
            raise ResumeError(f"no checkpoint in {self.root} can be resumed from (each is corrupt or unreadable, "
                              "see the warnings above). Choose a new output.output_dir, or set output.resume = "
                              "\"never\" and output.overwrite = true to start again in this one.")
        return None, Progress()

    def _verified(self, path: Path) -> dict:
        """progress.json of a checkpoint whose files are all there, at their recorded sizes, and hold
        no pickle this project did not write. Raises `CheckpointError` naming what is wrong."""
        if not path.is_dir() or path.is_symlink():
            raise CheckpointError("not a checkpoint folder")
        marker = path / COMPLETE_MARKER
        if not marker.is_file():
            raise CheckpointError(f"no {COMPLETE_MARKER} marker (an interrupted save)")
        try:
            expected = json.loads(marker.read_text(encoding="utf-8"))["files"]
            record = json.loads((path / PROGRESS_FILE).read_text(encoding="utf-8"))
            record["progress"], record["shape"]  # noqa: B018 (presence)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"unreadable {COMPLETE_MARKER} or {PROGRESS_FILE} ({error})") from None
        actual = _file_sizes(path)
        for name, size in expected.items():
            if actual.get(name) != size:
                found = "missing" if name not in actual else f"{actual[name]} bytes"
                raise CheckpointError(f"{path / name} should have {size} bytes, has {found}")
        for name in actual:
            if name not in expected and name != COMPLETE_MARKER:
                raise CheckpointError(f"{path / name} was not written by this project")
        for name in actual:
            if "/" not in name and name.endswith(_PICKLE_SUFFIXES):
                _refuse_unsafe_pickle(path / name)
        return record

    def _load(self, path: Path, record: dict, config: JobConfig, total_steps: int) -> Progress:
        saved = RunShape(**record["shape"])
        differences = [f"{name}: checkpoint {getattr(saved, name)}, now {getattr(self.shape, name)}"
                       for name in asdict(saved) if getattr(saved, name) != getattr(self.shape, name)]
        if differences:
            raise ResumeError(
                f"cannot resume exactly from {path}: the run's shape changed ({'; '.join(differences)}). "
                "Restore the original settings, or start a fresh run with a new output.output_dir "
                "(or output.resume = \"never\" with output.overwrite = true).")
        changes = self._check_changes(path, record, config)
        progress = Progress()
        try:
            progress.load_state_dict(record["progress"])
        except (CheckpointError, AttributeError) as error:
            raise CheckpointError(f"{path / PROGRESS_FILE}: {error}") from None
        if progress.step > total_steps:
            raise ResumeError(f"{path} is at step {progress.step}, beyond this job's {total_steps} optimizer "
                              "steps: raise hyperparams.max_steps (or num_epochs), or start a fresh run")
        try:
            self.accelerator.load_state(str(path))
            self.scheduler.load_state_dict(record.get("scheduler") or {})
        except Exception as error:  # a file that is there, at its size, but does not load
            raise CheckpointError(f"it does not load into this job's model and optimizer "
                                  f"({type(error).__name__}: {_first_line(error)})") from None
        if self.stream is not None:
            try:
                self.stream.load_state_dict(record.get("stream"))
            except (ValueError, OSError) as error:
                raise CheckpointError(f"{path / PROGRESS_FILE}: the stream's place cannot be restored: "
                                      f"{error}") from None
        if changes:
            apply_hyperparams(self.accelerator, self.scheduler, config)
            logger.warning("resuming with changed settings (output.resume_changes = \"allow\"): %s",
                           "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in changes.items()))
        self.resume_changes = changes
        self.run_id = record.get("run_id") if isinstance(record.get("run_id"), str) else LEGACY_RUN_ID
        self.last_path, self.last_step = path, progress.step
        return progress

    def _check_changes(self, path: Path, record: dict, config: JobConfig) -> dict:
        """{key: (old, new)} of allowed changes; raises `ResumeError` naming every refused one."""
        if record.get("data") not in (None, self.data_digest):
            raise ResumeError(f"cannot resume from {path}: the training data changed since it was saved (its "
                              "content, or how it is rendered). Restore the data, or start a fresh run in a new "
                              "output.output_dir.")
        saved = record.get("settings") or {}
        changed = {key: (saved[key], value) for key, value in self.settings.items()
                   if key in saved and saved[key] != value}
        allow = config.output.resume_changes == "allow"
        refused = {k: v for k, v in changed.items() if not (allow and k in ALLOWED_CHANGES)}
        if refused:
            listed = "\n".join(f"  - {key}: {toml_value(old)} in the checkpoint, {toml_value(new)} now"
                               for key, (old, new) in refused.items())
            allowable = [k for k in refused if k in ALLOWED_CHANGES]
            hint = (" Set output.resume_changes = \"allow\" to continue with the new "
                    f"{', '.join(allowable)}." if allowable and not allow else "")
            raise ResumeError(f"cannot resume from {path}: the job changed since it was saved:\n{listed}\n"
                              f"Restore the old values, or start a fresh run in a new output.output_dir.{hint}")
        return changed


def apply_hyperparams(accelerator, scheduler, config: JobConfig) -> None:
    """Put the job's optimizer settings into a restored optimizer and scheduler (which hold the
    saved ones), and set each group's learning rate for the resumed step from the new schedule."""
    h = config.hyperparams
    optimizer = scheduler.optimizer
    for index, group in enumerate(optimizer.param_groups):
        group["betas"] = tuple(h.adam_betas)
        group["eps"] = h.adam_epsilon
        if index == 0:  # build_optimizer: group 0 decays, group 1 (biases and norms) never does
            group["weight_decay"] = h.weight_decay
    scheduler.base_lrs = [h.learning_rate for _ in optimizer.param_groups]
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def complete_checkpoints(output_dir: Path) -> list[tuple[Path, int]]:
    """(path, step) of every complete checkpoint in a run folder, oldest first; the step comes from
    progress.json. The one scan of `checkpoints/`, shared by resume, retention, `status` and `report`."""
    return [(path, step) for path, step, _ in _scan(output_dir)]


def _scan(output_dir: Path) -> list[tuple[Path, int, str]]:
    """(path, step, run id) of every complete checkpoint, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and not path.is_symlink() and _OURS.match(path.name) and not path.name.startswith(".tmp-") \
                and (path / COMPLETE_MARKER).exists():
            try:
                record = json.loads((path / PROGRESS_FILE).read_text())
                step = record["progress"]["step"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(step, int) and not isinstance(step, bool):
                run_id = record.get("run_id")
                found.append((path, step, run_id if isinstance(run_id, str) else LEGACY_RUN_ID))
    return sorted(found, key=lambda item: item[1])


def _file_sizes(folder: Path) -> dict[str, int]:
    """Size of every file below `folder`, by relative path (symbolic links are not followed)."""
    sizes = {}
    for dirpath, _, filenames in os.walk(folder):
        for filename in filenames:
            path = Path(dirpath) / filename
            if filename != COMPLETE_MARKER or path.parent != folder:
                sizes[path.relative_to(folder).as_posix()] = path.lstat().st_size
    return sizes


def _refuse_unsafe_pickle(path: Path) -> None:
    """Raise `CheckpointError` if `path` is a pickle that names anything beyond tensors and numbers.

    Reads only the pickle's opcodes (no object is built, nothing runs). Accelerate loads these files
    with `weights_only=True`; this refuses early, with the path, what that would refuse mid-load, and
    also any file a plain `torch.load` would run code from.
    """
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    if path.name.startswith("custom_checkpoint_"):
        raise CheckpointError(f"{path} is a pickle this project never writes (its scheduler state is JSON)")
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable tensor file ({_first_line(error)})") from None
    if unsafe:
        raise CheckpointError(f"{path} holds a pickle that would import {', '.join(unsafe[:3])}: refused")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:300] if text else type(error).__name__)


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

