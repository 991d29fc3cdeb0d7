"""3. Wasted compute: padding, and trained tokens per second, on chat data of skewed lengths.

    python -m bench.wasted_compute [--quick]

The data: one-turn chat records whose rendered lengths follow a lognormal distribution (median
about 110 tokens, a long tail, clipped to 16-1024; `data.max_length = 1024`), the assistant turn
trained. Four ways to train one epoch of it, each with the same model, learning rate and fp32:

- ours, unpacked: 4 examples per micro-batch, each batch padded to its longest, in the file's
  order (`data.shuffle = false`; the file is in random order);
- ours, `data.group_by_length`: shuffled, with the length-grouped sampler;
- ours, `data.packing`: shuffled, examples packed into rows of up to 1024 tokens, 1 row per
  micro-batch;
- Trainer: `bench/hf_trainer.py --collator seq2seq --sampler sequential` on our unpacked tokenized
  rows: `DataCollatorForSeq2Seq` dynamic padding, 4 examples per batch, no length grouping, the
  same order as ours unpacked. With so few batches, which random order a sampler draws changes
  the padding, and attention makes a long padded batch cost more than its share (we saw 20-30%
  swings between two random orders), so ours unpacked and Trainer see the very same batches:
  their difference is the loop's, not the sampler's luck.

Figures:
- real tokens: the share of the tokens the model computes (batch x padded width, summed over the
  epoch) that belong to examples, not padding. The details add the same share for attention
  (query-key pairs within one example against rows x width^2): what SDPA computes on a padded
  batch, or on a packed row under one block-causal mask. Our packed rows run SDPA once per example
  (`loop/attention.py`, as flash-attention's varlen kernel does on GPU), so they compute only the
  pairs within; for them the share is what a masked packed row would have thrown away. Ours from a
  pass over our own data loader with the run's sampler and seed (no model needed; the order is the
  run's); Trainer from the batches its collator made during the run.
- trained tokens/s: tokens that carry loss, divided by the time of steps 2..last of the epoch
  (step 1 holds the warm-up; start-up is never counted). Our step times come from the loop's
  `on_step` hook, as in benchmark 1 (logging every 5 steps), the Trainer's from a callback at
  each step end; tokens per step from the batches in order. The figure is ours / Trainer,
  alternating the four runs in rounds (rotating the order), median and min-max over rounds.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (Row, alternate, bench_job, bench_model, dataset_file, load_job, log, main_for, median,
                          our_loader, prepared_data, spread, train_interleaved, verdict, workspace)
from bench.hf_trainer import CountingCollator, build_trainer, parse_args

NAME = "waste"
TARGET_REAL, TARGET_SPEEDUP = 0.95, 1.5

VARIANTS = {
    "ours, unpacked": {"data.shuffle": False},
    "ours, group_by_length": {"data.group_by_length": True},
    "ours, packed": {"data.packing": True, "hyperparams.batch_size": 1},
}
COMMON = {"data.max_length": 1024, "hyperparams.batch_size": 4, "hyperparams.num_epochs": 1,
          "environment.logging_steps": 5}


def our_batches(job: Path) -> list[list[int]]:
    """[trained, real, computed] tokens of each micro-batch of epoch 0, in our loop's order."""
    loader = our_loader(job)
    counter = CountingCollator(loader.collate_fn)
    loader.collate_fn = counter
    for _ in loader:
        pass
    return counter.batches


def steady_tokens_per_sec(step_seconds: list[float], batches: list[list[int]], accumulation: int = 1) -> float:
    """Trained tokens/s over steps 2..len(step_seconds)+1; `step_seconds[i]` is the time of step i + 2."""
    num_steps = len(step_seconds) + 1
    trained = [sum(b[0] for b in batches[i * accumulation:(i + 1) * accumulation]) for i in range(num_steps)]
    return sum(trained[1:]) / sum(step_seconds)


def share(batches: list[list[int]], real: int = 1, computed: int = 2) -> float:
    return sum(b[real] for b in batches) / sum(b[computed] for b in batches)


