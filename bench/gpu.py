"""GPU check: our loop against transformers' Trainer on a ~0.5B Qwen-shaped model, the fused loss, compile
and the memory planner against measured peaks, plus QLoRA and DeepSpeed ZeRO-2 smoke runs. One script,
under 8 minutes on one H100/H200/A100.

    scripts/gpu_check.sh                      # = python bench/gpu.py, on a machine with a CUDA GPU
    python bench/gpu.py --cpu-smoke           # the same code paths with a tiny model on CPU, a few steps
    PEAK_TFLOPS=500 python bench/gpu.py       # an MFU denominator for a GPU not in the table

What it does, in a temporary folder, with nothing from a model hub:

1. A Qwen2-0.5B-shaped model from its config (hidden 896, 24 layers, 14 heads, 2 kv heads,
   intermediate 4864, vocab 151936, tied embeddings; about 494M parameters) with random weights,
   saved in bf16, and the bench's byte-level BPE ChatML tokenizer (its ids use the first 2048 rows
   of the embedding; every step still computes the full 151936-way output layer).
2. Synthetic chat data of skewed lengths, tokenized once into the data cache both sides read.
3. Dense, our loop: `python -m launcher run` (bf16 autocast on fp32 master weights, packing into
   rows of 2048 tokens, 4 rows per micro-batch, 2 micro-batches per step (`--batch-size`,
   `--accumulation`), flash-attention 2 when `flash_attn` imports, else `auto`: SDPA once per
   packed example, `loop/attention.py`; then also "ours masked SDPA", the same job under
   transformers' own SDPA, one masked call per row, for the ratio of the two). Tokens/s are the
   input tokens the model computed (packed rows, batch padding included) per second over steps
   11..N, from `metrics.jsonl`; peak memory from result.json (`torch.cuda.max_memory_allocated`).
4. Dense, Trainer: `bench/hf_trainer.py --device cuda --bf16` on the same rows with the same
   collator, batch, accumulation, learning rate and attention kernel; tokens/s over the same steps
   from a callback that synchronises CUDA at each step end; peak memory from the script.
5. MFU = 6 x parameters x tokens/s / peak bf16 dense FLOP/s (attention FLOPs not counted), with the
   peak from `PEAK_TFLOPS` or `loop/throughput.py`'s table by GPU name. Target for the dense model:
   >= 40%. Attention adds about 12 x layers x hidden x sequence FLOPs per token (about 18% more
   for this model at 2048 tokens, less for packed short examples), so the figure understates use.
6. Fused against logits loss: the dense job for 20 steps logged at every step, once with
   `hyperparams.loss = "logits"` and once with `"fused"`: peak memory (`torch.cuda.max_memory_allocated`,
   from result.json) and tokens/s (steps 6..20) of each, their ratios, and the relative difference of
   the first 3 steps' losses (reported; the paths differ only in rounding).
7. Compile: the fused run again with `model.compile = true` against the eager one of 6: the relative
   difference of the first 3 steps' losses (target <= 1e-4), tokens/s after the warm-up (steps 6..20),
   and the compile time (time to the first step, compiled minus eager).
8. The planner: `launcher.plan.plan_job`'s predicted peak per device (in-process, this GPU's memory) for
   each of our runs (dense, 6, 7, QLoRA, ZeRO-2) against its measured peak; the error in percent
   (target within +-15%; the plan does not model compile, so it over-estimates that run).
9. QLoRA smoke: the same job with `model.load_in_4bit = true` and `[lora] enabled = true`, a few
   steps through `python -m launcher run`; checks that it succeeds, that the loss is finite, and
   that `final/` holds a LoRA adapter (`adapter_config.json`), i.e. that an adapter was trained.
10. ZeRO-2 smoke: the same dense job through `python -m launcher run` with `[launch]
   accelerate_config` naming a one-process DeepSpeed ZeRO-2 file; success, tokens/s, peak memory
   (DeepSpeed's bf16 mode keeps bf16 weights with an fp32 master copy and no autocast, so its
   figures are not those of the dense recipe).

Flash attention is used only when flash-attn imports (a build for another torch falls back to
SDPA; Trainer then gets our per-example SDPA too, `--attn sdpa_packed`). Packed batches then carry the flattened batch's sequence boundaries (`cu_seq_lens_q/k`);
`tests/test_data.py::test_packed_loss_with_flash_attention_equals_unpacked_on_cuda`, run first by
`scripts/gpu_check.sh` with the other GPU-marked tests, checks that examples stay apart.

Every run has a time limit, and all of them together at most 7 minutes (15 with --cpu-smoke; a run
that would start with less than 30 s left is reported as skipped). With --cpu-smoke, 6 and 7 run 4
steps (tokens/s after step 1) and the memory figures are the processes' peak RSS (`ru_maxrss`,
libraries included): the planner's predictions are listed but not compared. It prints one table
at the end (the runs, then the fused/logits, compile/eager and planner figures with their targets)
and writes its raw numbers, `comparisons` included, to `$OUT/gpu_check.json` when `$OUT` is set,
else to `bench/results/gpu-<date>.json` (`gpu-cpu-smoke-<date>.json` with --cpu-smoke).
Exit code 0 when every run succeeded (targets missed are reported, not failures), 1 otherwise.
`--skip loss`, `--skip compile` (and trainer, masked, qlora, zero2) leave parts out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_MFU = 0.40
TARGET_COMPILE_REL = 1e-4  # compiled layers' first losses against eager ones, relative
TARGET_PLAN_ERROR = 0.15  # the planner's predicted peak against the measured one, relative
# Every run gets at most what is left of this; with imports and the kill grace of a timed-out run
# the script ends within 8 minutes.
BUDGET_S = 420


@dataclass
class Settings:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    batch_size: int
    accumulation: int
    max_steps: int
    logging_steps: int
    smoke_steps: int
    num_records: int
    timeout_s: int
    extra_steps: int
    """Steps of each of the loss and compile runs (logged at every step)."""
    warmup_steps: int
    """Steps of those runs left out of their tokens/s (compilation, allocator warm-up)."""
    compare_steps: int
    """First steps whose losses are compared (fused against logits, compiled against eager)."""
    budget_s: int
    """All runs together get at most this many seconds."""


FULL = Settings(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                vocab_size=151936, seq_len=2048, batch_size=4, accumulation=2, max_steps=60, logging_steps=10,
                smoke_steps=6, num_records=6000, timeout_s=240, extra_steps=20, warmup_steps=5, compare_steps=3,
                budget_s=BUDGET_S)
CPU_SMOKE = Settings(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                     vocab_size=4096, seq_len=128, batch_size=2, accumulation=2, max_steps=6, logging_steps=2,
                     smoke_steps=2, num_records=200, timeout_s=300, extra_steps=4, warmup_steps=1, compare_steps=3,
                     budget_s=900)


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    """(peak bf16 dense TFLOP/s, where it came from): `PEAK_TFLOPS`, else the loop's table."""
    from loop.throughput import peak_tflops as table_peak

    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]), "PEAK_TFLOPS"
    peak = table_peak(device_name)
    return (peak, "loop/throughput.py table") if peak else (None, "unknown GPU: set PEAK_TFLOPS")


