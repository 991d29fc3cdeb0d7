"""1. Loop overhead: our optimizer step against a bare torch loop on identical batches.

    python -m bench.loop_overhead [--quick]

How it is measured, and why this way:

- Ours is the real thing: `loop.train.train` on a job file (packed rows of 256 tokens, 2 rows per
  micro-batch, 2 micro-batches per step, fp32, the default logging interval of 10 steps), in this
  process. Its per-step time is the wall time between two logging events divided by 10, so it
  holds everything the loop does per step (token counting, the all-reduce, clipping, the NaN
  guard, the scheduler, the checkpointer's check) plus one status.json and one metrics line per
  10 steps, and none of the start-up (data, model, Accelerate) or the final save.
- The baseline is the loop every tutorial writes: `model(**batch).loss / accumulation`, `backward`,
  `clip_grad_norm_(1.0)`, `AdamW.step`, `zero_grad`, with the same initial weights (loaded from the
  same folder) and the same attention (SDPA once per packed example), the same AdamW settings and
  implementation (fused or foreach, whichever
  `loop.train.build_optimizer` picks for this job: the kernel is not the loop's overhead) and the
  very same batches (the first micro-batches of our own data loader: same sampler, seed and
  collator, collected before timing).
- They alternate step by step. The shared machine's speed drifts by +/-12% over seconds to
  minutes, so alternating whole runs would need many rounds to resolve 5%. Instead the loop's
  `on_step` hook (`train(config, on_step=...)`, called at the end of every optimizer step) makes the
  bare loops do the same step right after each of ours; the time spent there is taken out of ours.
  Our step k is the time from leaving the hook after step k-1 to entering it after step k: data,
  forward/backward, clip, step, and the logging and checkpoint check of step k. Steps are summed
  in windows of 10 (each holding one logging event); the first window (warm-up) is left out. The
  figure is the median of the per-window ratios ours / bare, with their min-max.
- A second bare loop runs in the same hook, identical except that its loss is our
  `loop.train.summed_token_loss` divided by the step's supervised-token count (the loss our loop
  optimises) instead of `model(**batch).loss`. Ours against it isolates the loop machinery
  (Accelerate, token counting, logging); the two bare loops against each other show what the
  loss computation itself costs. (Left out with --quick.)
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (Row, adamw_kind, bench_model, load_job, log, main_for, median, our_loader, spread,
                          steady_job, train_interleaved, verdict, workspace)

NAME = "overhead"
TARGET = 1.05


class BareLoop:
    """A plain torch training loop over pre-collected batches, run `window` steps at a time."""

    def __init__(self, model_dir: Path, batches: list[list[dict]], config, loss: str = "hf"):
        import torch
        from transformers import AutoModelForCausalLM

        h = config.hyperparams
        self.max_grad_norm = h.max_grad_norm
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        if config.data.packing:  # the attention our loop's model runs (loop/attention.py): not the loop's overhead
            from loop.attention import use_packed_sdpa

            use_packed_sdpa(self.model)
        self.model.config.use_cache = False
        self.model.train()
        from loop.train import build_optimizer

        self.adamw = adamw_kind(build_optimizer(self.model, config))  # the implementation our loop will use
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=h.learning_rate, betas=tuple(h.adam_betas),
                                           eps=h.adam_epsilon, weight_decay=h.weight_decay,
                                           fused=True if self.adamw == "fused" else None)
        self.batches = iter(batches)
        self.loss = loss

    def steps(self, count: int) -> float:
        """Run `count` optimizer steps; their wall seconds."""
        import torch

        started = time.perf_counter()
        for _ in range(count):
            step_batches = next(self.batches)
            if self.loss == "token_sum":
                from loop.train import summed_token_loss

                num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
            for batch in step_batches:
                if self.loss == "token_sum":
                    loss = summed_token_loss(self.model, batch)[0].sum() / num_tokens
                else:
                    loss = self.model(**batch).loss / len(step_batches)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def our_batches(job: Path, num_steps: int) -> list[list[dict]]:
    """The micro-batches our loop sees in its first `num_steps` steps, grouped per step."""
    accumulation = load_job(job).hyperparams.gradient_accumulation
    micro = []
    for batch in our_loader(job):
        micro.append(batch)
        if len(micro) == num_steps * accumulation:
            break
    assert len(micro) == num_steps * accumulation, "the bench data has too few batches for this many steps"
    return [micro[i:i + accumulation] for i in range(0, len(micro), accumulation)]


def run(quick: bool = False, rounds: int = 1) -> list[Row]:
    num_steps = 20 if quick else 50
    folder = workspace() / NAME
    job = steady_job(folder, **{"hyperparams.max_steps": num_steps})
    config = load_job(job)
    window = config.environment.logging_steps
    log(f"{NAME}: tokenizing, collecting {num_steps} steps of batches")
    batches = our_batches(job, num_steps)

    losses = ("hf",) if quick else ("hf", "token_sum")  # --quick: only the figure with the target
    windows = []
    for round_index in range(rounds):
        log(f"{NAME}: {num_steps} steps of ours, each followed by the same step of {len(losses)} bare loop(s)")
        bare_loops = [BareLoop(bench_model(), batches, config, loss) for loss in losses]
        hook = train_interleaved(job, folder / f"out-{round_index}", bare_loops)
        windows += hook.windows(window, skip=window)
    ours, bare = [w[0] for w in windows], [w[1] for w in windows]
    ratios = [o / b for o, b in zip(ours, bare)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches[0])
    rows = [Row(bench="1 loop overhead", figure="time per optimizer step: ours / bare torch loop (same batches, fp32)",
                value=f"{median(ratios):.3f}x", spread=spread(ratios, "{:.3f}", "x"), target=f"<= {TARGET:.2f}x",
                met=verdict(median(ratios) <= TARGET),
                detail=f"ours {median(ours):.3f} s/step, bare {median(bare):.3f}"
                       + (f", bare with our loss {median([w[2] for w in windows]):.3f}" if not quick else "")
                       + f" ({tokens} tokens/step; {bare_loops[0].adamw} AdamW on both sides; steps {window + 1}-"
                         f"{num_steps} interleaved one by one, summed in {len(windows)} windows of {window})",
                raw={"ours_s_per_step": ours,
                     **{f"bare_{loss}_s_per_step": [w[i + 1] for w in windows] for i, loss in enumerate(losses)}})]
    if not quick:
        bare_token_sum = [w[2] for w in windows]
        machinery = [o / b for o, b in zip(ours, bare_token_sum)]
        loss_cost = [b2 / b for b2, b in zip(bare_token_sum, bare)]
        rows += [
            Row(bench="1 loop overhead", figure="of which the loop machinery: ours / bare loop using our loss",
                value=f"{median(machinery):.3f}x", spread=spread(machinery, "{:.3f}", "x")),
            Row(bench="1 loop overhead", figure="of which the loss: bare loop with our loss / with `model(...).loss`",
                value=f"{median(loss_cost):.3f}x", spread=spread(loss_cost, "{:.3f}", "x")),
        ]
    return rows


if __name__ == "__main__":
    main_for(run)
