"""What a run folder says, for people: a status summary while it trains and a report when it is done.

    python -m launcher status outputs/run      # state, step, loss, ETA, last checkpoint, latest sample
    python -m launcher report outputs/run      # writes outputs/run/report.md and loss.png

    from launcher.report import status_text, write_report
    print(status_text("outputs/run"))
    paths = write_report("outputs/run")        # [report.md, loss.png]; no loss.png without matplotlib

Everything here only reads what the training loop writes (`status.json`, `metrics.jsonl`,
`result.json`, `job.toml`, `checkpoints/`), so it works on a live run, a finished one, a killed
one and a copy on another machine. Missing or half-written files are expected, not errors; only a
folder that is not a run folder at all raises `ConfigError`. A job file may be given instead of the
folder: its `output.output_dir` is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, load_config
from launcher.result import write_atomic
from loop.checkpoint import complete_checkpoints
from loop.run_dir import is_run_folder
from loop.status import read_jsonl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

# `status.json` is rewritten at every logging step; a "running" run silent for longer than this
# was probably killed (or is stuck in a collective). Slow steps with a large `logging_steps` can
# exceed it legitimately, hence the question mark in the message.
STALE_AFTER_SEC = 600


@dataclass
class RunFiles:
    """The files of one output folder, each None or empty when absent or unreadable."""

    path: Path
    status: dict | None = None
    result: dict | None = None
    job: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    checkpoint: tuple[Path, int] | None = None

    @property
    def state(self) -> str:
        """running | completed | failed | not started."""
        if self.status and self.status.get("status"):
            return str(self.status["status"])
        if self.result is not None:  # e.g. a copy of a run folder without its status.json
            return "completed" if self.result.get("success") else "failed"
        return "not started"

    @property
    def current_result(self) -> dict:
        """result.json, unless the run is going again: then it is an earlier attempt's result."""
        return {} if self.state == "running" or self.result is None else self.result

    @property
    def error(self) -> str | None:
        if self.state != "failed":
            return None
        return (self.status or {}).get("error_message") or self.current_result.get("error")

    @property
    def seconds_since_update(self) -> float | None:
        stamp = (self.status or {}).get("timestamp")
        return time.time() - stamp if _is_number(stamp) else None

    @property
    def is_stalled(self) -> bool:
        age = self.seconds_since_update
        return self.state == "running" and age is not None and age > STALE_AFTER_SEC

    def training_records(self) -> list[dict]:
        return [r for r in self.metrics if "loss" in r]

    def eval_records(self) -> list[dict]:
        return [r for r in self.metrics if _is_number(r.get("eval_loss"))]


def read_run(path: str | os.PathLike) -> RunFiles:
    """Read an output folder (or the `output_dir` of a job file); `ConfigError` if it is not one."""
    output_dir = _resolve_output_dir(Path(path))
    if not is_run_folder(output_dir):
        raise ConfigError(f"{output_dir} holds no run of this project (no run marker, status.json or "
                          "result.json); pass the run's output.output_dir or its job file")
    return RunFiles(path=output_dir, status=_read_json(output_dir / "status.json"),
               result=_read_json(output_dir / "result.json"), job=_read_toml(output_dir / "job.toml"),
               metrics=read_jsonl(output_dir / "metrics.jsonl"), checkpoint=last_complete_checkpoint(output_dir))


def _resolve_output_dir(path: Path) -> Path:
    if path.is_file() and path.suffix == ".toml":
        path = load_config(path, check_environment=False).output_path
    if not path.exists():
        raise ConfigError(f"{path}: no such folder. A run creates its output.output_dir once the model and "
                          "data are loaded; check the path, or wait a moment if the run has just started.")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run's output folder; pass the folder or the job file (.toml)")
    return path


