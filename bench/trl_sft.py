"""Against TRL: its `SFTTrainer` with padding-free BFD packing, and our `data.packing`, on the same
chat data and model: trained tokens per second.

    python -m bench.trl_sft [--quick]         # needs `pip install trl`; about 3 minutes (--quick about 1)

TRL is the reference a user would otherwise reach for; it is imported only here, and the benchmark
reports itself skipped when it is not installed.

The data: one-turn chat records whose rendered lengths follow a lognormal distribution (median
about 110 tokens, a long tail, clipped to 16-1024; `bench.common.sized_chat_records`). The model:
Qwen3-shaped, hidden 256, 4 layers, intermediate 1024, a byte-level BPE vocabulary of 2,048, random
weights, fp32. The tokenizer's chat template is ChatML with `{% generation %}` markers, so both
train exactly the assistant tokens: TRL through `assistant_only_loss=True`, ours through the default
profile.

- ours: `loop.train.train` with `data.packing = true`, `data.max_length = 1024`, one packed row a
  micro-batch, one epoch;
- TRL: `SFTConfig(packing=True, packing_strategy="bfd", max_length=1024,
  per_device_train_batch_size=1, assistant_only_loss=True)`, one epoch: best-fit-decreasing bins of
  up to 1024 tokens, padding-free (`position_ids` restart at each sequence, no attention mask).

Both: learning rate 1e-4, cosine schedule, no warm-up, AdamW (fused), clipping 1.0, seed 42, one
torch thread. Trained tokens/s is the tokens that carry loss in steps 2..last over those steps'
time (step 1 holds the warm-up; start-up and tokenization are never counted): ours from the loop's
`on_step` hook and its progress counters, TRL's from a callback at each step end and the labels of
each batch it trains on. The two alternate in rounds, rotating which goes first; the figure is
ours / TRL, the median with the min-max over rounds. The details add the tokens each one computes
(packing efficiency) and the rows it makes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from bench.common import Row, alternate, log, main_for, median, sized_chat_records, spread, verdict, workspace
from tests.helpers import write_job, write_jsonl

NAME = "trl"
TARGET = 1.5
SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
MAX_LENGTH = 1024
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact be have do say get make go know take see come think look want give use find "
         "tell ask seem feel try leave call good new first last long great little own other old right big high "
         "different small large next early young important few public bad same able").split()


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def build_model_folder(folder: Path) -> Path:
    from launcher.demo import build_model, build_tokenizer
    from loop.data.templates import CHATML_GENERATION_TEMPLATE

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        corpus = " ".join(random.Random(0).choices(WORDS, k=60_000))
        tokenizer = build_tokenizer(folder, vocab_size=2048, chat_template=CHATML_GENERATION_TEMPLATE,
                                    extra_text=corpus)
        build_model(folder, tokenizer, **SHAPE)
    return folder


def write_job_file(folder: Path, model_dir: Path, data: Path) -> Path:
    return write_job(folder, model_dir, **{
        "data.dataset_path": str(data), "data.max_length": MAX_LENGTH, "data.packing": True,
        "hyperparams.batch_size": 1, "hyperparams.gradient_accumulation": 1, "hyperparams.num_epochs": 1,
        "hyperparams.learning_rate": 1e-4, "hyperparams.lr_scheduler": "cosine", "hyperparams.fp_precision": "fp32",
        "hyperparams.save_steps": 0, "hyperparams.seed": 42, "output.overwrite": True, "output.resume": "never",
        "environment.logging_steps": 5})


def ours(job: Path, output: Path) -> dict:
    """One epoch of our packed job: steps' end times and cumulative trained/computed tokens."""
    import logging

    from launcher.config import load_config
    from loop.train import train

    ends: list[tuple[float, int, int]] = []

    def on_step(run) -> None:
        ends.append((time.perf_counter(), run.progress.num_tokens, run.progress.num_input_tokens))

    config = load_config(job, overrides={"output.output_dir": str(output)})
    root, handlers = logging.getLogger(), list(logging.getLogger().handlers)
    try:
        result = train(config, on_step=on_step)
    finally:
        for handler in root.handlers[:]:  # train() adds its run's log file to the root logger
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
    if not result.success:
        raise RuntimeError(result.error)
    return steady(ends)


