"""What every benchmark shares: the bench model and data, job files, subprocesses, and robust statistics.

    from bench.common import Row, alternate, bench_job, bench_model, dataset_file, train_interleaved, workspace

Job files, JSONL and metrics go through tests/helpers.py, the same helpers the tests use.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on generated text, the
model a Qwen3-shaped causal LM with random weights, the data synthetic chat records.

Timing on a shared 2-core machine: round-to-round noise is about +/-12% (ENVIRONMENT.md), so every
figure is a ratio of variants measured alternately inside one script (rounds of whole runs, or
step by step with `train_interleaved`), reported as the median with its min-max spread. Every
process of a benchmark (ours, the baselines, subprocesses) uses the same number of torch threads,
1 by default (`BENCH_THREADS`): with other processes on the two cores, two threads per process
were 2-4x slower and far noisier than one in our measurements, because each op waits for its
slowest thread.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.helpers import launcher_command, read_metrics, subprocess_env, write_job, write_jsonl

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
THREADS = int(os.environ.get("BENCH_THREADS", "1"))

# Qwen3-shaped, about 4.5M parameters: big enough that the step is matmul-bound, small enough that a
# step of 1024 tokens takes about a third of a second on one core.
MODEL_SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
VOCAB_SIZE = 2048


def configure_process(threads: int | None = THREADS) -> None:
    """No hub, quiet libraries and `threads` torch threads (None: torch's default), for this process
    and every process it starts."""
    os.environ.update(subprocess_env(threads, TRANSFORMERS_NO_ADVISORY_WARNINGS="1"))
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # Subprocesses run `-m launcher` and `-m bench...` from the repository root.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    for noisy in ("transformers", "accelerate", "datasets", "loop", "launcher", "DeepSpeed", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


_T0 = time.time()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since this process started."""
    print(f"[bench {time.time() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- results -------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table."""

    bench: str
    """Which sub-benchmark (e.g. "1 loop overhead")."""
    figure: str
    """What is compared, in words."""
    value: str
    """The median (usually a ratio)."""
    spread: str = ""
    """min-max of the per-round values, and how many rounds."""
    target: str = ""
    met: str = ""
    """"yes", "no", or "" when there is no target."""
    detail: str = ""
    """The absolute numbers behind the ratio (for reading, not for comparing machines)."""
    raw: dict = field(default_factory=dict)
    """Every measured value, for the JSON file."""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str = "{:.2f}", unit: str = "") -> str:
    if not values:
        return ""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}{unit} (n={len(values)})"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "no")


def alternate(rounds: int, variants: dict[str, Callable[[int], Any]], label: str = "") -> dict[str, list[Any]]:
    """Run every variant once per round, rotating which goes first; `{name: [result per round]}`.

    Rotation spreads slow periods of the shared machine over all variants instead of one.
    """
    names = list(variants)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            log(f"{label} round {round_index + 1}/{rounds}: {name}")
            results[name].append(variants[name](round_index))
    return results


# --- processes -----------------------------------------------------------------------------------

def run_command(command: list[str], log_path: Path, *, timeout: float = 600, cwd: Path | None = None,
                env: dict | None = None, check: bool = True) -> tuple[float, float, int]:
    """Run `command` with its output in `log_path`; (start epoch, seconds, exit code).

    The command gets a process group of its own; past `timeout` seconds the whole group (an
    `accelerate launch` and its workers) is stopped and the exit code is 124. Raises with the log's
    tail when the command fails and `check` is set.
    """
    import signal

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as out:
        started = time.time()
        clock = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or REPO_ROOT,
                                   env=env or os.environ.copy(), start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)  # the group this call created, and nothing else
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = 124
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)  # e.g. Ctrl-C: leave no orphan behind
            raise
        seconds = time.perf_counter() - clock
    if check and code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        why = f"timed out after {timeout:.0f} s" if code == 124 else f"exited with {code}"
        raise RuntimeError(f"{' '.join(map(str, command))} {why}:\n{tail}")
    return started, seconds, code


def run_command_of(job: Path, *overrides: str, accelerate: bool = False) -> list[str]:
    """`python -m launcher run JOB` (or through `accelerate launch` on one process) with --set overrides."""
    command = launcher_command("run", job, *[item for override in overrides for item in ("--set", override)])
    if accelerate:  # `-m launcher ...` after accelerate's own arguments
        return [PYTHON, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:]]
    return command


def first_record_time(output_dir: Path) -> float:
    """Epoch time the first metrics record was written (the file's mtime; its only record at step 1)."""
    records = read_metrics(output_dir)
    assert len(records) == 1, f"expected one metrics record in {output_dir}, found {len(records)}"
    return (output_dir / "metrics.jsonl").stat().st_mtime


# --- machine -------------------------------------------------------------------------------------

def machine_info() -> dict[str, str]:
    import accelerate
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads per process": str(THREADS),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


# --- workspace, model, data ------------------------------------------------------------------------

_WORKSPACE: Path | None = None