def last_complete_checkpoint(output_dir: Path) -> tuple[Path, int] | None:
    """(path, step) of the newest complete checkpoint, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


# --- status ------------------------------------------------------------------------------------

def status_text(output_dir: str | os.PathLike) -> str:
    """A short human summary of a run, live or finished. Raises `ConfigError` for a non-run folder."""
    run = read_run(output_dir)
    lines = [f"run: {run.path}"]
    if run.status is None and run.result is None:
        lines.append("state: not started (no status.json yet: the run is still loading its model and data, "
                     "or has not begun)")
        return "\n".join(lines)

    status, result = run.status or {}, run.current_result
    state = run.state
    age = run.seconds_since_update
    if run.is_stalled:
        state = f"running (no update for {format_duration(age)}: stalled or killed?)"
    elif state == "running" and age is not None:
        state = f"running (updated {format_duration(max(age, 0))} ago)"
    lines.append(f"state: {state}")

    step = _first(status.get("current_step"), result.get("global_step"))
    total = _first(status.get("total_steps"), (result.get("summary") or {}).get("total_steps"))
    progress = f"step: {_fmt(step, 'd')} / {_fmt(total, 'd')}"
    if _is_number(step) and _is_number(total) and total > 0:
        progress += f" ({100 * step / total:.0f}%)"
    if _is_number(status.get("epoch")):
        progress += f", epoch {status['epoch']:.2f}"
    lines.append(progress)

    last_train = (run.training_records() or [{}])[-1]
    last_eval = (run.eval_records() or [{}])[-1]
    loss = _first(status.get("loss"), result.get("final_loss"), last_train.get("loss"))
    eval_loss = _first(status.get("validation_loss"), last_eval.get("eval_loss"))
    lr = _first(status.get("learning_rate"), last_train.get("learning_rate"))
    lines.append(f"loss: {_fmt(loss, '.4f')}   eval loss: {_fmt(eval_loss, '.4f')}   lr: {_fmt(lr, '.3g')}")
    speed = f"tokens/s: {_fmt(_first(status.get('tokens_per_sec'), last_train.get('tokens_per_sec')), ',.0f')}"
    if run.state == "running" and not run.is_stalled:
        speed += f"   ETA: {format_duration(status.get('eta_sec'))}"
    elif _is_number(result.get("runtime_sec")):
        speed += f"   runtime: {format_duration(result['runtime_sec'])}"
    lines.append(speed)

    if run.checkpoint:
        lines.append(f"last checkpoint: step {run.checkpoint[1]} ({run.checkpoint[0]})")
    else:
        lines.append("last checkpoint: none yet")
    if run.state == "completed" and (run.path / "final").is_dir():
        lines.append(f"final model: {run.path / 'final'}")
    lines += _preview_lines(status.get("preview"))
    if run.error:
        lines.append(f"error: {run.error}")
    return "\n".join(lines)


def _preview_lines(preview: Any, width: int = 300) -> list[str]:
    if not isinstance(preview, dict) or not preview.get("samples"):
        return []
    lines = [f"sample generations at step {_fmt(preview.get('step'), 'd')}:"]
    for sample in preview["samples"]:
        # Prompts end with the part that matters (the last user turn and the generation prompt).
        prompt = _one_line(str(sample.get("prompt", "")))
        completion = _one_line(str(sample.get("completion", "")))
        lines.append(f"  prompt:     {'...' if len(prompt) > width else ''}{prompt[-width:]}")
        lines.append(f"  completion: {completion[:width]}{'...' if len(completion) > width else ''}")
    return lines


# --- report ------------------------------------------------------------------------------------

def write_report(output_dir: str | os.PathLike) -> list[Path]:
    """Write `report.md` (and `loss.png` when matplotlib is installed) into the run folder.

    Returns the paths written. Raises `ConfigError` for a folder that is not a run.
    """
    run = read_run(output_dir)
    if run.state == "not started" and not run.metrics:
        raise ConfigError(f"{run.path}: nothing to report yet (no status.json, result.json or metrics.jsonl)")
    written = []
    plot_path = run.path / "loss.png"
    skipped = plot_losses(run.metrics, plot_path, title=str(run.path))
    if skipped:
        logger.warning("no loss plot: %s", skipped)
    else:
        written.append(plot_path)
    report_path = run.path / "report.md"
    write_atomic(report_path, report_markdown(run, plot=None if skipped else plot_path.name, skipped=skipped))
    return [report_path, *written]


def report_markdown(run: RunFiles, *, plot: str | None = None, skipped: str | None = None) -> str:
    """The markdown summary of a run; `plot` is the file name of the loss plot, when there is one."""
    job, result, status = run.job or {}, run.current_result, run.status or {}
    summary = result.get("summary") or {}
    model, data, h = job.get("model", {}), job.get("data", {}), job.get("hyperparams", {})
    training, evals = run.training_records(), run.eval_records()
    last_train = training[-1] if training else {}

    outcome = run.state
    if run.is_stalled:
        outcome = f"running, but no update for {format_duration(run.seconds_since_update)} (stalled or killed?)"
    if run.error:
        outcome += f": {run.error}"
    batch = "n/a"
    if h:
        batch = f"{h.get('batch_size')} x {h.get('gradient_accumulation')} accumulation"
        if summary.get("world_size"):
            batch += f" x {summary['world_size']} process(es)"
    lr = "n/a"
    if h:
        lr = f"{_fmt(h.get('learning_rate'), 'g')} ({h.get('lr_scheduler')}, warmup {h.get('warmup_steps')})"
    if job.get("lora", {}).get("enabled"):
        lr += f", LoRA r={job['lora'].get('r')}"
    step = _first(result.get("global_step"), status.get("current_step"))
    total = _first(status.get("total_steps"), summary.get("total_steps"))
    eval_text = "n/a"
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        eval_text = (f"best {best['eval_loss']:.4f} (step {best.get('step')}), "
                     f"last {evals[-1]['eval_loss']:.4f} (step {evals[-1].get('step')})")
    rows = [
        ("outcome", outcome),
        ("model", model.get("model_path", "n/a")),
        ("data", data.get("dataset_path", "n/a")),
        ("batch", batch),
        ("learning rate", lr),
        ("steps", f"{_fmt(step, 'd')} / {_fmt(total, 'd')}"),
        ("final train loss", _fmt(_first(result.get("final_loss"), last_train.get("loss")), ".4f")),
        ("eval loss", eval_text),
        ("tokens trained", _fmt(_first(summary.get("num_train_tokens"), last_train.get("num_tokens")), ",d")),
        ("tokens/s", _fmt(_first(summary.get("tokens_per_sec"), last_train.get("tokens_per_sec")), ",.0f")),
        ("runtime", format_duration(_first(result.get("runtime_sec"), last_train.get("elapsed_sec")))),
        ("last checkpoint", f"step {run.checkpoint[1]} (`{run.checkpoint[0].relative_to(run.path)}`)"
         if run.checkpoint else "none"),
    ]
    if (run.path / "final").is_dir():
        rows.append(("final model", "`final/`"))
    lines = [f"# Training report: {run.path.name}", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in rows]
    lines.append("")
    if plot:
        lines += [f"![training and eval loss, learning rate]({plot})", ""]
    else:
        lines += [f"No loss plot: {skipped}.", ""]
    preview = _preview_lines(status.get("preview"), width=1000)
    if preview:
        lines += ["## Latest sample generations", "", "```", *preview, "```", ""]
    return "\n".join(lines)


def plot_losses(metrics: list[dict], path: Path, *, title: str = "") -> str | None:
    """Write the loss plot to `path`; returns why it was not written, or None when it was."""
    try:
        # The object-oriented API with the Agg canvas: no pyplot, so no global backend switch and
        # no GUI, whatever process imports this.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or trainer-engine[plot])"

    def series(key: str) -> tuple[list, list]:
        points = [(r["step"], r[key]) for r in metrics if _is_number(r.get(key)) and _is_number(r.get("step"))]
        return [s for s, _ in points], [v for _, v in points]

    train, evals, lrs = series("loss"), series("eval_loss"), series("learning_rate")
    if not train[0] and not evals[0]:
        return "no metrics yet"
    figure = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title, fontsize="medium")
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    loss_axis.plot(*train, label="train loss")
    if evals[0]:
        loss_axis.plot(*evals, marker="o", label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    loss_axis.grid(alpha=0.3)
    lr_axis.plot(*lrs, color="tab:green")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.savefig(path, dpi=100)
    return None


# --- command-line entry points -------------------------------------------------------------------

def main_status(output_dir: str | os.PathLike) -> int:
    """`python -m launcher status DIR`: print the summary; 0, or 2 for a folder that is not a run."""
    try:
        print(status_text(output_dir))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main_report(output_dir: str | os.PathLike) -> int:
    """`python -m launcher report DIR`: write the report, print its paths; 0, 2 (not a run), 1 (cannot write)."""
    try:
        paths = write_report(output_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the report: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"wrote {path}")
    if not any(path.suffix == ".png" for path in paths):
        print("no loss plot (see report.md for why)")
    return 0


# --- small helpers -------------------------------------------------------------------------------

def format_duration(seconds: Any) -> str:
    """45s, 3m12s, 2h05m, 1d03h; n/a for a missing or non-finite value."""
    if not _is_number(seconds):
        return "n/a"
    seconds = int(round(max(seconds, 0)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _first(*values: Any) -> Any:
    """The first value that is not None (a status field may be present but null)."""
    return next((v for v in values if v is not None), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    """`value` formatted with `spec`; n/a for None, nan/inf as such, anything unexpected as text."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, float) and spec.endswith("d") and value.is_integer():
        value = int(value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "\\n")


def _cell(value: Any) -> str:
    return _one_line(str(value)).replace("|", "\\|")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_toml(path: Path) -> dict | None:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # TOMLDecodeError is a ValueError
        return None
