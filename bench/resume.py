"""6. Resume cost: seconds to the first step when resuming at an early and at a late checkpoint.

    python -m bench.resume [--quick]

Setup (in this process, not timed): the bench model on 200 short chat records, 1 example per
micro-batch padded to 128 tokens (so every step computes the same), so the epoch has 200 batches.
One run saves a checkpoint at step 10 (early: 10 batches into the epoch); another saves one at
step 190 (late: 190 batches in, near the epoch's end).

Timed two ways, each alternating early and late in rounds (rotating the order):

- in this process, warm (libraries imported, files in the page cache): `train()` on a fresh
  output folder holding only a copy of one checkpoint, with `max_steps` one past it and logging
  every step; the time from calling `train()` to the end of the first step is the first metrics
  record's `elapsed_sec`. Everything that differs between resuming early and late happens in
  there (finding the checkpoint, loading it, the skip to the data position) and nothing else
  does, so this is the figure the target applies to. A fresh start (no checkpoint) runs in each
  round too: early / fresh is what loading a checkpoint costs.
- as a user runs it: `python -m launcher run` in a subprocess, from the wall clock read just
  before it starts to when the run's only `metrics.jsonl` record was written (the file's
  modification time). Imports and first-call warm-up (several seconds, the same whatever the
  checkpoint, and the noisiest part on a shared machine) are inside; a fresh start runs once at
  the end, for reference.
Resuming must not replay consumed data, so early and late should cost the same: the figures are
late / early per round.

A second figure looks at the data position alone, in this process: the time to the first window
of `loop.train.windows` (what `fit` iterates) when starting at batch 0 and at the last batch of
an epoch of 50,000 one-example batches. Accelerate's `skip_first_batches` skips batch indices
through the sampler without loading or collating the skipped examples; this checks it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.common import (Row, alternate, bench_job, bench_model, dataset_file, first_record_time, load_job, log,
                          main_for, median, prepared_data, run_command, run_command_of, spread, train_in_process,
                          verdict, workspace)
from loop.run_dir import MARKER
from tests.helpers import read_metrics

NAME = "resume"
EARLY, LATE, NUM_EXAMPLES = 10, 190, 200
QUICK_EARLY, QUICK_LATE, QUICK_NUM_EXAMPLES = 5, 40, 50


def make_checkpoints(folder: Path, job: Path, steps: dict[str, int]) -> dict[str, Path]:
    """{"early": checkpoint at steps["early"], "late": at steps["late"]}, made by training."""
    found = {}
    for name, step in steps.items():
        output = folder / f"make-{name}"
        train_in_process(job, output, **{"hyperparams.max_steps": step, "hyperparams.save_steps": step})
        found[name] = output / "checkpoints" / f"step_{step:06d}"
        assert (found[name] / "COMPLETE").exists(), f"no checkpoint at {found[name]}"
    return found


def skip_cost(job: Path, rounds: int, num_batches: int = 50_000) -> tuple[list[float], list[float]]:
    """Seconds to the first window of `windows()` starting at batch 0, and at batch num_batches - 1."""
    import datasets

    from loop.data import build_dataloader
    from loop.train import build_accelerator, windows

    config = load_job(job, **{"hyperparams.batch_size": 1})
    _, tokenizer = prepared_data(job)
    row = list(range(64))
    rows = datasets.Dataset.from_dict({"input_ids": [row] * num_batches, "labels": [row] * num_batches})
    accelerator = build_accelerator(config)
    loader = accelerator.prepare(build_dataloader(rows, config, tokenizer, shuffle=True, batch_size=1))
    first, last = [], []
    for _ in range(rounds):
        for start, out in ((0, first), (num_batches - 1, last)):
            started = time.perf_counter()
            next(windows(loader, accelerator, 1, 0, start))
            out.append(time.perf_counter() - started)
    return first, last


def run(quick: bool = False) -> list[Row]:
    rounds, warm_rounds = (1, 2) if quick else (3, 11)  # warm runs last ~0.15 s: many rounds
    early, late, num_examples = (QUICK_EARLY, QUICK_LATE, QUICK_NUM_EXAMPLES) if quick else (EARLY, LATE, NUM_EXAMPLES)
    folder = workspace() / NAME
    data = dataset_file(f"resume-{num_examples}", num_examples, lengths="uniform", low=16, high=64)
    # Every batch padded to 128 tokens, so the first step after resuming costs the same whichever
    # example it holds (unpadded, the example at batch 190 vs 10 made a 10% difference of its own).
    job = bench_job(folder, bench_model(), data, **{"hyperparams.batch_size": 1, "data.max_length": 128,
                                                    "data.pad_to_multiple_of": 128})
    log(f"{NAME}: training to make checkpoints at steps {early} and {late}")
    checkpoints = make_checkpoints(folder, job, {"early": early, "late": late})

    steps = {"fresh": 0, "early": early, "late": late}

    def prepare(name: str, output: Path) -> dict:
        """Put a copy of the checkpoint (if any) and its run's marker in `output` (without the marker the
        folder is not a run of ours, and `train` refuses to write into it); the overrides that resume
        from it for one step (a changed max_steps and save_steps, which resuming allows when asked)."""
        if name != "fresh":
            shutil.copytree(checkpoints[name], output / "checkpoints" / checkpoints[name].name)
            shutil.copy(checkpoints[name].parent.parent / MARKER, output / MARKER)
        return {"hyperparams.max_steps": steps[name] + 1, "environment.logging_steps": 1,
                "output.resume_changes": "allow"}

    def warm(name: str):
        def measure(round_index: int) -> float:
            output = folder / f"warm-{name}-{round_index}"
            result = train_in_process(job, output, clear=False, **prepare(name, output))
            assert name == "fresh" or result.summary.get("resumed_from"), f"{output} did not resume"
            return read_metrics(output)[0]["elapsed_sec"]
        return measure

    def command(name: str):
        def measure(round_index: int) -> float:
            output = folder / f"{name}-{round_index}"
            overrides = [f"{key}={value}" for key, value in prepare(name, output).items()]
            started, _, _ = run_command(run_command_of(job, f"output.output_dir={output}", *overrides),
                                        folder / f"{name}-{round_index}.log")
            return first_record_time(output) - started
        return measure

    in_run = alternate(warm_rounds, {name: warm(name) for name in ("fresh", "early", "late")}, label=f"{NAME} warm")
    seconds = alternate(rounds, {name: command(name) for name in ("early", "late")}, label=NAME)
    if not quick:
        log(f"{NAME}: a fresh start, for reference")
        seconds["fresh"] = [command("fresh")(0)]
    late_early = [b / a for a, b in zip(seconds["early"], seconds["late"])]
    late_early_in_run = [b / a for a, b in zip(in_run["early"], in_run["late"])]
    early_fresh_in_run = [a / f for a, f in zip(in_run["early"], in_run["fresh"])]
    log(f"{NAME}: first window after skipping 0 and 49,999 batches")
    first, last = skip_cost(job, 3 if quick else 5)
    skip_ratios = [b / a for a, b in zip(first, last)]
    fresh = f"fresh start {median(seconds['fresh']):.1f} s, " if seconds.get("fresh") else ""
    return [
        Row(bench="6 resume", figure=f"to first step, in process (warm), resumed late (step {late}) / early "
                                     f"(step {early})",
            value=f"{median(late_early_in_run):.2f}x", spread=spread(late_early_in_run, "{:.2f}", "x"),
            target="about 1.00x (<= 1.10x)", met=verdict(median(late_early_in_run) <= 1.10),
            detail=f"fresh start {median(in_run['fresh']):.2f} s, early {median(in_run['early']):.2f} s, late "
                   f"{median(in_run['late']):.2f} s from calling `train()` to the end of the first step (epoch of "
                   f"{num_examples} batches)", raw={"in_process_s": in_run}),
        Row(bench="6 resume", figure="to first step, in process (warm), resumed early / fresh start",
            value=f"{median(early_fresh_in_run):.2f}x", spread=spread(early_fresh_in_run, "{:.2f}", "x")),
        Row(bench="6 resume", figure="command to first step (`python -m launcher run`), resumed late / early",
            value=f"{median(late_early):.2f}x", spread=spread(late_early, "{:.2f}", "x"),
            detail=f"{fresh}early {median(seconds['early']):.1f} s, late {median(seconds['late']):.1f} s",
            raw={"seconds": seconds}),
        Row(bench="6 resume", figure="first window of `windows()` after skipping 49,999 batches / 0",
            value=f"{median(skip_ratios):.2f}x", spread=spread(skip_ratios, "{:.2f}", "x"),
            detail=f"{median(first) * 1e3:.1f} ms at batch 0, {median(last) * 1e3:.1f} ms at batch 49,999 "
                   f"({(median(last) - median(first)) / 49_999 * 1e6:.2f} us per skipped batch)",
            raw={"first_s": first, "last_s": last}),
    ]


if __name__ == "__main__":
    main_for(run)
