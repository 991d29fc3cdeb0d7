"""Helpers shared by the reliability tests: job files, subprocess runs, folder snapshots, statistics.

Imported by the tests as `from .reliability_helpers import ...`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from launcher.config import toml_value

REPO = Path(__file__).resolve().parents[2]
STATS_ENV = "RELIABILITY_STATS_DIR"
STEP_DIR = re.compile(r"^step_\d{6,}$")




@functools.lru_cache(maxsize=1)
def _repository_conftest():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_repository_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_records(count: int = 12) -> list[dict[str, Any]]:
    """The repository's `tests/conftest.py:chat_records` (loaded by path: which module is `conftest`
    depends on what pytest collected last)."""
    return _repository_conftest().chat_records(count)


def write_records(path: Path, records: list[Any]) -> Path:
    """One JSON value per line; a `str` item is written as is (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
                    encoding="utf-8")
    return path


def job_text(values: dict[str, Any]) -> str:
    """TOML for dotted `section.key` values, sections in first-seen order."""
    sections: dict[str, list[str]] = {}
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    return "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())


def small_job(folder: Path, model_dir: Path, records: list[Any] | None = None, **overrides: Any) -> Path:
    """A small CPU fp32 job in `folder/job.toml` (data `folder/train.jsonl`, output `folder/out`)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_records(folder / "train.jsonl", chat_records(12) if records is None else records)
    values: dict[str, Any] = {
        "model.model_path": str(model_dir),
        "data.dataset_path": "train.jsonl",
        "data.cache_dir": "cache",
        "data.max_length": 128,
        "hyperparams.batch_size": 2,
        "hyperparams.learning_rate": 1e-3,
        "hyperparams.fp_precision": "fp32",
        "hyperparams.save_steps": 0,
        "hyperparams.max_steps": 4,
        "output.output_dir": "out",
        "environment.logging_steps": 1,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    job = folder / "job.toml"
    job.write_text(job_text(values), encoding="utf-8")
    return job


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m launcher` children: one thread (2 busy cores), no hub, no telemetry."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("TRAINER_ENGINE_DEBUG", None)
    env.update(extra)
    return env


def launcher_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "launcher", *map(str, args)]


def run_launcher(*args: str | Path, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_command(*args), cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout, **popen)


# --- reading what a run leaves -------------------------------------------------------------------

def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first, judged independently of the product."""
    root = output_dir / "checkpoints"
    found = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        if not (path.is_dir() and STEP_DIR.match(path.name) and (path / "COMPLETE").is_file()):
            continue
        try:
            step = json.loads((path / "progress.json").read_text())["progress"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append((int(step), path))
    return sorted(found)


def read_json_if_present(path: Path) -> dict | None:
    """The parsed file, or None when absent; a file that does not parse fails the test."""
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as error:
        raise AssertionError(f"{path} does not parse ({error}): {text[:300]!r}") from None


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or "<dir>") of everything under `folder`, for before/after comparisons."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_stats(name: str, stats: dict) -> Path | None:
    """Write `stats` to `$RELIABILITY_STATS_DIR/name.json` when the variable is set (the figures script)."""
    folder = os.environ.get(STATS_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
