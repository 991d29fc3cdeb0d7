"""Memory-saving fine-tuning: peak memory and step time of LoRA, QLoRA and gradient checkpointing,
as ratios to full fine-tuning, on CPU.

    python -m bench.bench_memory [--quick]        # about 3 minutes on 2 cores; --quick under 1

The model is a Qwen3-shaped causal LM with random weights built here (hidden 512, 8 layers, vocab
512: about 25M parameters; --quick: hidden 256, 4 layers, 3M), loaded and set up by the product's
own `loop.model.build_model`, so LoRA (r 16, alpha 32, dropout 0.05, all-linear), NF4 loading and
checkpointing are exactly what a job gets. A step is forward, backward and AdamW on one row of 384
random tokens (256 with --quick), fp32.

How it is measured, and why this way:

- Fresh processes. This process imports torch, transformers, peft and bitsandbytes once, touches no
  tensor, and forks a child per measurement, which loads the model, trains, reports and exits. So
  no variant inherits another's allocations (or the heap glibc keeps after frees), and none pays
  8 s of imports. Each variant gets two children per round, one for memory and one for time
  (below). Variants alternate in rounds, rotating which goes first; figures are medians over rounds.
- Memory is the resident set (RSS) from /proc: torch's CPU tensors come from plain malloc, which
  `tracemalloc` (Python objects only) cannot see and no torch counter tracks on CPU. RSS counts
  live tensors only with three corrections, made in the memory child:
  1. Baseline: RSS just before the model is loaded (interpreter, libraries, tokenizer: the same for
     every variant) is subtracted.
  2. The checkpoint is memory-mapped, and pages read while loading stay in RSS while the mapping
     lives, even unused ones (QLoRA reads every fp32 weight to quantise it). After loading, those
     pages are paged out (MADV_PAGEOUT, Linux >= 5.4); the weights training uses fault back in and
     are counted.
  3. glibc raises its mmap threshold as a program frees large blocks and then serves them from a
     heap it rarely gives back, so RSS would show the allocator's high-water mark, not the live
     tensors'. The memory child fixes the threshold first (`mallopt`, 128 KiB: every tensor above
     it is mapped on allocation and unmapped on free).
  It then runs two steps and resets the kernel's peak counter (VmHWM, `echo 5 >
  /proc/self/clear_refs`, Linux >= 4.0) between them: "training peak" = VmHWM of the second step -
  baseline: weights, gradients, AdamW state and activations. "weights" is what the parameters and
  buffers hold (4-bit ones as stored), for reading alongside.
- Time: the time child keeps the allocator as a job has it (the fixed threshold costs page faults
  on every large allocation) and reports the median of its timed steps after one warm-up step.

Ratios compare variants measured in the same rounds; absolute numbers are for reading only (noise
on these machines is about +/-12%, ENVIRONMENT.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
import warnings
from pathlib import Path

from bench.common import REPO_ROOT, Row, alternate, configure_process, log, markdown_table, median, spread, workspace
from tests.helpers import in_fresh_process

NAME = "memory"
LORA = {"lora.enabled": True, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05, "lora.target_modules": "all-linear"}
VARIANTS = {
    "full": {},
    "full + checkpointing": {"model.gradient_checkpointing": True},
    "LoRA": LORA,
    "LoRA + checkpointing": {**LORA, "model.gradient_checkpointing": True},
    "QLoRA": {**LORA, "model.load_in_4bit": True},
    "QLoRA + checkpointing": {**LORA, "model.load_in_4bit": True, "model.gradient_checkpointing": True},
}
SHAPES = {
    "default": {"model": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1536},
                "length": 384, "steps": 2, "rounds": 3},
    "quick": {"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 768},
              "length": 256, "steps": 2, "rounds": 1},
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MADV_PAGEOUT = 21


# --- memory of this process --------------------------------------------------------------------------

def _libc():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def return_free_heap(*, fix_threshold: bool = False) -> None:
    """Give freed heap back to the kernel; with `fix_threshold`, keep doing so for large blocks."""
    libc = _libc()
    if fix_threshold:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    libc.malloc_trim(0)


def page_out_checkpoint_files() -> None:
    """Drop the resident pages of memory-mapped `.safetensors` files (they fault back in when used)."""
    libc = _libc()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(start, end - start, _MADV_PAGEOUT) != 0:
                raise OSError(ctypes.get_errno(), "madvise(MADV_PAGEOUT) failed (needs Linux >= 5.4)")


# --- one measurement (in a forked child) -------------------------------------------------------------

def import_libraries(model_dir: Path) -> None:
    """Everything any variant imports, so the child's baseline and work are the same for all."""
    import importlib

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import launcher.config  # noqa: F401
    import loop.model  # noqa: F401

    for name in ("peft", "bitsandbytes", "transformers.integrations.bitsandbytes"):
        importlib.import_module(name)
    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]  # the modeling module


