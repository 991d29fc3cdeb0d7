"""What the tests and the benchmarks share: chat records, job files, launcher processes, run folders.

    from helpers import small_job, run_launcher        # a test (pytest puts tests/ on sys.path)
    from tests.helpers import write_job, write_jsonl   # a benchmark (run from the repository root)

Fixtures (the tiny model, `make_job`) live in tests/conftest.py; everything here is a plain function,
so benchmarks and subprocess-starting tests can use it outside pytest too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from launcher.config import toml_value

REPO = Path(__file__).resolve().parent.parent
STATS_ENV = "RELIABILITY_STATS_DIR"
STEP_DIR = re.compile(r"^step_\d{6,}$")


# --- data ----------------------------------------------------------------------------------------

TOPICS = ["the capital of France", "reversing a list in Python", "gradient descent", "a haiku about autumn",
          "good morning in Spanish", "the plot of a heist film", "photosynthesis", "SQL GROUP BY"]


LONG_FORM_ENV = "TRAINER_ENGINE_LONG"
"""`TRAINER_ENGINE_LONG=1` (or `pytest --long`, which sets it) asks every suite for its long form:
40 kill trials, 25x the job-loader examples, 10x the record-reader examples."""


def long_form() -> bool:
    """True when the long form is asked for (RELIABILITY_LONG and HYPOTHESIS_LONG are older names)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes")
               for name in (LONG_FORM_ENV, "RELIABILITY_LONG", "HYPOTHESIS_LONG"))


def chat_records(count: int = 16, start: int = 0) -> list[dict[str, Any]]:
    """`count` small chat records of varied lengths (some with a system prompt, some two-turn).

    Record i is always the same, so `chat_records(4, start=100)` gives records no `chat_records(100)` holds.
    """
    records = []
    for i in range(start, start + count):
        topic = TOPICS[i % len(TOPICS)]
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"Tell me about {topic}."},
                     {"role": "assistant", "content": f"Here is a short answer about {topic}." + " Sure." * (i % 5)}]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "Thank you! Could you clarify?"},
                         {"role": "assistant", "content": f"You're welcome. In one sentence: {topic}."}]
        records.append({"messages": messages})
    return records


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    """One JSON value per line; a `str` item is written as is (for malformed lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# --- job files -----------------------------------------------------------------------------------

def job_toml(values: dict[str, Any]) -> str:
    """TOML for dotted `section.key` values, sections in first-seen order; a None value leaves its key out."""
    sections: dict[str, list[str]] = {}
    for dotted, value in values.items():
        if value is not None:
            section, key = dotted.split(".", 1)
            sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    return "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())


def write_job(folder: str | Path, model_dir: str | Path, records: list[Any] | None = None, *,
              validation_records: list[Any] | None = None, **dotted: Any) -> Path:
    """`folder/job.toml` for the model in `model_dir`; its path.

    The job reads `train.jsonl`, caches tokenized data in `cache` and writes to `out`, all in `folder`;
    `records` (when given) are written to `folder/train.jsonl`, `validation_records` to
    `folder/validation.jsonl` (which the job then reads). `dotted` keys (`"section.key"`, or
    `section__key` as a keyword) override or add values; None removes a key.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"model.model_path": str(model_dir), "data.dataset_path": "train.jsonl",
                              "data.cache_dir": "cache", "output.output_dir": "out"}
    if records is not None:
        write_jsonl(folder / "train.jsonl", records)
    if validation_records is not None:
        write_jsonl(folder / "validation.jsonl", validation_records)
        values["data.validation_path"] = "validation.jsonl"
    values.update({key.replace("__", "."): value for key, value in dotted.items()})
    job = folder / "job.toml"
    job.write_text(job_toml(values), encoding="utf-8")
    return job


# A few seconds on a CPU: short rows, fp32, 4 steps, a metrics record each step, no step checkpoints.
SMALL_JOB = {"data.max_length": 128, "hyperparams.batch_size": 2, "hyperparams.learning_rate": 1e-3,
             "hyperparams.fp_precision": "fp32", "hyperparams.save_steps": 0, "hyperparams.max_steps": 4,
             "environment.logging_steps": 1}


# Adam turns rounding noise in near-zero gradients into full-size updates (m / sqrt(v) is about +-1
# whatever the gradient's size). With this epsilon, runs that differ only in how the same examples are
# batched (and so in rounding) end within rounding of each other, as exactness tests need.
ROUNDING_SAFE_ADAM = {"hyperparams.adam_epsilon": 1e-6}


# A learning rate and a weight decay of 10 (the largest a job accepts), unclipped: AdamW scales every
# matrix by (1 - 10 x 10) = -99 a step, so the weights overflow fp32 and the loop meets a non-finite
# value within about ten steps.
EXPLODING = {"hyperparams.learning_rate": 10.0, "hyperparams.weight_decay": 10.0, "hyperparams.max_grad_norm": 0.0}


def small_job(folder: str | Path, model_dir: str | Path, records: list[Any] | None = None, **dotted: Any) -> Path:
    """`write_job` with `SMALL_JOB`'s settings and `chat_records(12)` unless `records` are given."""
    return write_job(folder, model_dir, chat_records(12) if records is None else records,
                     **{**SMALL_JOB, **dotted})