def flash_attention_works() -> bool:
    """flash-attn installed, built for this torch and importable (a mismatched build fails at import)."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as error:  # ImportError, or an undefined symbol from a build for another torch
        log(f"flash_attn does not import ({type(error).__name__}: {error}); using SDPA")
        return False
    return True


def build_model(folder: Path, settings: Settings, on_gpu: bool) -> int:
    """The bench tokenizer and a random Qwen2-shaped model in `folder`; its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.common import TextSource
    from launcher.demo import build_tokenizer

    tokenizer = build_tokenizer(folder, vocab_size=2048, extra_text=TextSource(seed=1).text(60_000))
    config = AutoConfig.for_model(
        "qwen2", vocab_size=max(settings.vocab_size, len(tokenizer)), hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads, intermediate_size=settings.intermediate_size,
        max_position_embeddings=max(4096, settings.seq_len), tie_word_embeddings=True, rope_theta=1_000_000.0,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # Initialised on the GPU when there is one (seconds instead of a minute), saved in bf16 (half the disk).
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    num_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    model.to(torch.bfloat16 if on_gpu else torch.float32).save_pretrained(folder)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    return num_params


ZERO2_YAML = """\
# One process, DeepSpeed ZeRO-2; precision, batch, accumulation and clipping come from the job.
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 1
mixed_precision: "no"
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
"""


def steady_tokens_per_sec(records: list[dict]) -> tuple[float | None, float | None]:
    """(input tokens/s, s/step) between the first and the last metrics record (steps after the first window)."""
    if len(records) < 2:
        return None, None
    first, last = records[0], records[-1]
    seconds = last["elapsed_sec"] - first["elapsed_sec"]
    # input_tokens_per_sec is per logging window; weight each window by its length in seconds.
    windows = list(zip(records, records[1:]))
    tokens = sum(after["input_tokens_per_sec"] * (after["elapsed_sec"] - before["elapsed_sec"])
                 for before, after in windows)
    return tokens / seconds, seconds / (last["step"] - first["step"])


def trainer_tokens_per_sec(timings: dict, first_step: int) -> tuple[float | None, float | None]:
    """(computed tokens/s, s/step) over steps first_step+1..last from the Trainer script's timings."""
    ends, accumulation = timings["step_end"], timings["accumulation"]
    if len(ends) <= first_step:
        return None, None
    batches = timings["batches"][first_step * accumulation:len(ends) * accumulation]
    seconds = ends[-1] - ends[first_step - 1]
    return sum(b[2] for b in batches) / seconds, seconds / (len(ends) - first_step)


def read_result(output: Path) -> dict:
    path = output / "result.json"
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny model on CPU, a few steps: checks the code paths")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("trainer", "masked", "loss", "compile", "qlora", "zero2"),
                        help="leave out a part (repeatable)")
    parser.add_argument("--batch-size", type=int, help="rows of 2048 tokens per micro-batch (default 4; lower it "
                                                       "on GPUs under 40 GB)")
    parser.add_argument("--accumulation", type=int, help="micro-batches per optimizer step (default 2)")
    args = parser.parse_args(argv)

    import torch

    from bench.common import (PYTHON, REPO_ROOT, THREADS, bench_job, configure_process, prepared_data, run_command,
                              run_command_of, sized_chat_records, workspace)
    from tests.helpers import read_metrics, write_jsonl

    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        why = "this torch is a CPU build (install a CUDA one)" if torch.version.cuda is None else "no CUDA GPU here"
        print(f"error: {why}; run with --cpu-smoke to check the code paths on CPU", file=sys.stderr)
        return 2
    settings = CPU_SMOKE if args.cpu_smoke else FULL
    settings = Settings(**{**asdict(settings), **{k: v for k, v in (("batch_size", args.batch_size),
                                                                     ("accumulation", args.accumulation)) if v}})
    # No hub, quiet libraries; one thread per process on CPU, torch's own choice on a GPU machine.
    configure_process(threads=None if on_gpu else THREADS)
    started = time.time()
    deadline = started + settings.budget_s

    def time_left(cap: int) -> int:
        return int(min(cap, deadline - time.time()))

    device_name = torch.cuda.get_device_name(0) if on_gpu else "CPU (smoke run)"
    peak, peak_source = peak_tflops(device_name) if on_gpu else (
        (float(os.environ["PEAK_TFLOPS"]), "PEAK_TFLOPS") if os.environ.get("PEAK_TFLOPS") else (None, "CPU: n/a"))
    flash = on_gpu and flash_attention_works()
    if on_gpu and not flash:
        log("no usable flash_attn: SDPA once per packed example (auto), and once per row under a mask (sdpa)")
    attention = "flash_attention_2" if flash else "auto"
    log(f"{device_name}; attention {attention}; peak {peak} TFLOP/s ({peak_source})")

    folder = workspace() / "gpu"
    model_dir = folder / "model"
    model_dir.mkdir(parents=True)
    log(f"building the model from its config ({settings.hidden_size} hidden, {settings.num_layers} layers)")
    num_params = build_model(model_dir, settings, on_gpu)
    log(f"{num_params / 1e6:.1f}M parameters; writing {settings.num_records} chat records")
    data = write_jsonl(folder / "train.jsonl", sized_chat_records(settings.num_records, model_dir, lengths="lognormal",
                                                                  low=16, high=settings.seq_len))
    dense = {
        "model.attn_implementation": attention, "data.packing": True, "data.max_length": settings.seq_len,
        "hyperparams.batch_size": settings.batch_size, "hyperparams.gradient_accumulation": settings.accumulation,
        "hyperparams.fp_precision": "bf16", "hyperparams.learning_rate": 1e-5, "hyperparams.warmup_steps": 0,
        "hyperparams.max_steps": settings.max_steps, "environment.logging_steps": settings.logging_steps,
    }
    job = bench_job(folder / "dense", model_dir, data, **dense)
    prepared, _ = prepared_data(job)
    log(f"data: {prepared.report.num_train_sequences} packed rows of up to {settings.seq_len} tokens")
    results: dict = {"device": device_name, "attention": attention, "peak_tflops": peak, "peak_source": peak_source,
                     "num_params": num_params, "settings": asdict(settings), "cpu_smoke": args.cpu_smoke,
                     "torch": torch.__version__, "runs": {}}

    def mfu(tokens_per_sec: float | None) -> float | None:
        return 6 * num_params * tokens_per_sec / (peak * 1e12) if peak and tokens_per_sec else None

    def out_of_time(name: str) -> bool:
        if time_left(settings.timeout_s) >= 30:
            return False
        log(f"{name}: skipped, the {settings.budget_s} s budget is spent")
        results["runs"][name] = {"success": False,
                                 "error": f"skipped: the script's {settings.budget_s} s budget was spent"}
        return True

    def ours(name: str, job_path: Path, *overrides: str, per_step: bool = False) -> dict:
        """`python -m launcher run` of a job; `per_step`: a job logged at every step, whose tokens/s leave out
        the first `warmup_steps` and whose step losses and time to the first step are kept."""
        if out_of_time(name):
            return results["runs"][name]
        output = folder / name / "out"
        log(f"{name}: python -m launcher run")
        _, seconds, code = run_command(run_command_of(job_path, f"output.output_dir={output}", *overrides),
                                       folder / f"{name}.log", timeout=time_left(settings.timeout_s), check=False)
        result = read_result(output)
        summary = result.get("summary") or {}
        records = read_metrics(output)
        if per_step:
            tokens_per_sec, step_s = steady_tokens_per_sec(records[max(settings.warmup_steps - 1, 0):])
        else:
            tokens_per_sec, step_s = steady_tokens_per_sec(records)
        run = {"exit_code": code, "success": bool(result.get("success")) and code == 0, "wall_s": seconds,
               "tokens_per_sec": tokens_per_sec, "s_per_step": step_s, "mfu": mfu(tokens_per_sec),
               "final_loss": result.get("final_loss"),
               "error": result.get("error") or ("timed out" if code == 124 else None),
               "peak_memory_bytes": summary.get("peak_memory_bytes"),
               "peak_memory_source": "torch.cuda.max_memory_allocated" if on_gpu else
               "ru_maxrss (the whole process's peak resident memory, libraries included)",
               "loss_path": summary.get("loss"), "log": str(folder / f"{name}.log")}
        if per_step:
            run["step_losses"] = [[r["step"], r["loss"]] for r in records]
            run["first_step_s"] = records[0]["elapsed_sec"] if records else None
            run["warmup_steps"] = settings.warmup_steps
        run.update(planned(job_path, run["peak_memory_bytes"]))
        if code != 0:
            run["log_tail"] = (folder / f"{name}.log").read_text(errors="replace")[-2000:]
        results["runs"][name] = run
        return run

    def planned(job_path: Path, measured: int | None) -> dict:
        """The planner's predicted peak per device for the job (in-process, `launcher.plan.plan_job`) and
        its error against the measured peak (on a GPU only: on CPU the measure is the process's RSS)."""
        from launcher.config import load_config
        from launcher.plan import plan_job

        try:
            plan = plan_job(load_config(job_path, check_environment=False), gpu_memory=None if on_gpu else "80GB",
                            device="cuda" if on_gpu else "cpu")
        except Exception as error:  # reported, not fatal: the run itself is what the script checks
            return {"planned_peak_bytes": None, "plan_error": f"{type(error).__name__}: {error}"}
        out = {"planned_peak_bytes": plan.estimate.peak, "planned_peak_phase": plan.estimate.peak_phase,
               "planned_loss_path": plan.setup.loss, "plan_error_pct": None}
        if on_gpu and measured:
            out["plan_error_pct"] = 100 * (plan.estimate.peak - measured) / measured
            out["plan_within_target"] = abs(out["plan_error_pct"]) <= 100 * TARGET_PLAN_ERROR
        return out

    ours("ours dense", job)
    if attention == "auto" and "masked" not in args.skip:  # the same job under transformers' own masked SDPA
        ours("ours masked SDPA", bench_job(folder / "masked", model_dir, data,
                                           **{**dense, "model.attn_implementation": "sdpa"}))

    if "trainer" not in args.skip and not out_of_time("Trainer dense"):
        log("Trainer dense: bench/hf_trainer.py")
        h_output, timings = folder / "trainer", folder / "trainer.json"
        command = [PYTHON, str(REPO_ROOT / "bench" / "hf_trainer.py"), "--model", str(model_dir),
                   "--train", str(prepared.cache_path / "train"), "--output", str(h_output),
                   "--timings", str(timings), "--batch-size", str(settings.batch_size),
                   "--accumulation", str(settings.accumulation), "--learning-rate", "1e-5",
                   "--max-steps", str(settings.max_steps), "--logging-steps", str(settings.logging_steps),
                   "--collator", "ours", "--attn", "sdpa_packed" if attention == "auto" else attention,
                   "--bf16", "--no-save",
                   "--device", "cuda" if on_gpu else "cpu"]
        _, seconds, code = run_command(command, folder / "trainer.log", timeout=time_left(settings.timeout_s),
                                       check=False)
        run = {"exit_code": code, "success": code == 0 and timings.exists(), "wall_s": seconds,
               "error": "timed out" if code == 124 else None}
        if run["success"]:
            data_ = json.loads(timings.read_text())
            tokens_per_sec, step_s = trainer_tokens_per_sec(data_, settings.logging_steps)
            run.update(tokens_per_sec=tokens_per_sec, s_per_step=step_s, mfu=mfu(tokens_per_sec),
                       final_loss=data_.get("train_loss"), peak_memory_bytes=data_.get("peak_memory_bytes"))
        else:
            run["log_tail"] = (folder / "trainer.log").read_text(errors="replace")[-2000:]
        results["runs"]["Trainer dense"] = run

    if "loss" not in args.skip or "compile" not in args.skip:
        # The same dense job for a few dozen steps, logged at every step: the fused loss against the logits
        # path, and compiled decoder layers against the eager fused run.
        extra = {**dense, "hyperparams.max_steps": settings.extra_steps, "environment.logging_steps": 1}
        if "loss" not in args.skip:
            ours("ours loss=logits", bench_job(folder / "logits", model_dir, data,
                                               **{**extra, "hyperparams.loss": "logits"}), per_step=True)
        ours("ours loss=fused", bench_job(folder / "fused", model_dir, data, **{**extra, "hyperparams.loss": "fused"}),
             per_step=True)
        if "compile" not in args.skip:
            ours("ours compile", bench_job(folder / "compile", model_dir, data, **{
                **extra, "hyperparams.loss": "fused", "model.compile": True}), per_step=True)

    if "qlora" not in args.skip:
        if on_gpu and importlib.util.find_spec("bitsandbytes") is None:
            results["runs"]["ours QLoRA"] = {"success": False, "error": "bitsandbytes is not installed"}
        else:
            qlora_job = bench_job(folder / "qlora", model_dir, data, **{
                **dense, "model.load_in_4bit": True, "lora.enabled": True, "lora.r": 16,
                "hyperparams.max_steps": settings.smoke_steps, "hyperparams.learning_rate": 1e-4,
                "environment.logging_steps": 1})
            run = ours("ours QLoRA", qlora_job)
            run["mfu"] = None  # 6N counts weight gradients a frozen 4-bit base never computes
            final = folder / "ours QLoRA" / "out" / "final"
            run["adapter_saved"] = (final / "adapter_config.json").exists()
            if run.get("success") and not run["adapter_saved"]:
                run["success"] = False
                run["error"] = ("trained, but final/ holds no LoRA adapter: [lora] and model.load_in_4bit were "
                                "not applied (a full fine-tune ran instead)")

    if "zero2" not in args.skip:
        config_file = folder / "zero2.yaml"
        config_file.write_text(ZERO2_YAML)
        zero_steps = max(settings.smoke_steps, 2 * settings.logging_steps)
        zero_job = bench_job(folder / "zero2", model_dir, data, **{
            **dense, "launch.accelerate_config": str(config_file), "hyperparams.max_steps": zero_steps})
        ours("ours ZeRO-2", zero_job)

    results["comparisons"] = comparisons(results["runs"], settings, on_gpu)
    results["total_s"] = time.time() - started
    print(table(results))
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO_ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_check.json" if os.environ.get("OUT") else \
        f"gpu-{'cpu-smoke-' if args.cpu_smoke else ''}{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"wrote {out_dir / name}; {results['total_s'] / 60:.1f} min")
    return 0 if all(run.get("success") for run in results["runs"].values()) else 1