def measure(spec: dict, what: str) -> dict:
    """In a fresh process: load the model as `spec["settings"]` say and train.

    `what` = "memory": two steps under a fixed mmap threshold, the peak of the second (the first
    allocates AdamW's state); "time": a warm-up step, then `spec["steps"]` timed steps, with the
    allocator as a job has it.
    """
    import gc

    import torch
    from transformers import AutoTokenizer

    from loop.model import build_model, count_parameters
    from tests.helpers import job_config, random_batch

    if what == "memory":
        return_free_heap(fix_threshold=True)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    config = job_config(spec["model_dir"], "unused", **spec["settings"])
    batch = random_batch(len(tokenizer), rows=1, length=spec["length"])
    gc.collect()
    return_free_heap()
    baseline = rss_bytes()

    model = build_model(config, tokenizer)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    if what == "time":
        step()
        return {"step_sec": median([step() for _ in range(spec["steps"])])}
    gc.collect()
    return_free_heap()
    page_out_checkpoint_files()
    step()
    gc.collect()
    return_free_heap()
    reset_peak_rss()
    step()
    trainable, total = count_parameters(model)
    # What the weights take (4-bit ones as stored), for reading alongside the peak.
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"training_peak": peak_rss_bytes() - baseline, "weights": weights, "trainable": trainable, "total": total}


def build_bench_model(folder: Path, shape: dict) -> Path:
    """Tokenizer (vocab 512) and random model, built in a child so this process computes nothing."""
    def build() -> dict:
        from launcher.demo import build_model, build_tokenizer

        folder.mkdir(parents=True, exist_ok=True)
        build_model(folder, build_tokenizer(folder, vocab_size=512), **shape)
        return {}

    in_fresh_process(build)
    return folder


# --- the rounds ---------------------------------------------------------------------------------------

def run(quick: bool) -> list[Row]:
    shape = SHAPES["quick" if quick else "default"]
    model_dir = build_bench_model(workspace() / "memory-model", shape["model"])
    import_libraries(model_dir)
    log(f"model {shape['model']}, {shape['length']} tokens a step; {shape['rounds']} round(s) of {len(VARIANTS)}")

    def variant(name: str):
        spec = {"model_dir": str(model_dir), "settings": VARIANTS[name], "length": shape["length"],
                "steps": shape["steps"]}
        # Memory and time in separate processes: exact memory accounting slows the allocator.
        return lambda _round: {**in_fresh_process(lambda: measure(spec, "memory")),
                               **in_fresh_process(lambda: measure(spec, "time"))}

    results = alternate(shape["rounds"], {name: variant(name) for name in VARIANTS}, label="memory")
    rows = []
    for name, runs in results.items():
        memory = [r["training_peak"] / f["training_peak"] for r, f in zip(runs, results["full"])]
        times = [r["step_sec"] / f["step_sec"] for r, f in zip(runs, results["full"])]
        detail = (f"training peak {median([r['training_peak'] for r in runs]) / 2**20:.0f} MiB, weights "
                  f"{runs[0]['weights'] / 2**20:.0f} MiB, step "
                  f"{median([r['step_sec'] for r in runs]):.2f} s, trainable {runs[0]['trainable']:,} of "
                  f"{runs[0]['total']:,} parameters")
        rows.append(Row(bench="memory", figure=f"{name}: training peak / full", value=f"{median(memory):.2f}",
                        spread=spread(memory), detail=detail, raw={"runs": runs}))
        rows.append(Row(bench="memory", figure=f"{name}: step time / full", value=f"{median(times):.2f}",
                        spread=spread(times)))
    return rows


def table(rows: list[Row]) -> str:
    """One line per variant, memory and time side by side."""
    lines = ["| variant | training peak (MiB) | / full | weights (MiB) | step (s) | / full | "
             "trainable parameters |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for memory_row, time_row in zip(rows[::2], rows[1::2]):
        runs = memory_row.raw["runs"]
        lines.append(
            f"| {memory_row.figure.split(':')[0]} | {median([r['training_peak'] for r in runs]) / 2**20:.0f} | "
            f"{memory_row.value} | {runs[0]['weights'] / 2**20:.0f} | "
            f"{median([r['step_sec'] for r in runs]):.2f} | {time_row.value} | {runs[0]['trainable']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and one round (a smoke run)")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        sys.exit("bench_memory reads /proc and glibc's allocator: Linux only")
    configure_process()
    warnings.simplefilter("ignore")  # deprecation notices of the libraries, once per forked child
    started = time.time()
    rows = run(args.quick)
    print(table(rows))
    print()
    print(markdown_table(rows))
    print(f"\n{len(rows) // 2} variants, {time.time() - started:.0f} s; ratios are medians over rounds, "
          "the spread their min-max per round.")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main()