def workspace() -> Path:
    """This process's scratch folder (under $BENCH_WORKDIR if set), removed at exit unless $BENCH_KEEP is set."""
    global _WORKSPACE
    if _WORKSPACE is None:
        root = os.environ.get("BENCH_WORKDIR")
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)
        _WORKSPACE = Path(tempfile.mkdtemp(prefix="trainer-engine-bench-", dir=root))
        os.environ["TRAINER_ENGINE_CACHE"] = str(_WORKSPACE / "data-cache")
        import atexit

        if not os.environ.get("BENCH_KEEP"):
            atexit.register(shutil.rmtree, _WORKSPACE, ignore_errors=True)
    return _WORKSPACE


_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "er", "or", "th"]


def lexicon(size: int = 4000, seed: int = 0) -> list[str]:
    """Pseudo-words of 1-4 syllables, so a BPE tokenizer has something to learn 2048 merges from."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class TextSource:
    """Zipf-distributed pseudo-word text."""

    def __init__(self, seed: int = 0):
        self.words = lexicon(seed=0)
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.rng = random.Random(seed)

    def text(self, num_words: int) -> str:
        words = self.rng.choices(self.words, weights=self.weights, k=max(1, num_words))
        sentences, start = [], 0
        while start < len(words):
            end = start + self.rng.randint(6, 16)
            sentences.append(" ".join(words[start:end]).capitalize() + ".")
            start = end
        return " ".join(sentences)


_MODELS: dict[str, Path] = {}


def bench_model(**shape: Any) -> Path:
    """A folder with the bench tokenizer (BPE, vocab 2048, ChatML) and a random Qwen3 of `MODEL_SHAPE`.

    Built once per process and shape (about a second).
    """
    shape = {**MODEL_SHAPE, **shape}
    key = json.dumps(shape, sort_keys=True)
    if key not in _MODELS:
        from launcher.demo import build_model, build_tokenizer

        folder = workspace() / f"model-{len(_MODELS)}"
        folder.mkdir(parents=True)
        tokenizer = build_tokenizer(folder, vocab_size=VOCAB_SIZE, extra_text=TextSource(seed=1).text(60_000))
        build_model(folder, tokenizer, **shape)
        _MODELS[key] = folder
    return _MODELS[key]


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            total += math.prod(handle.get_slice(name).get_shape())
    return total


def tokens_per_word(model_dir: Path) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = TextSource(seed=99).text(3000)
    return len(tokenizer(text)["input_ids"]) / 3000


def sized_chat_records(count: int, model_dir: Path, *, lengths: str = "uniform", low: int = 16, high: int = 1024,
                       seed: int = 0) -> list[dict]:
    """`count` one-turn chat records whose rendered length in tokens follows `lengths`:

    - "uniform": between `low` and `high`;
    - "lognormal": skewed like real chat data (median about 110 tokens, a long tail), clipped to
      [`low`, `high`].
    The user turn takes 10-50% of the words, the assistant (the trained part) the rest.
    """
    rng = random.Random(seed)
    source = TextSource(seed=seed + 1)
    per_word = tokens_per_word(model_dir)
    overhead = 14  # ChatML markers, roles and sentence punctuation of two messages, in tokens
    records = []
    for _ in range(count):
        if lengths == "uniform":
            target = rng.randint(low, high)
        else:
            target = int(min(high, max(low, rng.lognormvariate(math.log(110), 1.0))))
        num_words = max(2, round((target - overhead) / per_word))
        user_words = max(1, round(num_words * rng.uniform(0.1, 0.5)))
        records.append({"messages": [{"role": "user", "content": source.text(user_words)},
                                     {"role": "assistant", "content": source.text(max(1, num_words - user_words))}]})
    return records


# The settings every benchmark job shares: fp32 (bf16 autocast is 1.5x slower on CPU), no eval,
# no step checkpoints, the default logging interval.
BASE_JOB = {
    "hyperparams.fp_precision": "fp32",
    "hyperparams.learning_rate": 1e-4,
    "hyperparams.save_steps": 0,
    "hyperparams.seed": 42,
    "environment.logging_steps": 10,
}


def bench_job(folder: Path, model_dir: Path, dataset: Path, **overrides: Any) -> Path:
    """`folder/job.toml` (`tests.helpers.write_job`) for `model_dir` on `dataset` with `BASE_JOB` and dotted overrides.

    The data cache is shared by the whole workspace, so jobs on the same data tokenize it once.
    """
    return write_job(folder, model_dir, **{"data.dataset_path": str(dataset),
                                           "data.cache_dir": str(workspace() / "data-cache"), **BASE_JOB, **overrides})


def load_job(path: Path, **overrides: Any):
    from launcher.config import load_config

    return load_config(path, overrides=overrides or None)


def prepared_data(job: Path):
    """(`PreparedData`, tokenizer) of a job: tokenized into the shared cache the first time."""
    from loop.data import build_datasets, load_tokenizer

    config = load_job(job)
    tokenizer = load_tokenizer(config)
    return build_datasets(config, tokenizer), tokenizer


def our_loader(job: Path):
    """The training data loader our loop builds for `job` (same sampler, seed and collator), set to epoch 0."""
    from loop.data import build_dataloader

    config = load_job(job)
    data, tokenizer = prepared_data(job)
    loader = build_dataloader(data.train, config, tokenizer, shuffle=config.data.shuffle,
                              batch_size=config.hyperparams.batch_size)
    loader.sampler.set_epoch(0)
    return loader


def train_in_process(job: Path, output_dir: Path, *, status_writer: Callable | None = None,
                     on_step: Callable | None = None, clear: bool = True, **overrides: Any):
    """`loop.train.train` on `job` with `output_dir` and dotted overrides; the result.

    `output_dir` is emptied first unless `clear` is false (e.g. to resume from a checkpoint put
    there). `status_writer` and `on_step` are the loop's hooks for tools: `status_writer(fields)` at
    every status update, `on_step(run)` after every optimizer step. Removes the log-file handler
    `train` adds to the root logger, so runs in one process do not write into each other's train.log.
    """
    from loop.train import train

    if clear:
        shutil.rmtree(output_dir, ignore_errors=True)
    config = load_job(job, **{"output.output_dir": str(output_dir), **overrides})
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        result = train(config, status_writer=status_writer, on_step=on_step)
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    if not result.success:
        raise RuntimeError(f"training {job} failed: {result.error}")
    return result


class Interleaver:
    """The loop's `on_step` hook: one step of each other loop after each of ours; records (ours, *others)
    seconds per step.

    An other loop is anything with `steps(count) -> seconds`.
    """

    def __init__(self, bare_loops: list):
        self.bare_loops = bare_loops
        self.optimizer = None
        self.left: float | None = None
        self.steps: list[tuple[float, ...]] = []

    def __call__(self, run) -> None:
        entered = time.perf_counter()
        self.optimizer = run.optimizer  # for the report: which AdamW our loop built
        bare = [loop.steps(1) for loop in self.bare_loops]
        if self.left is not None:  # our first step also holds the time since start-up
            self.steps.append((entered - self.left, *bare))
        self.left = time.perf_counter()

    def windows(self, size: int, skip: int) -> list[tuple[float, ...]]:
        """Seconds per step, summed over windows of `size` steps, the first `skip` steps left out."""
        steps = self.steps[skip - 1:]  # self.steps starts at our step 2
        return [tuple(sum(column) / size for column in zip(*steps[i:i + size]))
                for i in range(0, len(steps) - size + 1, size)]


def train_interleaved(job: Path, output_dir: Path, others: list, **overrides: Any) -> "Interleaver":
    """`train_in_process`, with one step of each of `others` after each of our optimizer steps.

    The hook is the loop's `on_step(run)`, called at the end of every optimizer step (after its
    logging and checkpoint check). Returns the `Interleaver` holding the per-step times (and, as
    `.optimizer`, the optimizer our loop built).
    """
    hook = Interleaver(others)
    train_in_process(job, output_dir, on_step=hook, **overrides)
    return hook


def adamw_kind(optimizer) -> str:
    """"fused", "foreach" or "for-loop": which implementation a torch AdamW (maybe Accelerate-wrapped) runs."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    defaults = getattr(optimizer, "defaults", {})
    if defaults.get("fused"):
        return "fused"
    return "for-loop" if defaults.get("foreach") is False else "foreach"