def run(quick: bool = False) -> list[Row]:
    rounds, count = (1, 32) if quick else (2, 48)
    folder = workspace() / NAME
    data = dataset_file(f"skewed-{count}", count, lengths="lognormal", low=16, high=1024)
    jobs = {name: bench_job(folder / f"job-{i}", bench_model(), data, **{**COMMON, **overrides})
            for i, (name, overrides) in enumerate(VARIANTS.items())}
    log(f"{NAME}: tokenizing {count} skewed records, one pass over each of our loaders")
    batches = {name: our_batches(job) for name, job in jobs.items()}
    unpacked, _ = prepared_data(jobs["ours, unpacked"])
    report = unpacked.report
    trainer_batches: list[list[int]] = []

    def ours(name: str):
        def variant(round_index: int) -> float:
            hook = train_interleaved(jobs[name], folder / f"out-{round_index}-{len(name)}", [])
            return steady_tokens_per_sec([s[0] for s in hook.steps], batches[name])
        return variant

    def trainer(round_index: int) -> float:
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback

        ends: list[float] = []

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        config = load_job(jobs["ours, unpacked"])
        h = config.hyperparams
        args = parse_args(["--model", config.model.model_path, "--train", str(unpacked.cache_path / "train"),
                           "--output", str(folder / f"trainer-{round_index}"), "--timings", "unused",
                           "--batch-size", str(h.batch_size), "--learning-rate", repr(h.learning_rate),
                           "--scheduler", h.lr_scheduler, "--epochs", "1", "--seed", str(h.seed),
                           "--logging-steps", "5", "--collator", "seq2seq", "--sampler", "sequential"])
        hf, _, collator = build_trainer(args, [StepEnd()])
        hf.remove_callback(PrinterCallback)
        hf.train()
        trainer_batches[:] = collator.batches[:len(ends)]
        return steady_tokens_per_sec([b - a for a, b in zip(ends, ends[1:])], trainer_batches)

    speeds = alternate(rounds, {**{name: ours(name) for name in VARIANTS}, "Trainer": trainer}, label=NAME)
    shares = {**{name: share(b) for name, b in batches.items()}, "Trainer": share(trainer_batches)}

    rows = []
    for name, value in shares.items():
        is_packed = name == "ours, packed"
        counts = batches.get(name) or trainer_batches
        rows.append(Row(
            bench="3 wasted compute", figure=f"real (non-padding) share of computed tokens: {name}",
            value=f"{value:.1%}", target=f">= {TARGET_REAL:.0%}" if is_packed else "",
            met=verdict(value >= TARGET_REAL) if is_packed else "",
            detail=f"{sum(b[1] for b in counts):,} real of {sum(b[2] for b in counts):,} computed tokens; attention "
                   f"pairs within one example: {share(counts, 3, 4):.1%} of those computed"))
    for name in VARIANTS:
        ratios = [o / t for o, t in zip(speeds[name], speeds["Trainer"])]
        is_packed = name == "ours, packed"
        rows.append(Row(
            bench="3 wasted compute", figure=f"trained tokens/s: {name} / Trainer (dynamic padding)",
            value=f"{median(ratios):.2f}x", spread=spread(ratios, "{:.2f}", "x"),
            target=f">= {TARGET_SPEEDUP:.1f}x" if is_packed else "",
            met=verdict(median(ratios) >= TARGET_SPEEDUP) if is_packed else "",
            detail=f"{median(speeds[name]):,.0f} trained tokens/s against Trainer's {median(speeds['Trainer']):,.0f}",
            raw={"tokens_per_sec": speeds[name], "trainer_tokens_per_sec": speeds["Trainer"]}))
    rows[0].detail += (f"; data: {report.num_train_examples} examples, {report.num_tokens:,} tokens, lengths p50 "
                       f"{report.length_p50}, p95 {report.length_p95}, max {report.length_max}, "
                       f"{report.num_trained_tokens / report.num_tokens:.0%} trained")
    return rows


if __name__ == "__main__":
    main_for(run)
