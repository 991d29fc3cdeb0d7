"""The loss at Qwen3's vocabulary: peak memory and time of a training step, our fused loss against our
logits path and transformers' Trainer.

    python -m bench.loss_memory [--quick]     # three fresh processes; --quick: 64-token rows

The model is Qwen3-shaped with Qwen3's real vocabulary, 151,936 rows (tied embeddings), random
weights and a small hidden size so a step runs on CPU: hidden 64, 2 layers, 4 heads of 16 (2 kv
heads), intermediate 256; 9.85M parameters, 9.72M of them the embedding. The data are rows of exactly
2,048 tokens (long chat records truncated to `data.max_length`), 2 rows a micro-batch, accumulation 1,
fp32, AdamW: 4,096 tokens a step, whose float32 logits alone are 2.3 GiB. One optimizer step.

Three variants, each in a fresh process (`python -m bench.loss_memory --child ...`), one after the
other:

- ours, fused: `loop.train.train` with `hyperparams.loss = "auto"` (the fused path here; the
  child checks the run's summary says so);
- ours, logits: the same with `hyperparams.loss = "logits"`;
- Trainer: `bench/hf_trainer.py`'s Trainer on our tokenized rows (collator "ours"), with its own loss.

Memory: each child fixes glibc's mmap threshold at 128 KiB before anything is imported (every block
above it is mapped on allocation and unmapped on free, so resident memory follows the live tensors,
as in bench/bench_memory.py), then reads its resident memory right before training is set up
(before `train()`; before the Trainer and its model are built) and reports its peak (VmHWM) less
that. The figure is the ratio of those peaks: weights, gradients, optimizer state, activations and
the loss's tensors, all included. Time: the first optimizer step, from the end of set-up (our
`status_writer` seeing status "running"; Trainer's `on_step_begin`) to its end (`on_step`;
`on_step_end`), as a ratio to our logits path's.

A child that runs past its time limit is stopped; its row then gives the peak seen so far (read from
/proc while it ran) as a lower bound, and the time as more than the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NAME = "loss memory"
VOCAB = 151_936
SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}
TARGET_MEMORY, TARGET_TIME = 0.4, 1.05


def _fix_mmap_threshold() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the children -----------------------------------------------------------------------------------

def child_ours(job: str, loss: str) -> dict:
    from launcher.config import load_config
    from loop.train import train

    config = load_config(job, overrides={"hyperparams.loss": loss})
    marks: dict[str, float] = {}

    def status(fields: dict) -> None:
        if fields.get("status") == "running" and "running" not in marks:
            marks["running"] = time.perf_counter()

    def on_step(run) -> None:
        marks.setdefault("step", time.perf_counter())

    baseline = _rss()
    print(f"BASELINE {baseline}", flush=True)
    result = train(config, status_writer=status, on_step=on_step)
    if not result.success:
        raise RuntimeError(result.error)
    return {"baseline": baseline, "peak": _peak(), "step_sec": marks["step"] - marks["running"],
            "loss_path": result.summary.get("loss"), "tokens": result.summary.get("num_input_tokens")}


def child_trainer(model_dir: str, train_dir: str, output: str, batch_size: int) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from bench.hf_trainer import build_trainer, parse_args

    marks: dict[str, float] = {}

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("begin", time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("end", time.perf_counter())

    baseline = _rss()
    print(f"BASELINE {baseline}", flush=True)
    args = parse_args(["--model", model_dir, "--train", train_dir, "--output", output, "--timings", "unused",
                       "--batch-size", str(batch_size), "--max-steps", "1", "--learning-rate", "1e-4",
                       "--collator", "ours", "--no-save", "--logging-steps", "1"])
    trainer, _, collator = build_trainer(args, [Step()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"baseline": baseline, "peak": _peak(), "step_sec": marks["end"] - marks["begin"],
            "loss_path": "Trainer (model(...).loss)", "tokens": sum(b[2] for b in collator.batches)}


def child_main(argv: list[str]) -> None:
    _fix_mmap_threshold()  # before any import allocates
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=("ours", "trainer"), required=True)
    parser.add_argument("--job")
    parser.add_argument("--loss", default="auto")
    parser.add_argument("--model")
    parser.add_argument("--train")
    parser.add_argument("--output")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    from bench.common import configure_process

    configure_process()
    import accelerate  # noqa: F401  (imported before the baseline by both kinds of child)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if args.child == "ours":
        import loop.train  # noqa: F401

        result = child_ours(args.job, args.loss)
    else:
        import transformers.trainer  # noqa: F401

        result = child_trainer(args.model, args.train, args.output, args.batch_size)
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent ---------------------------------------------------------------------------------------

def run_child(args: list[str], log_path: Path, timeout: float) -> dict:
    """Run a child, reading its peak from /proc while it runs; its result, or what was seen by the limit."""
    from bench.common import PYTHON, REPO_ROOT

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as out:
        process = subprocess.Popen([PYTHON, "-m", "bench.loss_memory", *args], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, env=os.environ.copy(), start_new_session=True)
        started, seen = time.perf_counter(), 0
        try:
            while process.poll() is None:
                try:
                    seen = max(seen, _peak(process.pid))
                except OSError:
                    pass
                if time.perf_counter() - started > timeout:
                    os.killpg(process.pid, signal.SIGKILL)  # the group this call created, and nothing else
                    process.wait()
                    break
                time.sleep(0.2)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    text = log_path.read_text(encoding="utf-8", errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "timed_out": False}
    baseline = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("BASELINE ")), None)
    if baseline is None or process.returncode not in (-signal.SIGKILL, None):
        raise RuntimeError(f"{' '.join(args)} failed (exit {process.returncode}):\n{text[-3000:]}")
    return {"baseline": baseline, "peak": seen, "step_sec": None, "timed_out": True, "limit": timeout}


def build_data(folder: Path, rows: int, tokens: int) -> tuple[Path, Path]:
    """(model folder, chat records file): the tokenizer (byte-level BPE of 512), the Qwen3-shaped model,
    and records long enough that every row is truncated to `tokens` tokens."""
    from launcher.demo import build_tokenizer

    model_dir = folder / "model"
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        _build_wide_vocab_model(model_dir, build_tokenizer(model_dir, vocab_size=512), **SHAPE)
    from bench.common import sized_chat_records
    from tests.helpers import write_jsonl

    records = sized_chat_records(rows, model_dir, lengths="uniform", low=2 * tokens, high=2 * tokens)
    return model_dir, write_jsonl(folder / "long.jsonl", records)


def _build_wide_vocab_model(folder: Path, tokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                            intermediate_size: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3", vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads // 2, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def write_job_file(folder: Path, model_dir: Path, data: Path, tokens: int, batch_size: int) -> Path:
    from tests.helpers import write_job

    return write_job(folder, model_dir, **{
        "data.dataset_path": str(data), "data.max_length": tokens, "data.too_long": "truncate", "data.shuffle": False,
        "hyperparams.batch_size": batch_size, "hyperparams.gradient_accumulation": 1, "hyperparams.max_steps": 1,
        "hyperparams.fp_precision": "fp32", "hyperparams.learning_rate": 1e-4, "hyperparams.save_steps": 0,
        "output.overwrite": True, "output.resume": "never", "environment.logging_steps": 1})


def run(quick: bool = False) -> list:
    from bench.common import Row, log, verdict, workspace
    from launcher.config import load_config
    from loop.data import build_datasets, load_tokenizer

    tokens, batch_size = (64, 2) if quick else (2048, 2)
    limit = 240 if quick else 900
    folder = workspace() / "loss-memory"
    model_dir, data = build_data(folder, rows=4 * batch_size, tokens=tokens)
    job = write_job_file(folder, model_dir, data, tokens, batch_size)
    config = load_config(job)
    prepared = build_datasets(config, load_tokenizer(config))  # tokenized once; every child reads the cache
    train_dir = str(prepared.cache_path / "train")
    log(f"{NAME}: vocabulary {VOCAB:,}, {batch_size} x {tokens} tokens a step; three fresh processes")

    variants = {
        "Trainer": ["--child", "trainer", "--model", str(model_dir), "--train", train_dir,
                    "--output", str(folder / "trainer"), "--batch-size", str(batch_size)],
        "ours, logits": ["--child", "ours", "--job", str(job), "--loss", "logits"],
        "ours, fused": ["--child", "ours", "--job", str(job), "--loss", "auto"],
    }
    results = {}
    for name, args in variants.items():
        log(f"{NAME}: {name} (limit {limit} s)")
        results[name] = run_child(args, folder / f"{name.replace(', ', '-')}.log", limit)
        r = results[name]
        log(f"{NAME}: {name}: peak {(r['peak'] - r['baseline']) / 2**30:.2f} GiB above the start, step "
            f"{'> %d s (stopped)' % limit if r['timed_out'] else '%.1f s' % r['step_sec']}")

    def training_peak(name: str) -> float:
        return results[name]["peak"] - results[name]["baseline"]

    fused, logits, trainer = results["ours, fused"], results["ours, logits"], results["Trainer"]
    bound = " (at least: stopped at the limit)" if fused["timed_out"] else ""
    planned = plan_peaks(model_dir, batch_size, tokens)
    from loop.loss import FUSED_CHUNK_ROWS

    rows = []
    for other in ("Trainer", "ours, logits"):
        ratio = training_peak("ours, fused") / training_peak(other)
        rows.append(Row(
            bench=NAME, figure=f"peak memory of a training step, vocabulary 151,936, 2 x {tokens} tokens: ours "
                               f"(fused loss) / {other}", value=f"{ratio:.3f}x" + ("+" if fused["timed_out"] else ""),
            target="" if quick else f"<= {TARGET_MEMORY}x",
            met=verdict(ratio <= TARGET_MEMORY) if not (fused["timed_out"] or quick) else "",
            detail=f"ours, fused {training_peak('ours, fused') / 2**30:.2f} GiB{bound}; {other} "
                   f"{training_peak(other) / 2**30:.2f} GiB (peak resident memory above the start of set-up, "
                   f"fresh process each); `python -m launcher plan` predicts {planned['fused'] / 2**30:.2f} GiB "
                   f"fused and {planned['logits'] / 2**30:.2f} GiB on the logits path",
            raw={name: results[name] for name in results}))
    if fused["timed_out"] or logits["timed_out"]:
        value, met = f"> {limit / logits['step_sec']:.1f}x" if logits["step_sec"] else "n/a", "no"
    else:
        ratio = fused["step_sec"] / logits["step_sec"]
        value, met = f"{ratio:.2f}x", verdict(ratio <= TARGET_TIME)
    chunks = -(-batch_size * tokens // FUSED_CHUNK_ROWS)
    rows.append(Row(
        bench=NAME, figure="time of the step: ours (fused loss) / ours (logits path)", value=value,
        target="" if quick else f"<= {TARGET_TIME}x", met="" if quick else met,
        detail=(f"ours, fused {'stopped after %d s' % limit if fused['timed_out'] else '%.1f s' % fused['step_sec']};"
                f" ours, logits {logits['step_sec']:.1f} s; Trainer {trainer['step_sec']:.1f} s. The fused loss "
                f"takes the {batch_size * tokens:,} tokens in {chunks} chunk(s) of up to {FUSED_CHUNK_ROWS:,} "
                f"(`loop.loss.FUSED_CHUNK_ROWS`); each reads the {VOCAB:,} x {SHAPE['hidden_size']} output weight "
                "four times (forward, and in backward the logits again and two gradients)")))
    return rows


def plan_peaks(model_dir: Path, batch_size: int, tokens: int) -> dict[str, float]:
    """The memory plan's peaks for this step on CPU, fused and logits (launcher/plan.py)."""
    from launcher.plan import Setup, estimate, load_shape

    shape, tensors = load_shape(str(model_dir))
    return {loss: estimate(shape, Setup(micro_batch=batch_size, seq_len=tokens, precision="fp32", device="cpu",
                                        loss=loss), tensors).peak for loss in ("fused", "logits")}


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main(sys.argv[1:])
    else:
        from bench.common import main_for

        main_for(run)
