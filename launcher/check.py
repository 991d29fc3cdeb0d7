"""`python -m launcher check JOB.toml [--quick]`: short proofs on the job's own model and data.

    python -m launcher check my_job.toml            # masks, accumulation, resume, processes, determinism
    python -m launcher check my_job.toml --quick    # masks only, no training

    from launcher.check import check_job, format_report
    report = check_job("my_job.toml", {"hyperparams.batch_size": 2})
    print(format_report(report)); report.passed

Each proof trains a few optimizer steps on the first records of the job's data, in a scratch folder
(a temporary folder, removed afterwards): the job's `output_dir` is never touched, nor, for a JSONL
data file, its data cache.

- masks: every example trains at least one token; every trained reply ends with its end-of-turn
  token, trained; no header, next-turn, system or user text is trained; template text trained with
  the replies (e.g. an empty `<think></think>` block) is listed.
- accumulation: k micro-batches of 1 example give the losses and weights of 1 micro-batch of k.
- resume: n steps straight give the losses and weights of n/2 steps, a stop, and a resume.
- processes (jobs with `[launch] num_processes` > 1): N processes give the losses and weights of
  1 process with N times the accumulation.
- determinism: the same job twice gives bit-identical losses and weights, or the check says what
  is not deterministic.

Differences are relative (|a - b| / |a| for losses, ||a - b|| / ||a|| per weight tensor) and
must stay within the tolerance of the job's precision (`TOLERANCES`). docs/proving.md explains each
proof and its tolerance.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from launcher.config import ConfigError, JobConfig, load_config

NUM_STEPS = 4
"""Optimizer steps of each proof run; the resume proof stops after half of them."""
NUM_MASK_RECORDS = 1000
"""Records (the first of the data file) whose masks are inspected."""
MIN_TRAIN_RECORDS = 64
"""Records the training proofs start from (more when a step needs more rows)."""
TOLERANCES = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}
"""Relative tolerance of losses and weights by the precision the job computes in."""
ROUNDING_SAFE_EPSILON = 1e-6
"""Smallest AdamW epsilon of the proof runs: Adam divides each gradient by its own root mean square,
so with a tiny epsilon rounding noise in a near-zero gradient becomes a full-size update, and two
groupings of the same examples would differ by more than rounding (the project's own exactness
tests use the same value)."""
MAX_LISTED = 8
"""Mask problems listed by record; the rest are counted."""

PASS, FAIL, SKIP = "pass", "fail", "skip"
logger = logging.getLogger(__name__)


# --- the report -------------------------------------------------------------------------------------

@dataclass
class Proof:
    name: str
    status: str
    """pass, fail or skip."""
    summary: str
    """One line: what was measured against which tolerance."""
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class CheckReport:
    job: str
    precision: str
    tolerance: float
    proofs: list[Proof]
    scratch: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(p.status != FAIL for p in self.proofs)

    def proof(self, name: str) -> Proof:
        return next(p for p in self.proofs if p.name == name)


def format_report(report: CheckReport) -> str:
    width = max(len(p.name) for p in report.proofs)
    lines = [f"check {report.job}", f"  precision {report.precision}: tolerance {report.tolerance:g} (relative)",
             *(f"  {note}" for note in report.notes), ""]
    for proof in report.proofs:
        timing = f"  ({proof.seconds:.1f} s)" if proof.status != SKIP else ""
        lines.append(f"{proof.status.upper():4}  {proof.name:<{width}}  {proof.summary}{timing}")
        lines += [f"      {line}" for line in proof.details]
    failed = [p.name for p in report.proofs if p.status == FAIL]
    ran = [p for p in report.proofs if p.status != SKIP]
    verdict = (f"{len(failed)} of {len(ran)} proofs FAILED: {', '.join(failed)}" if failed
               else f"all {len(ran)} proofs passed")
    skipped = len(report.proofs) - len(ran)
    lines += ["", f"{verdict}{f' ({skipped} skipped)' if skipped else ''} in {report.seconds:.1f} s"]
    return "\n".join(lines)


def tolerance_of(config: JobConfig) -> tuple[str, float]:
    """(precision, relative tolerance): the loosest of the mixed precision and the weights' dtype."""
    names = [config.hyperparams.fp_precision]
    names += {"bfloat16": ["bf16"], "float16": ["fp16"]}.get(config.model.dtype, [])
    if config.model.load_in_4bit:
        names.append("bf16")
    name = max(names, key=lambda n: TOLERANCES[n])
    return name, TOLERANCES[name]


# --- the check --------------------------------------------------------------------------------------