def loss_differences(run: dict, reference: dict, steps: int) -> list[float]:
    """|loss - reference loss| / |reference loss| at each of the first `steps` steps both runs logged."""
    theirs = {step: loss for step, loss in reference.get("step_losses") or []}
    return [abs(loss - theirs[step]) / abs(theirs[step]) for step, loss in (run.get("step_losses") or [])[:steps]
            if theirs.get(step)]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def comparisons(runs: dict, settings: Settings, on_gpu: bool) -> dict:
    """Fused against logits loss, compiled against eager layers, and the planner against measured peaks."""
    out: dict = {}
    logits, fused, compiled = (runs.get(name, {}) for name in ("ours loss=logits", "ours loss=fused", "ours compile"))
    memory = "torch.cuda.max_memory_allocated" if on_gpu else "ru_maxrss (CPU: the process, libraries included)"
    if logits.get("success") and fused.get("success"):
        differences = loss_differences(fused, logits, settings.compare_steps)
        out["fused vs logits"] = {
            "loss_paths": {"fused run": fused.get("loss_path"), "logits run": logits.get("loss_path")},
            "peak_memory_bytes": {"fused": fused.get("peak_memory_bytes"), "logits": logits.get("peak_memory_bytes")},
            "peak_memory_ratio": ratio(fused.get("peak_memory_bytes"), logits.get("peak_memory_bytes")),
            "peak_memory_source": memory,
            "tokens_per_sec": {"fused": fused.get("tokens_per_sec"), "logits": logits.get("tokens_per_sec")},
            "tokens_per_sec_ratio": ratio(fused.get("tokens_per_sec"), logits.get("tokens_per_sec")),
            "loss_rel_diff_per_step": differences, "loss_rel_diff_max": max(differences, default=None),
            "steps_after_warmup": settings.extra_steps - settings.warmup_steps}
    # The eager run of the loss path the compiled run took (it asks for "fused"; `choose_loss_head` falls
    # back to logits when its probe forward of the compiled model does not match the output layer).
    same_path = [name for name in ("ours loss=fused", "ours loss=logits")
                 if runs.get(name, {}).get("success") and runs[name].get("loss_path") == compiled.get("loss_path")]
    eager_name = same_path[0] if same_path else "ours loss=fused"
    eager = runs.get(eager_name, {})
    if compiled.get("success") and eager.get("success"):
        differences = loss_differences(compiled, eager, settings.compare_steps)
        worst = max(differences, default=None)
        first = (compiled.get("first_step_s"), eager.get("first_step_s"))
        out["compile vs eager"] = {
            "eager_run": eager_name, "loss_paths": {"compiled": compiled.get("loss_path"),
                                                    "eager": eager.get("loss_path")},
            "fused_requested_but_not_taken": compiled.get("loss_path") != "fused",
            "loss_rel_diff_per_step": differences, "loss_rel_diff_max": worst, "loss_target": TARGET_COMPILE_REL,
            "loss_within_target": None if worst is None else worst <= TARGET_COMPILE_REL,
            "tokens_per_sec": {"compiled": compiled.get("tokens_per_sec"), "eager": eager.get("tokens_per_sec")},
            "tokens_per_sec_ratio": ratio(compiled.get("tokens_per_sec"), eager.get("tokens_per_sec")),
            "first_step_s": {"compiled": first[0], "eager": first[1]},
            "compile_s": first[0] - first[1] if None not in first else None,
            "peak_memory_ratio": ratio(compiled.get("peak_memory_bytes"), eager.get("peak_memory_bytes"))}
    out["plan"] = {"target_pct": 100 * TARGET_PLAN_ERROR, "compared": on_gpu, "runs": {
        name: {key: run.get(key) for key in ("planned_peak_bytes", "peak_memory_bytes", "plan_error_pct",
                                             "plan_within_target", "planned_peak_phase", "planned_loss_path")}
        for name, run in runs.items() if run.get("planned_peak_bytes") is not None}}
    return out


