"""2. Against transformers' Trainer: time per step, and end to end from the command to its exit.

    python -m bench.vs_trainer [--quick]

The two sides:

- ours: the job of benchmark 1 (packed rows of 256 tokens, 2 rows x 2 micro-batches per step,
  fp32, no evaluation, no step checkpoints, logging every 10 steps, `final/` written at the end);
- Trainer: `bench/hf_trainer.py` (see its docstring): the same model folder, the very same
  tokenized rows (our data cache, loaded with `datasets.load_from_disk`), the same collator,
  batch, accumulation, learning rate, schedule, clipping, seed, logging interval and fp32, and the
  same attention (SDPA once per packed example, `loop/attention.py`: the model's work, not the loop's);
  Trainer's own AdamW default; no evaluation, no checkpoints; the model saved at the end.
Both read pre-tokenized data (the cache is filled first), so this is about the loop and start-up,
not tokenization (benchmark 5 measures that).

- time per step: in one process, step by step. Our `train` runs in the main thread; each Trainer's
  `train()` runs in a thread of its own that is only ever allowed one optimizer step at a time (a
  callback at `on_step_end` parks it on a semaphore), so no two loops compute at the same time.
  After each of our steps (the loop's `on_step` hook, as in benchmark 1) each Trainer takes one step.
  Steps are summed in windows of 10 (each holding one logging event on every side), the first
  window left out; the figure is the median of the per-window ratios.
  Packed rows are all about 256 tokens long, so the different random orders cost the same.
  The second Trainer differs from the first only by `optim="adamw_torch"` (torch's foreach AdamW;
  Trainer's default is torch's fused AdamW): ours against both separates what the AdamW
  implementation costs from the rest. Which one our loop built is read from its optimizer and
  shown in the details. (The second Trainer is left out with --quick.)
- end to end: wall seconds from starting the command to its exit, as a user starts them, as
  subprocesses alternating in rounds: `python -m launcher run job.toml` against
  `python bench/hf_trainer.py ...`, N steps each. The details split it at the end of the last
  step (ours: when its metrics record was written; Trainer: its callback's timestamp): start-up
  plus steps, then what each does after training (ours writes `final/`, result.json and the
  run report with its loss plot; the Trainer script saves the model and tokenizer).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import (PYTHON, REPO_ROOT, Row, adamw_kind, alternate, load_job, log, main_for, median,
                          prepared_data, run_command, run_command_of, spread, steady_job, train_interleaved, workspace)
from bench.hf_trainer import build_trainer, parse_args

NAME = "trainer"


def trainer_arguments(config, train_dir: Path, output: Path, timings: Path, *, collator: str = "ours",
                      max_steps: int | None = None, logging_steps: int | None = None) -> list[str]:
    """Arguments of `bench/hf_trainer.py` with the settings of our job `config`."""
    h = config.hyperparams
    return ["--model", config.model.model_path,
            "--train", str(train_dir), "--output", str(output), "--timings", str(timings),
            "--batch-size", str(h.batch_size), "--accumulation", str(h.gradient_accumulation),
            "--learning-rate", repr(h.learning_rate), "--scheduler", h.lr_scheduler,
            "--max-steps", str(max_steps if max_steps is not None else h.max_steps),
            "--epochs", repr(float(h.num_epochs)), "--seed", str(h.seed),
            "--logging-steps", str(logging_steps or config.environment.logging_steps), "--collator", collator,
            *(["--attn", "sdpa_packed"] if config.data.packing else [])]  # the model computes what ours does


class TrainerStepper:
    """A Trainer whose `train()` runs in a thread, one optimizer step per `steps(1)` call."""

    def __init__(self, trainer):
        import threading

        from transformers import TrainerCallback

        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.stopping, self.error = False, None
        stepper = self

        class Park(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stepper.done.release()
                stepper.go.acquire()
                if stepper.stopping:
                    control.should_training_stop = True

        trainer.add_callback(Park())
        self.trainer = trainer
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self) -> None:
        self.go.acquire()
        try:
            self.trainer.train()
        except BaseException as error:  # surfaced by steps() / close() in the main thread
            self.error = error
            self.done.release()

    def steps(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            self.go.release()
            self.done.acquire()
            if self.error is not None:
                raise RuntimeError(f"Trainer failed: {self.error!r}") from self.error
        return time.perf_counter() - started

    def close(self) -> None:
        self.stopping = True
        self.go.release()
        self.thread.join(timeout=120)


def run(quick: bool = False) -> list[Row]:
    rounds, num_steps = (1, 20) if quick else (3, 80)
    e2e_steps = 3 if quick else 6
    folder = workspace() / NAME
    job = steady_job(folder, **{"hyperparams.max_steps": num_steps})
    config = load_job(job)
    window = config.environment.logging_steps
    data, _ = prepared_data(job)  # fills the cache both sides read
    train_dir = data.cache_path / "train"

    log(f"{NAME}: {num_steps} steps of ours, each followed by one step of two Trainers (in parked threads)")
    from transformers.trainer_callback import PrinterCallback

    steppers = []
    for optim in (None,) if quick else (None, "adamw_torch"):  # --quick: only the figure with the target
        arguments = trainer_arguments(config, train_dir, folder / f"trainer-in-process-{optim}", folder / "unused.json",
                                      max_steps=num_steps + 5) + (["--optim", optim] if optim else [])
        trainer, _, _ = build_trainer(parse_args(arguments))
        trainer.remove_callback(PrinterCallback)  # its log lines would land in our stdout table
        steppers.append(TrainerStepper(trainer))
    try:
        hook = train_interleaved(job, folder / "ours-in-process", steppers)
    finally:
        for stepper in steppers:
            stepper.close()
    windows = hook.windows(window, skip=window)
    step_ratios = [w[0] / w[1] for w in windows]
    same_adamw = [w[0] / w[2] for w in windows] if not quick else []

    phases: dict[str, list[tuple[float, float]]] = {"ours": [], "trainer": []}  # (to last step, after it)

    def ours(round_index: int) -> float:
        output = folder / f"ours-{round_index}"
        command = run_command_of(job, f"output.output_dir={output}", f"hyperparams.max_steps={e2e_steps}")
        started, seconds, _ = run_command(command, folder / f"ours-{round_index}.log")
        last_step = (output / "metrics.jsonl").stat().st_mtime  # the last record, written at the last step
        phases["ours"].append((last_step - started, started + seconds - last_step))
        return seconds

    def hf(round_index: int) -> float:
        output, timings = folder / f"trainer-{round_index}", folder / f"trainer-{round_index}.json"
        command = [PYTHON, str(REPO_ROOT / "bench" / "hf_trainer.py"),
                   *trainer_arguments(config, train_dir, output, timings, max_steps=e2e_steps)]
        started, seconds, _ = run_command(command, folder / f"trainer-{round_index}.log")
        last_step = json.loads(timings.read_text())["step_end"][-1]
        phases["trainer"].append((last_step - started, started + seconds - last_step))
        return seconds

    log(f"{NAME}: end to end, {rounds} rounds of {e2e_steps} steps, each side in its own process")
    wall = alternate(rounds, {"ours": ours, "trainer": hf}, label=NAME)
    wall_ratios = [o / t for o, t in zip(wall["ours"], wall["trainer"])]

    def phase(name: str, index: int) -> float:
        return median([p[index] for p in phases[name]])

    return [
        Row(bench="2 vs HF Trainer", figure="time per optimizer step: ours / Trainer (same rows, settings, fp32)",
            value=f"{median(step_ratios):.3f}x", spread=spread(step_ratios, "{:.3f}", "x"), target="<= 1.00x",
            met=no_slower(step_ratios),
            detail=f"ours ({adamw_kind(hook.optimizer)} AdamW) {median([w[0] for w in windows]):.3f} s/step, "
                   f"Trainer {median([w[1] for w in windows]):.3f} s/step"
                   + (f", Trainer with `optim=\"adamw_torch\"` {median([w[2] for w in windows]):.3f} s/step"
                      if same_adamw else "")
                   + f" (steps {window + 1}-{num_steps} interleaved one by one, {len(windows)} windows of {window})",
            raw={"windows_s_per_step": windows}),
        *([Row(bench="2 vs HF Trainer", figure="ours / Trainer with `optim=\"adamw_torch\"` (torch's foreach AdamW "
                                               "instead of Trainer's default fused one)",
               value=f"{median(same_adamw):.3f}x", spread=spread(same_adamw, "{:.3f}", "x"))] if same_adamw else []),
        Row(bench="2 vs HF Trainer", figure=f"end to end, command to exit ({e2e_steps} steps): ours / Trainer",
            value=f"{median(wall_ratios):.3f}x", spread=spread(wall_ratios, "{:.3f}", "x"), target="<= 1.00x",
            met=no_slower(wall_ratios),
            detail=f"ours {median(wall['ours']):.1f} s ({phase('ours', 0):.1f} s to the end of the last step, then "
                   f"{phase('ours', 1):.1f} s: final model, result, report), Trainer {median(wall['trainer']):.1f} s "
                   f"({phase('trainer', 0):.1f} s, then {phase('trainer', 1):.1f} s: model and tokenizer saved) "
                   f"(`python -m launcher run` vs `python bench/hf_trainer.py`, {rounds} alternating rounds)",
            raw={"ours_s": wall["ours"], "trainer_s": wall["trainer"], "phases": phases}),
    ]


def no_slower(ratios: list[float]) -> str:
    """"yes" when the median ratio is at most 1; "within noise" when above 1 but a round was at or below 1."""
    if median(ratios) <= 1.0:
        return "yes"
    return "within noise" if min(ratios) <= 1.0 else "no"


if __name__ == "__main__":
    main_for(run)