def check_job(job: str | os.PathLike, overrides: dict[str, Any] | None = None, *, quick: bool = False,
              scratch_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> CheckReport:
    """Run the proofs on the job file `job` (with dotted `overrides`); raises `ConfigError` if refused.

    `scratch_dir` keeps the proof runs there (default: a temporary folder, removed afterwards);
    `log` receives a line as each proof starts.
    """
    from launcher.run import in_distributed_launch

    if in_distributed_launch():
        raise ConfigError("check starts the processes it needs itself: run `python -m launcher check JOB.toml`, "
                          "not under accelerate launch, torchrun or srun")
    started = time.time()
    overrides = dict(overrides or {})
    config = load_config(job, overrides=overrides)
    precision, tolerance = tolerance_of(config)
    with _scratch(scratch_dir) as scratch, _quiet():
        session = _Session(Path(job), overrides, config, scratch, tolerance, log or (lambda line: None))
        proofs = [session.timed("masks", session.masks)]
        if quick:
            proofs += [Proof(name, SKIP, "--quick checks masks only")
                       for name in ("accumulation", "resume", "processes", "determinism")]
        else:
            session.prepare_training_data()
            proofs.append(session.timed("accumulation", session.accumulation))
            resume, determinism = session.resume_and_determinism()
            proofs += [resume, session.timed("processes", session.processes), determinism]
        notes = session.notes
    where = f"in {scratch}" if scratch_dir else "in a temporary folder, removed afterwards"
    return CheckReport(job=str(job), precision=precision, tolerance=tolerance, proofs=proofs,
                       scratch=str(scratch), notes=[*notes, f"proof runs {where}"], seconds=time.time() - started)


@contextlib.contextmanager
def _scratch(scratch_dir):
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        yield Path(scratch_dir).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="trainer-engine-check-") as folder:
        yield Path(folder)


@contextlib.contextmanager
def _quiet():
    """The proof runs' own INFO lines and progress bars would bury the report: warnings only."""
    levels = {"loop": logging.WARNING, "launcher.run": logging.WARNING, "launcher.report": logging.WARNING,
              "datasets": logging.WARNING, "transformers": logging.WARNING, "DeepSpeed": logging.ERROR}
    previous = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover
        are_progress_bars_disabled = disable_progress_bars = enable_progress_bars = lambda: True
    from transformers.utils import logging as hf_logging

    bars_were_off, hf_bars_were_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)
        if not bars_were_off:
            enable_progress_bars()
        if hf_bars_were_on:
            hf_logging.enable_progress_bar()


@dataclass
class _RunOutput:
    name: str
    losses: dict[int, float]
    weights: dict[str, Any]
    resumed_from: str | None = None
    error: str | None = None