def job_config(model_dir: str | Path, output_dir: str | Path, **dotted: Any):
    """A `JobConfig` for the model in `model_dir` built in memory (no data file needed), fp32, with dotted keys."""
    from launcher.config import config_from_dict

    raw: dict[str, dict[str, Any]] = {
        "model": {"model_path": str(model_dir)}, "data": {"dataset_path": "train.jsonl"},
        "output": {"output_dir": str(output_dir)}, "hyperparams": {"fp_precision": "fp32"}}
    for key, value in dotted.items():
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, check_environment=False)


# --- the launcher --------------------------------------------------------------------------------

def subprocess_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """This environment for child processes: `threads` torch threads (None: torch's choice), no hub, no telemetry."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("TRAINER_ENGINE_DEBUG", None)
    env.update(extra)
    return env


def launcher_command(*args: str | Path) -> list[str]:
    """`python -m launcher ARGS...` with this interpreter."""
    return [sys.executable, "-m", "launcher", *map(str, args)]


def run_launcher(*args: str | Path, timeout: float = 300, env: dict | None = None,
                 **popen: Any) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS...` in the repository with `subprocess_env()`, output captured as text."""
    return subprocess.run(launcher_command(*args), cwd=REPO, env=env or subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, **popen)


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    """`launcher.cli.main(args)` in this process: (exit code, stdout, stderr)."""
    from launcher.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- what a run leaves ---------------------------------------------------------------------------

def read_metrics(output_dir: str | Path, key: str = "loss") -> list[dict]:
    """The records of `output_dir/metrics.jsonl` that hold `key` (training records by default); a torn line fails."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if key in r]


def final_weights(output_dir: str | Path) -> dict:
    """The tensors of `output_dir/final/model.safetensors`."""
    from safetensors.torch import load_file

    return load_file(Path(output_dir) / "final" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Same tensor names, and each tensor's largest difference within `rel` of its largest value (0: equal)."""
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp_min(1e-12)
        assert float((a[name] - b[name]).abs().max() / scale) <= rel, name


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first, judged independently of the product."""
    root = Path(output_dir) / "checkpoints"
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


def current_step(output_dir: str | Path) -> int:
    """The step `status.json` reports (0 while it is absent or being replaced), to wait for a run to get going."""
    try:
        return json.loads((Path(output_dir) / "status.json").read_text()).get("current_step") or 0
    except (OSError, ValueError):
        return 0


def read_json_if_present(path: str | Path) -> dict | None:
    """The parsed file, or None when absent; a file that does not parse fails the test."""
    path = Path(path)
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as error:
        raise AssertionError(f"{path} does not parse ({error}): {text[:300]!r}") from None


def snapshot(folder: str | Path) -> dict[str, str]:
    """Relative path -> sha256 (or "<dir>") of everything under `folder`, for before/after comparisons."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, read from /proc (processes that end meanwhile are left out)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # a process that just ended
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(stack.pop())
        stack.extend(children.get(tree[-1], []))
    return tree


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_stats(name: str, stats: dict) -> Path | None:
    """Write `stats` to `$RELIABILITY_STATS_DIR/name.json` when the variable is set (scripts/reliability_figures.py)."""
    folder = os.environ.get(STATS_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2, default=str) + "\n", encoding="utf-8")
    return path


class PicklePayload:
    """Unpickling this creates the file `path`: proof that a pickle ran code."""

    def __init__(self, path: str | Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def model_with_remote_code(model_dir: str | Path, folder: str | Path, ran: str | Path, body: str = "") -> Path:
    """A copy of `model_dir` in `folder` whose config.json names Python code of the folder (`auto_map`),
    a subclass of the model that creates the file `ran` when imported: proof that the folder's code ran.
    `body`: more of the subclass (indented), e.g. a `forward` of its own."""
    import shutil

    folder = Path(shutil.copytree(model_dir, folder))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    base_config, base_model = config["model_type"].capitalize() + "Config", config["architectures"][0]
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(ran)!r}).touch()\n"
        f"from transformers import {base_config}, {base_model}\n\n"
        f"class CustomConfig({base_config}):\n    pass\n\n"
        f"class CustomModel({base_model}):\n    config_class = CustomConfig\n{body}")
    return folder


def in_fresh_process(task: Callable[[], Any]) -> Any:
    """`task()` in a child forked from this process (POSIX); its JSON-able result. The child's exception
    is raised here as a RuntimeError with its traceback. For measuring memory from a clean start."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        code = 0
        try:
            payload = {"ok": task()}
        except BaseException as error:  # reported to the parent, which raises
            import traceback

            payload, code = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}, 1
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(payload))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    payload = json.loads(text) if text else {"error": "the child died without a report"}
    if "error" in payload:
        raise RuntimeError(payload["error"])
    return payload["ok"]


# --- models --------------------------------------------------------------------------------------

def random_batch(vocab_size: int, rows: int = 2, length: int = 24, seed: int = 0) -> dict:
    """A batch of random token ids, every position attended and trained."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def gradients(model, inputs: dict) -> dict:
    """{name: gradient} of the trainable parameters after one backward pass of the model's loss on `inputs`."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