def trl(model_dir: Path, data: Path, output: Path) -> dict:
    """One epoch of TRL's SFTTrainer with BFD packing: steps' end times and cumulative tokens."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    counted = [0, 0]  # trained, computed (non-padding) tokens so far
    ends: list[tuple[float, int, int]] = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counted[0] += int((inputs["labels"][:, 1:] != -100).sum())
            counted[1] += int(inputs["input_ids"].numel())  # padding-free: one row, no padding
            return super().training_step(model, inputs, num_items_in_batch)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append((time.perf_counter(), counted[0], counted[1]))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    config = SFTConfig(
        output_dir=str(output), packing=True, packing_strategy="bfd", max_length=MAX_LENGTH,
        per_device_train_batch_size=1, gradient_accumulation_steps=1, assistant_only_loss=True, num_train_epochs=1,
        learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        seed=42, bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=5, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Counting(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                       processing_class=tokenizer, callbacks=[StepEnd()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return steady(ends)


def steady(ends: list[tuple[float, int, int]]) -> dict:
    """Tokens/s over steps 2..last from (end time, cumulative trained, cumulative computed) per step."""
    (t1, trained1, computed1), (tn, trained_n, computed_n) = ends[0], ends[-1]
    seconds = tn - t1
    return {"trained_per_sec": (trained_n - trained1) / seconds, "computed_per_sec": (computed_n - computed1) / seconds,
            "steps": len(ends), "trained": trained_n, "computed": computed_n}


def run(quick: bool = False) -> list[Row]:
    if not trl_available():
        log(f"{NAME}: trl is not installed (pip install trl); skipped")
        return [Row(bench="TRL SFTTrainer", figure="skipped: trl is not installed", value="n/a")]
    rounds, count = (1, 120) if quick else (2, 320)
    folder = workspace() / "trl"
    model_dir = build_model_folder(folder / "model")
    data = write_jsonl(folder / f"chat-{count}.jsonl",
                       sized_chat_records(count, model_dir, lengths="lognormal", low=16, high=MAX_LENGTH))
    job = write_job_file(folder, model_dir, data)
    log(f"{NAME}: {count} chat records, packed into rows of up to {MAX_LENGTH} tokens; {rounds} round(s)")
    results = alternate(rounds, {
        "ours": lambda i: ours(job, folder / f"ours-{i}"),
        "TRL": lambda i: trl(model_dir, data, folder / f"trl-{i}"),
    }, label=NAME)
    ratios = [o["trained_per_sec"] / t["trained_per_sec"] for o, t in zip(results["ours"], results["TRL"])]
    computed = [o["computed_per_sec"] / t["computed_per_sec"] for o, t in zip(results["ours"], results["TRL"])]
    o, t = results["ours"][0], results["TRL"][0]
    return [
        Row(bench="TRL SFTTrainer", figure="trained tokens/s: ours (data.packing) / TRL SFTTrainer (padding-free BFD "
                                           "packing, assistant_only_loss)",
            value=f"{median(ratios):.2f}x", spread=spread(ratios, "{:.2f}", "x"), target=f">= {TARGET}x",
            met=verdict(median(ratios) >= TARGET),
            detail=f"ours {median([r['trained_per_sec'] for r in results['ours']]):,.0f} trained tokens/s over "
                   f"{o['steps']} steps ({o['trained']:,} trained of {o['computed']:,} computed tokens); TRL "
                   f"{median([r['trained_per_sec'] for r in results['TRL']]):,.0f} over {t['steps']} steps "
                   f"({t['trained']:,} of {t['computed']:,})",
            raw={"ours": results["ours"], "TRL": results["TRL"]}),
        Row(bench="TRL SFTTrainer", figure="computed (non-padding) tokens/s: ours / TRL",
            value=f"{median(computed):.2f}x", spread=spread(computed, "{:.2f}", "x")),
    ]


if __name__ == "__main__":
    main_for(run)