class _Session:
    """The job, its scratch folder and the proof runs made so far."""

    def __init__(self, job: Path, overrides: dict, config: JobConfig, scratch: Path, tolerance: float, log):
        self.job, self.overrides, self.config, self.scratch = job, overrides, config, scratch
        self.tolerance, self.log = tolerance, log
        self.notes: list[str] = []
        self.train_data: Path | None = None
        self.num_rows: int | None = 0
        """Rows the proof runs' data holds; None for a stream, which is never counted."""
        h = config.hyperparams
        self.batch_size, self.grad_accumulation = h.batch_size, h.gradient_accumulation
        self.num_processes = config.launch.num_processes
        self.is_plain = is_plain_jsonl(config)

    def timed(self, name: str, proof: Callable[[], Proof]) -> Proof:
        started = time.time()
        result = proof()
        result.name, result.seconds = name, time.time() - started
        return result

    # --- configs of the proof runs ----------------------------------------------------------------
    def load(self, name: str, **extra: Any) -> JobConfig:
        """The job with the user's overrides, then the proof's: a scratch output folder, and for a JSONL
        data file its first records in a scratch cache (other data is read, and cached, as the job does)."""
        values = {"output.output_dir": str(self.scratch / name), "hyperparams.eval_steps": 0,
                  "monitoring.preview_steps": 0}
        if self.is_plain:
            values.update({"data.cache_dir": str(self.scratch / "cache"), "data.validation_path": "",
                           "monitoring.validation_split": 0.0})
        return load_config(self.job, overrides={**self.overrides, **values, **extra})

    def training(self, name: str, *, steps: int = NUM_STEPS, ordered: bool = False, **extra: Any) -> JobConfig:
        """A proof run: `steps` optimizer steps at the job's peak learning rate, a loss record per step,
        no evaluation, previews or trackers; `ordered` keeps the data in file order and drops dropout
        (for proofs that compare different batchings of the same examples)."""
        h = self.config.hyperparams
        values = {"hyperparams.max_steps": steps,
                  "hyperparams.warmup_steps": 0, "hyperparams.save_steps": 0, "hyperparams.save_total_limit": steps,
                  "hyperparams.adam_epsilon": max(h.adam_epsilon, ROUNDING_SAFE_EPSILON),
                  "environment.logging_steps": 1, "environment.report_to": [],
                  "output.resume": "auto", "output.merge_lora": False,
                  "launch.num_processes": 1, "launch.accelerate_config": ""}
        if self.train_data is not None:
            values["data.dataset_path"] = str(self.train_data)
        if ordered:
            values.update({"data.shuffle": False, "data.group_by_length": False, "lora.dropout": 0.0})
        return self.load(name, **{**values, **extra})

    # --- masks ------------------------------------------------------------------------------------
    def masks(self) -> Proof:
        from loop.data import build_datasets, load_tokenizer
        from loop.data.prepare import read_records
        from profiles import fill_system_prompt, get_profile

        if not self.is_plain:
            return Proof("masks", SKIP, "reads the records of one JSONL file (data.dataset_path); this job's data is "
                                        "in another form or in several sources: `validate` shows how it renders")
        self.log(f"masks: rendering the first {NUM_MASK_RECORDS} records of {self.config.data.dataset_path}")
        subset, num_records = _head(Path(self.config.data.dataset_path), NUM_MASK_RECORDS,
                                    self.scratch / "masks.jsonl")
        config = self.load("masks", **{"data.dataset_path": str(subset), "data.packing": False})
        tokenizer = load_tokenizer(config)
        data = build_datasets(config, tokenizer)
        profile = get_profile(config.profile.name, search_paths=[self.job.resolve().parent])
        records = read_records(subset, profile, fill_system_prompt(config.profile.system_prompt), "skip")
        inspector = MaskInspector(tokenizer, config.profile.train_on, config.data.max_length,
                                  source=self.config.data.dataset_path)
        inspector.index(records.lines, [json.loads(p) for p in records.payloads])
        for row in data.train:
            inspector.inspect(list(row["input_ids"]), list(row["labels"]))
        inspector.count_dropped(data.report)
        return inspector.proof(num_records)

    # --- training data --------------------------------------------------------------------------
    def prepare_training_data(self) -> None:
        """The first records of the data, enough for every proof run's steps, tokenized once into the
        scratch cache that all proof runs share."""
        from loop.data import build_datasets, load_tokenizer

        needed = NUM_STEPS * self.batch_size * self.grad_accumulation * max(self.num_processes, 1)
        if not self.is_plain and self.config.data.streaming:
            # The proof runs stream it as the job does; counting its rows would tokenize (and cache) all of it.
            self.num_rows = None
            self.notes.append(f"training proofs: {NUM_STEPS} optimizer steps per run on the job's stream "
                              f"(data.streaming), peak learning rate from the first step, AdamW epsilon "
                              f">= {ROUNDING_SAFE_EPSILON:g}")
            return
        if not self.is_plain:
            config = self.training("prepare")
            self.num_rows = len(build_datasets(config, load_tokenizer(config)).train)
            self.notes.append(f"training proofs: {NUM_STEPS} optimizer steps per run on the job's data "
                              f"({self.num_rows} rows), peak learning rate from the first step, AdamW epsilon "
                              f">= {ROUNDING_SAFE_EPSILON:g}")
            return
        total = _count_records(Path(self.config.data.dataset_path))
        num_records = min(total, max(MIN_TRAIN_RECORDS, 2 * needed))
        for _ in range(4):
            self.train_data, num_records = _head(Path(self.config.data.dataset_path), num_records,
                                                 self.scratch / "train.jsonl")
            config = self.training("prepare")
            self.num_rows = len(build_datasets(config, load_tokenizer(config)).train)
            if self.num_rows >= needed or num_records >= total:
                break
            num_records = min(total, num_records * 2 * math.ceil(needed / max(self.num_rows, 1)))
        unit = "packed rows" if self.config.data.packing else "examples"
        self.notes.append(f"training proofs: {NUM_STEPS} optimizer steps per run on the first {num_records} records "
                          f"({self.num_rows} {unit}), peak learning rate from the first step, AdamW epsilon "
                          f">= {ROUNDING_SAFE_EPSILON:g}")

    def run(self, config: JobConfig, *, launch: bool = False) -> _RunOutput:
        """Train `config` here (or through `run_job`, which starts the processes); its losses and weights."""
        from loop.status import read_jsonl

        name = config.output_path.name
        if launch:
            from launcher.run import run_job

            with _output_to(self.scratch / f"{name}.log"):
                result = run_job(config)
        else:
            from loop.train import train

            result = train(config)
        _free_memory()
        losses = {r["step"]: r["loss"] for r in read_jsonl(config.output_path / "metrics.jsonl")
                  if "loss" in r and isinstance(r.get("step"), int)}
        if not result.success:
            log_file = self.scratch / f"{name}.log"
            tail = _tail(log_file) if launch and log_file.exists() else ""
            return _RunOutput(name, losses, {}, error=f"the run {name} failed: {result.error}{tail}")
        return _RunOutput(name, losses, final_weights(config.output_path),
                          resumed_from=result.summary.get("resumed_from"))

    # --- accumulation -----------------------------------------------------------------------------
    def accumulation(self) -> Proof:
        k = max(2, min(4, self.batch_size * self.grad_accumulation))
        row = "packed row" if self.config.data.packing else "example"
        self.log(f"accumulation: {k} micro-batches x 1 {row} against 1 micro-batch x {k} {row}s, "
                 f"{NUM_STEPS} steps each")
        many = self.run(self.training(f"accumulation-1x{k}", ordered=True, **{
            "hyperparams.batch_size": 1, "hyperparams.gradient_accumulation": k}))
        one = self.run(self.training(f"accumulation-{k}x1", ordered=True, **{
            "hyperparams.batch_size": k, "hyperparams.gradient_accumulation": 1}))
        hint = ("an optimizer step's loss is not the token mean over its whole accumulation window: each "
                "micro-batch's summed token loss must be divided by the window's supervised-token count (not averaged "
                "per micro-batch and then over micro-batches). Dropout in the model's own config also makes "
                "batchings differ.")
        return compare("accumulation", many, one, self.tolerance, f"{k} micro-batches of 1", f"1 micro-batch of {k}",
                       hint=hint)

    # --- resume and determinism -------------------------------------------------------------------
    def resume_and_determinism(self) -> tuple[Proof, Proof]:
        half = NUM_STEPS // 2
        self.log(f"resume: {NUM_STEPS} steps straight, twice; then {half} steps, stop, resume, {half} steps")
        started = time.time()
        settings = {"hyperparams.save_steps": half, "hyperparams.save_total_limit": NUM_STEPS}
        straight = self.run(self.training("straight", **settings))
        twin_config = self.training("twin", **settings)
        twin = self.run(twin_config)
        determinism_seconds = time.time() - started
        determinism = self.determinism(straight, twin)
        determinism.seconds = determinism_seconds

        started = time.time()
        if twin.error:
            resume = Proof("resume", FAIL, twin.error)
        else:
            _cut_back(twin_config.output_path, half)
            resumed = self.run(twin_config)
            expected = f"step_{half:06d}"
            if resumed.error is None and not str(resumed.resumed_from or "").endswith(expected):
                resumed.error = (f"the rerun did not resume from the checkpoint at step {half} (resumed_from = "
                                 f"{resumed.resumed_from!r}): a stopped run would start again from the beginning")
            resume = compare("resume", straight, resumed, self.tolerance, "straight", "resumed", hint=(
                f"a run resumed at step {half} does not continue where the checkpoint left off: the data "
                "position (progress.batches_in_epoch), the RNG, optimizer or scheduler state is not restored "
                "exactly (a replayed or skipped batch shows as a different loss right after the resume)."))
            if resume.status == PASS:
                resume.summary = f"stopped after step {half} and resumed: {resume.summary}"
        # The resume proof reuses the second run of the determinism proof; its time is the rerun's.
        resume.name, resume.seconds = "resume", time.time() - started
        return resume, determinism

    def determinism(self, first: _RunOutput, second: _RunOutput) -> Proof:
        for run in (first, second):
            if run.error:
                return Proof("determinism", FAIL, run.error)
        exact = first.losses == second.losses and _same_weights(first.weights, second.weights)
        if exact and first.losses:
            return Proof("determinism", PASS, f"the same job twice: bit-identical losses over {len(first.losses)} "
                                              "steps and bit-identical weights")
        proof = compare("determinism", first, second, self.tolerance, "first", "second",
                        hint="the same job gives different results from run to run beyond rounding. "
                             + _nondeterminism_sources(self.config))
        if proof.status == PASS:
            proof.summary = f"not bit-identical, within tolerance: {proof.summary}"
            proof.details.append(_nondeterminism_sources(self.config))
        return proof

    # --- processes --------------------------------------------------------------------------------
    def processes(self) -> Proof:
        n = self.num_processes
        if n <= 1:
            return Proof("processes", SKIP, "the job runs on 1 process ([launch] num_processes = 1)")
        per_step = self.batch_size * self.grad_accumulation * n
        steps = NUM_STEPS if self.num_rows is None else min(NUM_STEPS, self.num_rows // per_step)
        if steps < 1:
            return Proof("processes", SKIP, f"the data holds {self.num_rows} rows, less than one global batch "
                                            f"({per_step}); nothing to compare")
        self.log(f"processes: {n} processes against 1 process with {n}x accumulation, {steps} steps each")
        launched = self.run(self.training(f"processes-{n}", steps=steps, ordered=True, **{
            "launch.num_processes": n, "launch.accelerate_config": self.config.launch.accelerate_config}),
            launch=True)
        alone = self.run(self.training("processes-1", steps=steps, ordered=True, **{
            "hyperparams.gradient_accumulation": self.grad_accumulation * n}))
        return compare("processes", launched, alone, self.tolerance, f"{n} processes",
                       f"1 process x {n * self.grad_accumulation} accumulation", hint=(
                           "several processes do not compute the step one process computes on the same global "
                           "batch: the loss must be normalised by the supervised tokens of all processes (DDP "
                           "averages gradients over processes) and each process must get its own shard of the "
                           "batches."))


# --- comparing runs ------------------------------------------------------------------------------------

def compare(name: str, a: _RunOutput, b: _RunOutput, tolerance: float, label_a: str, label_b: str,
            hint: str) -> Proof:
    """Per-step losses and final weights of two runs that must agree within `tolerance`."""
    for run in (a, b):
        if run.error:
            return Proof(name, FAIL, run.error)
    steps = sorted(a.losses.keys() | b.losses.keys())
    if not steps or a.losses.keys() != b.losses.keys():
        return Proof(name, FAIL, f"the runs logged different steps ({label_a}: {sorted(a.losses)}, {label_b}: "
                                 f"{sorted(b.losses)})")
    differences = {s: _relative(a.losses[s], b.losses[s]) for s in steps}
    worst_step = max(steps, key=lambda s: differences[s])
    weight_difference, worst_tensor = weights_difference(a.weights, b.weights)
    failed_steps = [s for s in steps if not differences[s] <= tolerance]
    losses = (f"bit-identical losses over {len(steps)} steps" if differences[worst_step] == 0 else
              f"per-step loss differs by at most {differences[worst_step]:.1e} (step {worst_step})")
    weights = "bit-identical weights" if weight_difference == 0 else f"weights differ by {weight_difference:.1e}"
    measured = f"{losses}, {weights}; tolerance {tolerance:g}"
    if not failed_steps and weight_difference <= tolerance:
        return Proof(name, PASS, f"{label_a} = {label_b}: {measured}")
    details = []
    if failed_steps:
        first = failed_steps[0]
        details.append(f"losses first differ beyond the tolerance at step {first}: {_number(a.losses[first], 8)} "
                       f"({label_a}) vs {_number(b.losses[first], 8)} ({label_b}), relative {differences[first]:.1e}")
    if weight_difference > tolerance:
        details.append(f"final weights differ by {weight_difference:.1e} relative in {worst_tensor}")
    details.append(f"{'step':>6}  {label_a:>22}  {label_b:>22}  relative")
    details += [f"{s:>6}  {_number(a.losses[s], 10):>22}  {_number(b.losses[s], 10):>22}  {differences[s]:.1e}"
                for s in steps]
    details.append(f"likely cause: {hint}")
    return Proof(name, FAIL, f"{label_a} != {label_b}: {measured}", details)


def _number(value: float | None, digits: int) -> str:
    return "none" if value is None else f"{value:.{digits}g}"


def _relative(x: float | None, y: float | None) -> float:
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return 0.0 if x == y else math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-30)


