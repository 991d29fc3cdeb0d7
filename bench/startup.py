"""4. Start-up: seconds from the command to the end of the first optimizer step.

    python -m bench.startup [--quick]

Each command runs as a user types it, as a subprocess, in alternating rounds (rotating the order):

- `python -c "import torch, transformers"`: the floor, what importing the libraries alone costs;
- `python -m launcher run job.toml`;
- `accelerate launch --num_processes 1 ... -m launcher run job.toml`;
- `python bench/hf_trainer.py ...` (transformers' Trainer on the same tokenized rows), for reference
  (left out with --quick).

The job: the bench model, 64 short chat records already tokenized (a warm data cache, as on any
second run), 1 step, logging every step. The end of our first step is when its `metrics.jsonl`
record was written (the file's modification time; the run writes exactly one record); the
Trainer's is the time a callback sees `on_step_end`. Both are taken against the wall clock read
just before the subprocess starts. The figures are medians over rounds of the seconds and of the
per-round ratio to the floor.
"""

from __future__ import annotations

import json

from bench.common import (PYTHON, REPO_ROOT, Row, alternate, bench_job, bench_model, dataset_file, first_record_time,
                          load_job, log, main_for, median, prepared_data, run_command, run_command_of, spread,
                          workspace)

NAME = "startup"


def run(quick: bool = False) -> list[Row]:
    rounds = 1 if quick else 2
    folder = workspace() / NAME
    data = dataset_file("startup", 64, lengths="uniform", low=32, high=200)
    job = bench_job(folder, bench_model(), data, **{"hyperparams.max_steps": 1, "environment.logging_steps": 1,
                                                     "hyperparams.batch_size": 2})
    config = load_job(job)
    prepared, _ = prepared_data(job)
    log(f"{NAME}: data cache warm; {rounds} rounds")

    def floor(round_index: int) -> float:
        return run_command([PYTHON, "-c", "import torch, transformers"], folder / f"import-{round_index}.log")[1]

    def ours(accelerate: bool):
        def variant(round_index: int) -> float:
            output = folder / f"{'accelerate' if accelerate else 'launcher'}-{round_index}"
            started, _, _ = run_command(run_command_of(job, f"output.output_dir={output}", accelerate=accelerate),
                                        folder / f"{output.name}.log")
            return first_record_time(output) - started
        return variant

    def trainer(round_index: int) -> float:
        h = config.hyperparams
        timings = folder / f"trainer-{round_index}.json"
        command = [PYTHON, str(REPO_ROOT / "bench" / "hf_trainer.py"), "--model", config.model.model_path,
                   "--train", str(prepared.cache_path / "train"), "--output", str(folder / f"trainer-{round_index}"),
                   "--timings", str(timings), "--batch-size", str(h.batch_size), "--max-steps", "1",
                   "--learning-rate", repr(h.learning_rate), "--logging-steps", "1", "--collator", "ours"]
        started, _, _ = run_command(command, folder / f"trainer-{round_index}.log")
        return json.loads(timings.read_text())["step_end"][0] - started

    names = {"import": "`python -c \"import torch, transformers\"` (floor)",
             "launcher": "`python -m launcher run`",
             "accelerate": "`accelerate launch -m launcher run`",
             "trainer": "HF Trainer script (reference)"}
    variants = {"import": floor, "launcher": ours(False), "accelerate": ours(True), "trainer": trainer}
    if quick:
        del variants["trainer"]
    seconds = alternate(rounds, variants, label=NAME)
    rows = []
    for key, label in names.items():
        if key not in seconds:
            continue
        ratios = [s / f for s, f in zip(seconds[key], seconds["import"])]
        what = "command to exit" if key == "import" else "command to end of first optimizer step"
        rows.append(Row(bench="4 start-up", figure=f"{label}: {what}, s",
                        value=f"{median(seconds[key]):.1f} s", spread=spread(seconds[key], "{:.1f}", " s"),
                        detail="" if key == "import" else f"{median(ratios):.2f}x the floor "
                                                          f"(per-round ratios {spread(ratios, '{:.2f}', 'x')})",
                        raw={"seconds": seconds[key], "ratio_to_floor": ratios}))
    return rows


if __name__ == "__main__":
    main_for(run)
