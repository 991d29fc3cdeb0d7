"""Run the CPU benchmarks and write `bench/results/latest.md` (and a dated copy).

    python -m bench.run_all                  # everything, about 50 minutes on 2 cores (`make bench`)
    python -m bench.run_all --quick          # a smoke run of every benchmark but data_scale, about 5 minutes
    python -m bench.run_all --only overhead --only waste
    python -m bench.run_all --skip memory
    python -m bench.run_all --output /tmp/x.md   # write there instead of bench/results/

Benchmarks (each is also a module with `run(quick)` and `python -m bench.<module>`):

| name | module | what |
| --- | --- | --- |
| overhead | loop_overhead | our optimizer step against a bare torch loop on the same batches |
| trainer | vs_trainer | against transformers' Trainer: per step and end to end |
| waste | wasted_compute | padding and trained tokens/s on skewed lengths: unpacked, grouped, packed, Trainer |
| startup | startup | command to first optimizer step, against a bare `import torch, transformers` |
| preprocess | preprocess | bench_preprocess.py: cold and cached data preparation |
| resume | resume | to first step when resuming early and late |
| checkpoint | checkpoint | save time and size per checkpoint |
| loss | loss_memory | peak memory and step time of the fused loss (151,936-token vocabulary) against the logits path |
| optimizers | optimizers | state bytes and step time of adamw_8bit, paged_adamw_8bit and adafactor against AdamW |
| trl | trl_sft | trained tokens/s of our packing against TRL's SFTTrainer with padding-free BFD packing |
| data_scale | data_scale | memory and time of preparing 200k and 1M records, packing 1M examples, a 50 MB line |
| trl_data | trl_data | CPU time and peak memory of our data preparation against TRL SFTTrainer's (tokenize, BFD) |
| memory | bench_memory | peak memory and step time of LoRA, QLoRA, checkpointing against full fine-tuning |

`data_scale` (about 30 minutes; its own --quick a few) and `trl_data` (about 30 minutes; its own --quick 5-8)
are left out of --quick unless named with --only.
`memory` (a colleague's module, about 3 minutes) runs when `bench/bench_memory.py` exists, as its own
process (`python -m bench.bench_memory`): it forks children to measure resident memory and wants a
parent that has not computed anything; its table rows are read back into ours. It too is left out of
--quick unless named with --only (its own --quick takes about a minute).
Progress goes to stderr. A benchmark that fails becomes a row saying so; the others still run.
The GPU benchmark is separate: `scripts/gpu_check.sh` (bench/gpu.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import (MODEL_SHAPE, PYTHON, REPO_ROOT, THREADS, VOCAB_SIZE, Row, bench_model, configure_process,
                          count_parameters, log, machine_info, markdown_table, run_command, workspace)

BENCHMARKS = {
    "overhead": "bench.loop_overhead",
    "trainer": "bench.vs_trainer",
    "waste": "bench.wasted_compute",
    "startup": "bench.startup",
    "preprocess": "bench.preprocess",
    "resume": "bench.resume",
    "checkpoint": "bench.checkpoint",
    "loss": "bench.loss_memory",
    "optimizers": "bench.optimizers",
    "trl": "bench.trl_sft",
    "data_scale": "bench.data_scale",
    "trl_data": "bench.trl_data",
}
NOT_IN_QUICK = {"data_scale", "trl_data"}  # too long even as a smoke run: only when named with --only
OPTIONAL_SCRIPTS = {"memory": REPO_ROOT / "bench" / "bench_memory.py"}
# One line per benchmark for the report; the module docstrings say it in full.
HOW = {
    "overhead": "our `train()` in this process; after each of its optimizer steps (the loop's `on_step` "
                "hook) a bare torch loop does the same step on the same batches with the same weights and AdamW; "
                "steps summed in windows of 10, first window left out",
    "trainer": "per step: our `train()` and transformers' `Trainer` (in a thread, released one step at a time) "
               "interleaved step by step on the same packed rows and settings; end to end: `python -m launcher "
               "run` against `python bench/hf_trainer.py` as subprocesses, alternating rounds",
    "waste": "one epoch of skewed-length chat data per variant, alternating rounds; real share from the batches "
             "each loader makes; trained tokens/s over steps 2..last",
    "startup": "subprocesses in alternating rounds; end of first step = modification time of the run's only "
               "metrics record (Trainer: a callback), against the wall clock before the start",
    "preprocess": "`bench/bench_preprocess.py --records N` run twice; its per-run ratios",
    "resume": "resuming from copies of a step-10 and a step-190 checkpoint (epoch of 200 batches), in this "
              "process (warm) and as `python -m launcher run`, alternating rounds; plus the time to the first "
              "batch after skipping 49,999",
    "checkpoint": "our `Checkpointer.save` against `torch.save` of model and optimizer state, alternating rounds, "
                  "after two training steps",
    "loss": "three fresh processes, one training step each at Qwen3's vocabulary (hidden 64, 2 x 2,048 tokens, "
            "fp32): ours with the fused loss, ours with the logits path, Trainer; peak resident memory above the "
            "start of set-up, and the step's time",
    "optimizers": "each optimizer as the loop builds it on its own copy of the bench model, the same gradients; "
                  "state bytes after the first step against the plan's prediction, and `optimizer.step()` time in "
                  "rounds that rotate the order",
    "trl": "one epoch each of our `train()` (`data.packing`) and TRL's `SFTTrainer` (BFD packing, padding-free) "
           "on the same lognormal-length chat records and model, alternating rounds; trained tokens/s over steps "
           "2..last",
    "data_scale": "`build_datasets` (packing on) in a fresh process per size, 200k and 1M records and a 50 MB line; "
                  "peak resident memory and CPU time per record",
    "trl_data": "`build_datasets` (packing on, max_length 2048, num_proc 1, empty cache) against "
                "`load_dataset(\"json\")` + `SFTTrainer._prepare_dataset` (assistant-only masks, BFD packing, "
                "max_length 2048) on the same records and tokenizer, each in a fresh process, alternating rounds; "
                "CPU time per record, peak resident memory, and the tokens and packed rows each prepared",
    "memory": "a colleague's module: fresh processes per variant, resident memory and step time (its docstring)",
}
RESULTS = REPO_ROOT / "bench" / "results"


def run_script(name: str, path: Path, quick: bool) -> tuple[list[Row], str]:
    """A benchmark module run as its own process; its table rows, and its whole output for the report."""
    log_path = workspace() / f"{name}.log"
    module = f"bench.{path.stem}"
    log(f"{name}: python -m {module}{' --quick' if quick else ''} (its progress is in its log)")
    _, seconds, code = run_command([PYTHON, "-m", module, *(["--quick"] if quick else [])], log_path, timeout=900,
                                   check=False)
    output = log_path.read_text(encoding="utf-8", errors="replace")
    rows = parse_rows(output)
    if code != 0 or not rows:
        rows.append(Row(bench=name, figure="FAILED", value=f"exit {code}", detail=output.strip()[-500:]))
    stdout = "\n".join(line for line in output.splitlines()
                       if not line.startswith(("[bench", "[20", "Failed to load CPU gemm_4bit")))  # library noise
    return rows, f"\n## {name}: `python -m {module}` ({seconds:.0f} s)\n\n{stdout.strip()[-6000:]}\n"


def parse_rows(output: str) -> list[Row]:
    """The rows of the `markdown_table` a benchmark module printed."""
    rows = []
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] not in ("benchmark", "---"):
            rows.append(Row(*cells))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer rounds and steps (< 3 minutes)")
    parser.add_argument("--only", action="append", choices=[*BENCHMARKS, *OPTIONAL_SCRIPTS], metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join([*BENCHMARKS, *OPTIONAL_SCRIPTS])}")
    parser.add_argument("--skip", action="append", default=[], choices=[*BENCHMARKS, *OPTIONAL_SCRIPTS],
                        metavar="NAME", help="leave this benchmark out (repeatable)")
    parser.add_argument("--output", type=Path, help="markdown file to write (default: bench/results/latest.md "
                                                    "and a dated copy)")
    args = parser.parse_args(argv)
    configure_process()
    started = time.time()
    info = machine_info()
    # The colleagues' modules run when present, but not in a --quick smoke unless named with --only.
    found = [name for name, path in OPTIONAL_SCRIPTS.items() if path.exists() and not args.quick]
    every = [name for name in BENCHMARKS if not (args.quick and name in NOT_IN_QUICK)] + found
    names = [name for name in (args.only or every) if name not in args.skip]
    log(f"benchmarks: {', '.join(names)}{' (quick)' if args.quick else ''}; building the bench model")
    model_dir = bench_model()
    num_params = count_parameters(model_dir)

    rows: list[Row] = []
    extra, timings = "", {}
    for name in names:
        clock = time.time()
        log(f"=== {name}")
        try:
            if name in OPTIONAL_SCRIPTS:
                if not OPTIONAL_SCRIPTS[name].exists():
                    log(f"{name}: {OPTIONAL_SCRIPTS[name]} not found, skipped")
                    continue
                found, text = run_script(name, OPTIONAL_SCRIPTS[name], args.quick)
                rows += found
                extra += text
            else:
                rows += importlib.import_module(BENCHMARKS[name]).run(args.quick)
        except Exception as error:  # one broken benchmark must not cost the others' results
            traceback.print_exc()
            rows.append(Row(bench=name, figure="FAILED", value="error", detail=f"{type(error).__name__}: {error}"))
        timings[name] = time.time() - clock
        log(f"=== {name} took {timings[name]:.0f} s")
    total = time.time() - started

    text = report(rows, info, num_params, total, timings, args.quick) + extra
    targets = [path for path in ([args.output] if args.output else
                                 [RESULTS / "latest.md", RESULTS / f"{time.strftime('%Y-%m-%d')}.md"])]
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(markdown_table(rows))
    log(f"done in {total / 60:.1f} min; wrote {', '.join(str(p) for p in targets)}")
    return 0 if not any(r.figure == "FAILED" for r in rows) else 1


def report(rows: list[Row], info: dict, num_params: int, total: float, timings: dict, quick: bool) -> str:
    shape = MODEL_SHAPE
    lines = [
        "# TrainerEngine benchmarks (CPU)",
        "",
        f"`python -m bench.run_all{' --quick' if quick else ''}` (`make bench`), {total / 60:.1f} minutes"
        + (" — a quick smoke run: few rounds, not for quoting" if quick else "") + ".",
        "",
        "| | |", "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in info.items()],
        f"| model | Qwen3-shaped, random weights, {num_params / 1e6:.2f}M parameters (hidden {shape['hidden_size']}, "
        f"{shape['num_layers']} layers, {shape['num_heads']} heads, {max(1, shape['num_heads'] // 2)} kv heads, "
        f"intermediate {shape['intermediate_size']}, vocab {VOCAB_SIZE} byte-level BPE, tied embeddings), fp32 |",
        "",
        "Every figure is a ratio of variants measured alternately in one script, because this shared 2-core "
        "machine drifts by about +/-12%: the median, with the min-max of the per-round (or per-window) values "
        f"and how many there were. Every process uses {THREADS} torch thread(s) (`BENCH_THREADS`). Absolute "
        "numbers (in the details) are for reading the ratios, not for comparing machines. How each figure is "
        "measured is in the docstring of its module (`bench/<module>.py`).",
        "",
        markdown_table(rows),
        "",
        "## How each figure is measured",
        "",
        *[f"- **{name}** (`{BENCHMARKS.get(name, 'bench.bench_' + name)}`): {HOW[name]}." for name in timings
          if name in HOW],
        "",
        "## Details",
        "",
        *[f"- **{r.bench}**, {r.figure}: {r.detail}" for r in rows if r.detail],
        "",
        "Time per benchmark: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