def final_weights(output_dir: Path) -> dict[str, Any]:
    """Every tensor of the `*.safetensors` files in `output_dir/final` (the model or the LoRA adapter)."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted((Path(output_dir) / "final").glob("*.safetensors")):
        weights.update({f"{path.name}:{k}" if k in weights else k: v for k, v in load_file(path).items()})
    return weights


def weights_difference(a: dict, b: dict) -> tuple[float, str]:
    """(largest ||a - b|| / ||a|| over the tensors, the tensor it is in); inf if names or shapes differ.

    The L2 norm, not the largest element: Adam turns rounding noise in a near-zero gradient into an
    update of that one element, which a per-element measure would report as a difference of the runs,
    while a real difference in the gradients moves every element.
    """
    if a.keys() != b.keys() or not a:
        return math.inf, f"the tensor names ({len(a)} vs {len(b)} tensors)"
    worst, where = 0.0, ""
    for name in a:
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            return math.inf, f"{name} (shape {tuple(x.shape)} vs {tuple(y.shape)})"
        difference = float((x - y).norm()) / max(float(x.norm()), 1e-30) if x.numel() else 0.0
        if not math.isfinite(difference) or difference > worst:
            worst, where = difference, name
    return worst, where


def _same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _nondeterminism_sources(config: JobConfig) -> str:
    sources = []
    try:
        import torch

        if torch.cuda.is_available():
            if not torch.are_deterministic_algorithms_enabled():
                sources.append("CUDA kernels that accumulate with atomics (embedding and index backward, "
                               "scatter) unless torch.use_deterministic_algorithms(True) with "
                               "CUBLAS_WORKSPACE_CONFIG=:4096:8")
            if torch.backends.cudnn.benchmark:
                sources.append("cudnn.benchmark picks kernels by timing")
    except ImportError:  # pragma: no cover
        pass
    if config.model.attn_implementation.startswith("flash_attention"):
        sources.append(f"{config.model.attn_implementation}'s backward (atomic adds)")
    if config.launch.num_processes > 1:
        sources.append("the order of all-reduce sums across processes")
    if not sources:
        sources.append("nothing known on this machine: look for dropout with an unseeded generator, threads "
                       "that reduce in varying order (OMP_NUM_THREADS), or data that changes between runs")
    return "Possible sources: " + "; ".join(sources) + "."


# --- masks ------------------------------------------------------------------------------------------

@dataclass
class _Turn:
    """Character positions of one message in the rendered conversation."""

    role: str
    start: int
    """Where the template starts writing this message (the end of the previous turn)."""
    content_start: int
    content_end: int
    end_of_turn: tuple[int, int] | None
    """The special token the template writes after the content, if any."""
    header: tuple[int, int] | None = None
    """For replies: the template's generation prompt (e.g. "<|im_start|>assistant\\n")."""

    @property
    def end(self) -> int:
        return self.end_of_turn[1] if self.end_of_turn else self.content_end

    @property
    def reply_start(self) -> int:
        """Where a reply's trained text may start: after the generation prompt (or at its content)."""
        return self.header[1] if self.header else self.content_start