def main_for(run: Callable[[bool], list[Row]], argv: list[str] | None = None) -> None:
    """`__main__` of a sub-benchmark: `--quick`, then the rows as a markdown table on stdout."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (a smoke run)")
    args = parser.parse_args(argv)
    configure_process()
    rows = run(args.quick)
    print(markdown_table(rows))
    for row in rows:
        if row.detail:
            print(f"- {row.bench}, {row.figure}: {row.detail}")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| benchmark | figure | median | spread (min-max, n) | target | met |",
             "| --- | --- | ---: | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row.bench} | {row.figure} | {row.value} | {row.spread} | {row.target} | {row.met} |")
    return "\n".join(lines)


def dataset_file(name: str, count: int, **kwargs: Any) -> Path:
    """`workspace/data/NAME.jsonl` of `sized_chat_records(count, bench_model(), **kwargs)`, written once."""
    path = workspace() / "data" / f"{name}.jsonl"
    if not path.exists():
        write_jsonl(path, sized_chat_records(count, bench_model(), **kwargs))
    return path


# The steady-state job of benchmarks 1 and 2: packed rows of 256 tokens, 2 rows per micro-batch,
# 2 micro-batches per optimizer step (1024 tokens a step), so every step does the same work.
STEADY_JOB = {
    "data.packing": True,
    "data.max_length": 256,
    "hyperparams.batch_size": 2,
    "hyperparams.gradient_accumulation": 2,
}


def steady_job(folder: Path, **overrides: Any) -> Path:
    data = dataset_file("steady", 800, lengths="uniform", low=32, high=200)
    return bench_job(folder, bench_model(), data, **{**STEADY_JOB, **overrides})
