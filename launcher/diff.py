"""`python -m launcher diff RUN_A RUN_B`: what differs between two runs, and where their losses part.

    python -m launcher diff outputs/run-a outputs/run-b

Compares the two runs' jobs (`job.toml`) and manifests (`manifest.json`: data, tokenizer, model,
versions, hardware) key by key, old -> new, then their per-step training losses (`metrics.jsonl`):
the first logged step where they differ, with both losses, or that they are identical. A job file
may be given instead of a folder (its `output.output_dir` is used). Only reads; exit 0, or 2 when
a path is not a run folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, load_config
from loop.run_dir import MANIFEST, is_run_folder
from loop.status import read_jsonl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# Keys that differ between any two runs; counted in one line instead of listed.
ALWAYS_DIFFERENT = ("created", "run_id", "resumed_from_step", "output.output_dir", "data.cache_path")
MAX_VALUE_CHARS = 70
_HEX = re.compile(r"^[0-9a-f]{24,}$")


def main_diff(run_a: str | os.PathLike, run_b: str | os.PathLike) -> int:
    """Print the differences; 0, or 2 when a path is not a run folder."""
    try:
        print(diff_text(run_a, run_b))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def diff_text(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    """The report `python -m launcher diff` prints; `ConfigError` when a path is not a run folder."""
    a, b = run_folder(Path(run_a)), run_folder(Path(run_b))
    lines = [f"diff {a} -> {b}", ""]
    quiet: list[str] = []

    job_a, job_b = flatten(_read_job(a)), flatten(_read_job(b))
    lines += _section("job (job.toml)", job_a, job_b, quiet)

    manifest_a, manifest_b = _read_manifest(a), _read_manifest(b)
    if manifest_a is None or manifest_b is None:
        missing = " and ".join(str(p) for p, m in ((a, manifest_a), (b, manifest_b)) if m is None)
        lines += [f"manifest: no {MANIFEST} in {missing} (a run of an earlier version); not compared", ""]
    else:
        without_job = [{k: v for k, v in m.items() if k != "job"} for m in (manifest_a, manifest_b)]
        lines += _section(f"manifest ({MANIFEST})", flatten(without_job[0]), flatten(without_job[1]), quiet)

    lines += loss_lines(_losses(a), _losses(b))
    if quiet:
        lines += ["", f"(also differ, as between any two runs: {', '.join(dict.fromkeys(quiet))})"]
    return "\n".join(lines).rstrip() + "\n"


def run_folder(path: Path) -> Path:
    """The run folder `path` names (a job file names its `output.output_dir`); `ConfigError` if none."""
    if path.is_file() and path.suffix == ".toml":
        path = load_config(path, check_environment=False).output_path
    if not path.is_dir():
        raise ConfigError(f"{path}: no such folder; give two run folders (output.output_dir of each run) "
                          "or their job files")
    if not is_run_folder(path) or not (path / "job.toml").is_file():
        raise ConfigError(f"{path} is not a run folder of this project (no run marker and job.toml); give the "
                          "output.output_dir of a run")
    return path


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            flat.update(flatten(item, name))
        else:
            flat[name] = item
    return flat


def _section(title: str, a: dict[str, Any], b: dict[str, Any], quiet: list[str]) -> list[str]:
    changed = []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old == new:
            continue
        if key in ALWAYS_DIFFERENT:
            quiet.append(key)
            continue
        changed.append(f"  {key}: {show(old)} -> {show(new)}")
    if not changed:
        return [f"{title}: the same", ""]
    return [f"{title}: {len(changed)} difference{'s' if len(changed) > 1 else ''}", *changed, ""]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def show(value: Any) -> str:
    """A value on one short line: long hashes cut to 12 characters, long text to about 70."""
    if isinstance(value, _Absent):
        return "(absent)"
    if isinstance(value, str) and _HEX.match(value):
        return value[:12] + "..."
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, bool, type(None))) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 3] + "..."


def loss_lines(a: dict[int, float], b: dict[int, float]) -> list[str]:
    """Where two runs' per-step training losses first differ, or that they are identical."""
    common = sorted(a.keys() & b.keys())
    lines = []
    if not common:
        lines.append("losses (metrics.jsonl): no logged step in common"
                     + ("" if a and b else f" ({'neither run' if not (a or b) else 'one run'} logged a loss)"))
        return lines
    first = next((step for step in common if not _same(a[step], b[step])), None)
    if first is None:
        lines.append(f"losses (metrics.jsonl): identical over the {len(common)} logged steps in common "
                     f"({_steps(common)})")
    else:
        lines.append(f"losses (metrics.jsonl): first differ at step {first}: {a[first]!r} -> {b[first]!r} "
                     f"(relative difference {_relative(a[first], b[first]):.2e})")
        same_before = [s for s in common if s < first]
        if same_before:
            lines.append(f"  identical before it ({_steps(same_before)})")
        last = common[-1]
        lines.append(f"  at the last step in common, {last}: {a[last]!r} -> {b[last]!r}")
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a:
        lines.append(f"  logged only in the first run: {_steps(only_a)}")
    if only_b:
        lines.append(f"  logged only in the second run: {_steps(only_b)}")
    return lines


def _same(x: float | None, y: float | None) -> bool:
    if x is None or y is None:
        return x is y
    return x == y or (math.isnan(x) and math.isnan(y))


def _relative(x: float | None, y: float | None) -> float:
    if x is None or y is None:
        return math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-30)


def _steps(steps: list[int]) -> str:
    if len(steps) == 1:
        return f"step {steps[0]}"
    if steps == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    return f"{len(steps)} steps from {steps[0]} to {steps[-1]}"


def _read_job(folder: Path) -> dict:
    try:
        return tomllib.loads((folder / "job.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder / 'job.toml'}: cannot read the run's job ({error})") from None


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder / MANIFEST}: cannot read the manifest ({error})") from None
    return manifest if isinstance(manifest, dict) else None


def _losses(folder: Path) -> dict[int, float]:
    """{step: training loss} from metrics.jsonl (the last record of a step wins)."""
    losses = {}
    for record in read_jsonl(folder / "metrics.jsonl"):
        if "loss" in record and isinstance(record.get("step"), int):
            losses[record["step"]] = record["loss"]
    return losses