class MaskInspector:
    """Checks the rows the data layer built against the rendering of their records by the chat template.

    Every row is matched to its record by its token ids; each trained token is located in the rendered
    text by its character offsets and must fall inside a trained reply: the reply's content, the
    template text between the generation prompt and the content or between the content and the
    end-of-turn token (listed as trained boilerplate), and the end-of-turn token itself, which must be
    trained. Anything else trained (a header, the text between turns, system or user text) is a problem.
    """

    def __init__(self, tokenizer, train_on: str, max_length: int, source: str = ""):
        from loop.data.render import special_token_pattern

        self.tokenizer, self.train_on, self.max_length, self.source = tokenizer, train_on, max_length, source
        self.template = getattr(tokenizer, "chat_template", None)
        self.special = special_token_pattern(tokenizer)
        self.references: dict[tuple, tuple] = {}
        self.num_rows = self.num_replies = self.num_texts = self.num_unlocated = 0
        self.num_truncated_replies = self.num_truncated_texts = 0
        self.end_of_turn: Counter = Counter()
        self.boilerplate: Counter = Counter()
        self.problems: Counter = Counter()
        self.listed: list[str] = []

    # --- the reference renderings -----------------------------------------------------------------
    def index(self, lines: list[int], payloads: list[dict]) -> None:
        """Render each record as the template does, keyed by its (truncated) token ids."""
        for line, payload in zip(lines, payloads):
            try:
                reference = self._reference(payload)
            except Exception as error:  # the data layer dropped or refused this record as well
                logger.debug("line %d: cannot render (%s)", line, error)
                continue
            self.references.setdefault(tuple(reference[1][:self.max_length]), (line, payload, *reference))

    def _reference(self, payload: dict) -> tuple:
        from loop.data.render import render_text

        if "text" in payload:
            ids, _ = render_text(self.tokenizer, payload["text"])
            return "", ids, None
        full = self.tokenizer.apply_chat_template(payload["messages"], tokenize=False, chat_template=self.template)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            encoded = backend.encode(full, add_special_tokens=False)
            return full, list(encoded.ids), list(encoded.offsets)
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        return full, list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    # --- one row ----------------------------------------------------------------------------------
    def inspect(self, ids: list[int], labels: list[int]) -> None:
        from loop.data import IGNORE_INDEX

        self.num_rows += 1
        reference = self.references.get(tuple(ids))
        if reference is None:
            self._problem("row matches no record", f"a row of {len(ids)} tokens is not the chat template's "
                                                   "rendering of any record (the data layer tokenizes differently "
                                                   "from the template)")
            return
        line, payload, full, reference_ids, offsets = reference
        where = f"{self.source}:{line}"
        trained = [t for t in range(len(ids)) if labels[t] != IGNORE_INDEX]
        if not trained:
            self._problem("example trains nothing", f"{where}: no token is trained")
            return
        wrong = [t for t in trained if labels[t] != ids[t]]
        if wrong:
            self._problem("labels are not the tokens", f"{where}: {len(wrong)} trained labels differ from the token "
                                                       "at their position (shifted labels?)")
        truncated = len(ids) < len(reference_ids)
        if "text" in payload:
            self._inspect_text(ids, trained, truncated, where)
        elif self.train_on != "all":
            self._inspect_chat(payload["messages"], full, offsets[:len(ids)], set(trained), truncated, where)

    def _inspect_text(self, ids, trained, truncated, where) -> None:
        eos = self.tokenizer.eos_token_id
        self.num_texts += 1
        if truncated:
            self.num_truncated_texts += 1
        elif ids[-1] != eos or trained[-1] != len(ids) - 1:
            self._problem("no end-of-turn token", f"{where}: the text does not end with a trained eos token")

    def _inspect_chat(self, messages, full: str, offsets, trained: set[int], truncated: bool, where: str) -> None:
        turns = self._locate(messages, full)
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if self.train_on == "last_assistant":
            replies = replies[-1:]
        allowed = []
        for i in replies:
            turn = turns[i]
            if turn is None:
                self.num_unlocated += 1
                continue
            self.num_replies += 1
            allowed.append((turn.reply_start, turn.end))
        starts, ends = [a for a, _ in offsets], [b for _, b in offsets]

        def tokens_in(start: int, end: int) -> range:
            """The tokens whose text overlaps [start, end) (offsets are sorted)."""
            return range(bisect.bisect_right(ends, start), bisect.bisect_left(starts, end))

        # Every trained token lies in a trained reply.
        outside: dict[tuple[str, str], list[str]] = {}
        for t in sorted(trained):
            a, b = offsets[t]
            if not any(_overlaps(a, b, start, end) for start, end in allowed):
                outside.setdefault(self._describe(a, turns, replies), []).append(full[a:b])
        for (kind, place), pieces in outside.items():
            self._problem(f"{kind} trained", f"{where}: {kind} {place} is trained: {_short(''.join(pieces))}")

        # Every trained reply: its content trained, and its end-of-turn token, which ends it.
        for i in replies:
            turn = turns[i]
            if turn is None:
                continue
            content = [t for t in tokens_in(turn.content_start, turn.content_end)
                       if offsets[t][0] >= turn.content_start and offsets[t][1] <= turn.content_end]
            missing = [t for t in content if t not in trained]
            if missing:
                self._problem("reply text not trained", f"{where}: {len(missing)} of {len(content)} tokens of the "
                                                        f"reply messages[{i}] are not trained")
            if turn.end_of_turn is None:
                self._problem("no end-of-turn token", f"{where}: the template writes no special token after the reply "
                                                      f"messages[{i}]: the model never learns where a reply ends")
                continue
            eot_start, eot_end = turn.end_of_turn
            eot = bisect.bisect_right(starts, eot_start) - 1
            if eot < 0 or eot >= len(offsets) or offsets[eot][1] < eot_end:
                self.num_truncated_replies += truncated
                continue
            if eot not in trained:
                self._problem("end-of-turn token not trained", f"{where}: the end-of-turn token "
                                                               f"{full[eot_start:eot_end]!r} after messages[{i}] is "
                                                               "not trained: the model never learns to stop")
                continue
            self.end_of_turn[full[eot_start:eot_end]] += 1
            # Template text inside the trained span, around the content: listed, not a problem.
            for start, end in ((turn.reply_start, turn.content_start), (turn.content_end, eot_start)):
                if end > start and any(t in trained and not _overlaps(*offsets[t], turn.content_start, turn.content_end)
                                       for t in tokens_in(start, end)):
                    self.boilerplate[full[start:end]] += 1

    def _locate(self, messages: list[dict], full: str) -> list[_Turn | None]:
        """Where each message's content and end-of-turn token sit in `full`, searched in order."""
        turns: list[_Turn | None] = []
        cursor = 0
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message.get("content"), str) else ""
            position = -1
            for candidate in (content, content.strip()):
                if candidate:
                    position = full.find(candidate, cursor)
                    if position >= 0:
                        content = candidate
                        break
            if position < 0:
                turns.append(None)
                continue
            match = self.special.search(full, position + len(content)) if self.special else None
            turn = _Turn(message.get("role", ""), cursor, position, position + len(content),
                         (match.start(), match.end()) if match else None)
            if turn.role == "assistant":
                turn.header = self._header(messages[:i], full, turn)
            turns.append(turn)
            cursor = turn.end
        return turns

    def _header(self, before: list[dict], full: str, turn: _Turn) -> tuple[int, int] | None:
        """The span of the generation prompt (the text `add_generation_prompt` adds) before a reply."""
        try:
            plain = self.tokenizer.apply_chat_template(before, tokenize=False, chat_template=self.template)
            prompted = self.tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True,
                                                          chat_template=self.template)
        except Exception:  # a template that cannot render this prefix: the whole gap counts as header
            return None
        prompt = prompted[len(plain):] if prompted.startswith(plain) else ""
        position = full.find(prompt, turn.start, turn.content_start) if prompt else -1
        return (position, position + len(prompt)) if position >= 0 else None

    def _describe(self, position: int, turns: list[_Turn | None], replies: list[int]) -> tuple[str, str]:
        """(kind, place) of the text at `position`, e.g. ("the header", "of messages[3] (assistant)")."""
        for i, turn in enumerate(turns):
            if turn is None or position >= turn.end:
                continue
            role = turn.role
            if position < turn.content_start:
                in_header = turn.header[0] <= position < turn.header[1] if turn.header else role == "assistant"
                if in_header:
                    return "the header", f"of messages[{i}] ({role})"
                return "next-turn text", f"(after the end-of-turn token, before messages[{i}], {role})"
            if position < turn.content_end:
                if role == "assistant" and i not in replies:
                    return "an untrained reply", f"(messages[{i}]; train_on = \"{self.train_on}\")"
                return f"{role} text", f"(messages[{i}])"
            return "the end of a turn", f"(messages[{i}], {role})"
        if any(turn is not None for turn in turns) and all(turn is not None for turn in turns):
            return "next-turn text", "(after the last end-of-turn token)"
        return "template text", "(not located: a message the template rewrites)"

    def _problem(self, kind: str, message: str) -> None:
        self.problems[kind] += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(message)

    def count_dropped(self, report) -> None:
        """Examples the data layer dropped because they train nothing."""
        dropped = report.dropped.get("no_trained_tokens", 0)
        if dropped:
            self.problems["example trains nothing"] += dropped
            shown = [p for p in report.problems if "no tokens to train" in p][:3]
            self.listed += [f"{p} (dropped from training)" for p in shown]

    # --- the verdict ------------------------------------------------------------------------------
    def proof(self, num_records: int) -> Proof:
        eos = self.tokenizer.eos_token
        num_problems = sum(self.problems.values())
        scope = f"{self.num_rows} examples from {num_records} records"
        proven = ["every example trains >= 1 token"]
        if self.num_replies:
            proven.append(f"each of {sum(self.end_of_turn.values())} complete replies ends with its end-of-turn "
                          "token, trained; no header, next-turn, system or user text is trained")
        if self.num_texts:
            proven.append(f"each of {self.num_texts - self.num_truncated_texts} complete texts ends with a trained eos")
        if self.train_on == "all":
            proven.append("train_on = \"all\" trains every token by design (turn checks skipped)")
        details = []
        if self.end_of_turn:
            texts = ", ".join(f"{text!r} ({count})" for text, count in self.end_of_turn.most_common())
            details.append(f"end-of-turn tokens: {texts}")
            if any(text != eos for text in self.end_of_turn):
                details.append(f"note: the end-of-turn token is not the tokenizer's eos {eos!r}: generation must "
                               "stop on it (generation_config.eos_token_id)")
        for text, count in self.boilerplate.most_common(5):
            details.append(f"template text trained with the replies (not an error, listed): {text!r} in {count} "
                           "replies")
        if self.num_truncated_replies or self.num_truncated_texts:
            cut = self.num_truncated_replies + self.num_truncated_texts
            details.append(f"{cut} {'replies' if self.num_truncated_replies else 'texts'} cut by data.max_length "
                           "(their end-of-turn token is not in the row: not checked)")
        if self.num_unlocated:
            details.append(f"{self.num_unlocated} replies not checked: their text was not found in the rendering "
                           "(the template rewrites it)")
        if not num_problems:
            return Proof("masks", PASS, f"{scope}: {'; '.join(proven)} (0 problems, tolerance 0)", details)
        kinds = ", ".join(f"{kind} ({count})" for kind, count in self.problems.most_common())
        listed = [*self.listed, *([f"... and {num_problems - len(self.listed)} more"]
                                  if num_problems > len(self.listed) else [])]
        return Proof("masks", FAIL, f"{scope}: {num_problems} problems (tolerance 0): {kinds}", [*listed, *details])


