"""The baseline: transformers' `Trainer` on data we tokenized, as a user of Trainer would run it.

    python bench/hf_trainer.py --model MODEL_DIR --train TOKENIZED_DIR --output OUT --timings t.json \
        --batch-size 2 --accumulation 2 --max-steps 30 [--collator ours|seq2seq] [--device cuda --bf16]

`--train` is a `datasets.load_from_disk` folder of rows with `input_ids` and `labels` (and
`position_ids` when packed): our data cache, so both sides train on the very same tokens. The
settings mirror a TrainerEngine job: AdamW (Trainer's default implementation), the same learning
rate, schedule, betas, epsilon, clipping and seed, no warm-up, no evaluation, no checkpoints; at the
end the model and tokenizer are saved, as our loop always writes `final/`.

`--collator ours` pads batches exactly as our loop does (packed rows keep their `position_ids`);
`--collator seq2seq` is the usual Trainer setup for unpacked chat data: `DataCollatorForSeq2Seq`
padding each batch to its longest row (dynamic padding), no length grouping; `--sampler` picks a
random order (Trainer's default) or the rows' own order.

`--timings` receives JSON: `started` (epoch time at the top of this script), `step_end` (epoch time
at the end of every optimizer step), `batches` (token counts of every micro-batch in the order the
collator made them, see `CountingCollator`), `finished`. With one batch per
micro-step and no worker processes, batch `i` belongs to optimizer step `i // accumulation`.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IGNORE_INDEX = -100


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True, help="a load_from_disk folder of tokenized rows")
    parser.add_argument("--output", required=True)
    parser.add_argument("--timings", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--scheduler", default="cosine")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--collator", choices=("ours", "seq2seq"), default="ours")
    parser.add_argument("--sampler", choices=("random", "sequential"), default="random",
                        help="Trainer's train_sampling_strategy (sequential: the rows' own order)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--optim", default=None, help="TrainingArguments.optim (default: Trainer's own default)")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: transformers chooses, as our "
                                                     "model.attn_implementation = \"auto\" does), or sdpa_packed: "
                                                     "our loop's SDPA once per packed example")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="skip saving the final model")
    return parser.parse_args(argv)


class CountingCollator:
    """Wraps a collator and records, for each batch it makes: [trained tokens, real tokens, computed
    tokens, real attention pairs, computed attention pairs].

    Attention pairs are query-key pairs: a sequence of n tokens needs n x n (before the causal half),
    a row of width w costs w x w whatever its mask; packed rows hold several sequences, told apart
    by their `position_ids` restarting at 0.
    """

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[list[int]] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        labels = batch["labels"]
        trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
        real = sum(len(e["input_ids"]) for e in examples)
        rows, width = batch["input_ids"].shape
        pairs = sum(n * n for e in examples for n in segment_lengths(e))
        self.batches.append([trained, real, rows * width, pairs, rows * width * width])
        return batch


def segment_lengths(example) -> list[int]:
    """Lengths of the sequences in a row: one, or several where `position_ids` restart at 0."""
    positions = example.get("position_ids")
    if positions is None:
        return [len(example["input_ids"])]
    # numpy, not a Python loop over positions: this runs inside the Trainer's timed steps.
    starts = np.append(np.flatnonzero(np.asarray(positions) == 0), len(positions))
    return np.diff(starts).tolist()


def build_trainer(args, callbacks=()):
    """(Trainer, tokenizer, counting collator) for parsed `args`."""
    import datasets
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from loop.attention import PACKED_SDPA, use_packed_sdpa

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = datasets.load_from_disk(args.train)
    if args.collator == "ours":
        from loop.data.batches import Collator

        boundaries = (args.attn or "").startswith("flash") or args.attn == PACKED_SDPA
        collator = CountingCollator(Collator(tokenizer.pad_token_id, sequence_boundaries=boundaries))
    else:
        collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                                           return_tensors="pt"))
    # Master weights in fp32; --bf16 turns on autocast, as our loop does.
    packed_sdpa = args.attn == PACKED_SDPA  # our loop's attention on packed rows (loop/attention.py)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation="sdpa" if packed_sdpa else args.attn)
    if packed_sdpa and not use_packed_sdpa(model):
        raise SystemExit(f"{args.model}: cannot run {PACKED_SDPA}")
    model.config.use_cache = False
    training_args = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=args.learning_rate,
        lr_scheduler_type=args.scheduler, warmup_steps=0, max_steps=args.max_steps, num_train_epochs=args.epochs,
        max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=args.seed,
        bf16=args.bf16, fp16=False, logging_steps=args.logging_steps, report_to="none", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=args.device == "cpu", train_sampling_strategy=args.sampler,
        **({"optim": args.optim} if args.optim else {}),
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if args.gradient_checkpointing else {}),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator,
                      callbacks=list(callbacks))
    return trainer, tokenizer, collator


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import TrainerCallback

    step_end: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_end.append(time.time())

    trainer, tokenizer, collator = build_trainer(args, [StepTimes()])
    output = trainer.train()
    if not args.no_save:
        trainer.save_model(str(Path(args.output) / "final"))
        tokenizer.save_pretrained(str(Path(args.output) / "final"))
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else None
    Path(args.timings).write_text(json.dumps({
        "started": STARTED, "step_end": step_end, "batches": collator.batches, "finished": time.time(),
        "train_loss": output.training_loss, "global_step": output.global_step, "peak_memory_bytes": peak,
        "accumulation": args.accumulation,
    }))


if __name__ == "__main__":
    main()