def table(results: dict) -> str:
    def fmt(value, spec: str, scale: float = 1.0) -> str:
        return "" if value is None else format(value * scale, spec)

    gib = 1 / 2**30
    memory_spec = ".3f" if results.get("cpu_smoke") else ".1f"
    lines = [f"\n{results['device']}, {results['num_params'] / 1e6:.1f}M parameters, bf16, seq "
             f"{results['settings']['seq_len']}, packed, {results['attention']}; peak "
             f"{results['peak_tflops'] or 'n/a'} TFLOP/s ({results['peak_source']})\n",
             "| run | ok | tokens/s | s/step | MFU (6N) | peak memory GiB | planned GiB | plan error | final loss "
             "| note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, run in results["runs"].items():
        note = run.get("error") or ""
        if "adapter_saved" in run:
            note = note or "LoRA adapter saved"
        if name == "ours ZeRO-2":
            note = note or "DeepSpeed's bf16: bf16 weights, fp32 master copy, no autocast; not the dense recipe"
        if name == "ours dense" and run.get("mfu") is not None:
            note = f"MFU target >= {TARGET_MFU:.0%}: {'met' if run['mfu'] >= TARGET_MFU else 'MISSED'}"
        if "step_losses" in run and not note:
            note = f"{run.get('loss_path')} loss path; tokens/s after step {run.get('warmup_steps')}"
        if run.get("planned_loss_path") and run.get("loss_path") and run["planned_loss_path"] != run["loss_path"]:
            note = f"{note}; " if note else ""
            note += f"the plan assumed the {run['planned_loss_path']} loss, the run took {run['loss_path']}"
        lines.append(f"| {name} | {'yes' if run.get('success') else 'NO'} | {fmt(run.get('tokens_per_sec'), ',.0f')} | "
                     f"{fmt(run.get('s_per_step'), '.3f')} | {fmt(run.get('mfu'), '.1%')} | "
                     f"{fmt(run.get('peak_memory_bytes'), memory_spec, gib)} | "
                     f"{fmt(run.get('planned_peak_bytes'), memory_spec, gib)} | "
                     f"{fmt(run.get('plan_error_pct'), '+.1f')}{'' if run.get('plan_error_pct') is None else '%'} | "
                     f"{fmt(run.get('final_loss'), '.3f')} | "
                     f"{str(note).splitlines()[0][:160] if note else ''} |")
    ours, hf = results["runs"].get("ours dense", {}), results["runs"].get("Trainer dense", {})
    if ours.get("tokens_per_sec") and hf.get("tokens_per_sec"):
        lines.append(f"\nours / Trainer tokens/s: {ours['tokens_per_sec'] / hf['tokens_per_sec']:.3f}x")
    masked = results["runs"].get("ours masked SDPA", {})
    if ours.get("tokens_per_sec") and masked.get("tokens_per_sec"):
        lines.append(f"SDPA once per packed example / once per row under a mask: tokens/s "
                     f"{ours['tokens_per_sec'] / masked['tokens_per_sec']:.3f}x, peak memory "
                     f"{ratio(ours.get('peak_memory_bytes'), masked.get('peak_memory_bytes')) or float('nan'):.3f}x")
    lines += comparison_lines(results.get("comparisons") or {}, results.get("cpu_smoke"))
    lines.append(f"total {results['total_s'] / 60:.1f} min")
    return "\n".join(lines)


def comparison_lines(found: dict, cpu_smoke: bool) -> list[str]:
    """The fused/logits, compile/eager and planner figures, each with its target."""
    def num(value, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    lines = []
    if "fused vs logits" in found:
        c = found["fused vs logits"]
        paths = c["loss_paths"]
        if paths["fused run"] != "fused":
            lines.append("\nthe run with hyperparams.loss = \"fused\" took the logits path (choose_loss_head's probe "
                         "rejected it; see its log): the fused/logits figures below compare logits with logits")
        gap = "" if paths["fused run"] != "fused" else "\n"  # a blank line before the first of these lines
        lines.append(f"{gap}fused / logits loss ({paths['fused run']} / {paths['logits run']} paths): peak memory "
                     f"{num(c['peak_memory_ratio'], '.3f')}x ({c['peak_memory_source']}), tokens/s "
                     f"{num(c['tokens_per_sec_ratio'], '.3f')}x; loss of the first {len(c['loss_rel_diff_per_step'])} "
                     f"steps: relative difference at most {num(c['loss_rel_diff_max'], '.1e')} (reported, no target)")
    if "compile vs eager" in found:
        c = found["compile vs eager"]
        verdict = {None: "n/a", True: "met", False: "MISSED"}[c["loss_within_target"]]
        paths, steps = c["loss_paths"], len(c["loss_rel_diff_per_step"])
        fell_back = "; the compiled run asked for fused, took logits" if c["fused_requested_but_not_taken"] else ""
        lines.append(f"compile / eager ({paths['compiled']} / {paths['eager']} paths{fell_back}): loss of the first "
                     f"{steps} steps: relative difference at most {num(c['loss_rel_diff_max'], '.1e')} (target "
                     f"<= {c['loss_target']:.0e}: {verdict}); tokens/s after warm-up "
                     f"{num(c['tokens_per_sec_ratio'], '.3f')}x; compile time (time to the first step, compiled - "
                     f"eager) {num(c['compile_s'], '.1f')} s")
    plan = found.get("plan") or {}
    if plan.get("runs"):
        if plan["compared"]:
            errors = {name: run["plan_error_pct"] for name, run in plan["runs"].items()
                      if run.get("plan_error_pct") is not None}
            within = [name for name, error in errors.items() if abs(error) <= plan["target_pct"]]
            lines.append(f"planner against torch.cuda.max_memory_allocated (target within "
                         f"+-{plan['target_pct']:.0f}%): {len(within)} of {len(errors)} runs within; "
                         + ", ".join(f"{name} {error:+.1f}%" for name, error in errors.items()))
        else:
            lines.append("planner: predicted peaks listed (device cpu); not compared, the CPU figure is the process's "
                         "peak RSS" + (" (--cpu-smoke)" if cpu_smoke else ""))
    return lines


if __name__ == "__main__":
    sys.exit(main())