def _short(text: str, limit: int = 100) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit - 5]}...{shown[-1]} ({len(text)} characters)"


def _overlaps(a: int, b: int, start: int, end: int) -> bool:
    if a == b:  # a token with no text of its own (offsets collapsed) sits at its position
        return start <= a < end
    return a < end and b > start


# --- files ------------------------------------------------------------------------------------------

def is_plain_jsonl(config: JobConfig) -> bool:
    """One JSONL training file read as is: the data whose first records the proofs can take."""
    data = config.data
    path = Path(data.dataset_path) if data.dataset_path else None
    return (path is not None and path.is_file() and path.suffix.lower() not in (".json", ".parquet", ".arrow")
            and not getattr(data, "sources", None) and not getattr(data, "column_map", None))


def _head(source: Path, num_records: int, destination: Path) -> tuple[Path, int]:
    """The first `num_records` non-blank lines of `source` (blank lines kept, so line numbers match),
    byte for byte; (destination, records written)."""
    written = 0
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        for raw in reader:
            if written >= num_records:
                break
            writer.write(raw)
            written += bool(raw.strip())
    return destination, written


def _count_records(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _cut_back(output_dir: Path, step: int) -> None:
    """Make a finished run look stopped after `step`: later checkpoints, the final model and the result go."""
    from loop.checkpoint import complete_checkpoints

    for path, saved in complete_checkpoints(output_dir):
        if saved > step:
            shutil.rmtree(path)
    shutil.rmtree(output_dir / "final", ignore_errors=True)
    (output_dir / "result.json").unlink(missing_ok=True)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (and so the launched processes') to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tail(path: Path, num_lines: int = 15) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-num_lines:]
    return f"\n      last lines of {path}:\n" + "\n".join(f"        {line}" for line in lines)


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
