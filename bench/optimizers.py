"""Optimizers: the memory of their state and the time of their step, against AdamW.

    python -m bench.optimizers [--quick]        # about a minute on 2 cores; --quick about 20 s

`hyperparams.optimizer` = adamw, adamw_8bit, paged_adamw_8bit, adafactor, each exactly as the loop
builds it (`loop.train.build_optimizer`: weight decay off for 1-D parameters, fused AdamW), on its
own copy of a Qwen3-shaped model (hidden 256, 4 layers, intermediate 1024, vocabulary 2,048, fp32:
4.5M parameters, built by `loop.model.build_model`), all in this process.

- State bytes: every tensor each optimizer keeps in its state after its first step (each storage
  once: bitsandbytes shares its quantisation maps; torch's scalar step counters are left out), as
  a ratio to AdamW's, and against the memory plan's prediction (`launcher.plan.optimizer_state_bytes`).
- Step time: one backward on a 1,024-token batch makes the gradients once; then, in rounds that
  rotate which optimizer goes first, each optimizer times `optimizer.step()` several times; the
  figure is the median time a step, as a ratio to AdamW's median in the same rounds. The details add
  a forward and backward of the same batch, for scale: on a GPU the 8-bit optimizers' kernels are
  fast; on CPU bitsandbytes runs a plain C loop.
"""

from __future__ import annotations

import time
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

from bench.common import Row, alternate, log, main_for, median, spread, workspace
from tests.helpers import job_config, random_batch

NAME = "optimizers"
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor")
SHAPE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024}
VOCAB = 2048
TOKENS = 1024


def build_model_folder(folder: Path) -> Path:
    from launcher.demo import build_model, build_tokenizer

    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_model(folder, build_tokenizer(folder, vocab_size=VOCAB), **SHAPE)
    return folder


def state_bytes(optimizer) -> int:
    """Bytes of the tensors in `optimizer.state`, each storage once, scalars (step counters) left out."""
    import torch

    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def run(quick: bool = False) -> list[Row]:
    import torch
    from transformers import AutoTokenizer

    from launcher.plan import Setup, Tensor, optimizer_state_bytes
    from loop.model import build_model
    from loop.train import build_optimizer

    rounds, steps = (1, 3) if quick else (3, 5)
    model_dir = build_model_folder(workspace() / "optimizers-model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = random_batch(len(tokenizer), rows=1, length=TOKENS)
    base_config = job_config(model_dir, "unused", **{"hyperparams.weight_decay": 0.01})
    torch.manual_seed(0)
    model = build_model(base_config, tokenizer)
    model.train()
    started = time.perf_counter()
    model(**batch).loss.backward()  # the gradients every optimizer steps with
    forward_backward = time.perf_counter() - started
    built = {}
    for name in OPTIMIZERS:
        config = replace(base_config, hyperparams=replace(base_config.hyperparams, optimizer=name))
        copy = deepcopy(model)
        for source, target in zip(model.parameters(), copy.parameters()):
            target.grad = None if source.grad is None else source.grad.clone()  # deepcopy leaves gradients out
        optimizer = build_optimizer(copy, config)
        optimizer.step()  # allocates the state
        trainable = [Tensor(n, tuple(p.shape), "linear" if p.ndim >= 2 else "norm")
                     for n, p in copy.named_parameters() if p.requires_grad]
        predicted = int(optimizer_state_bytes(trainable, Setup(precision="fp32", optimizer=name, device="cpu")))
        built[name] = {"optimizer": optimizer, "bytes": state_bytes(optimizer), "predicted": predicted,
                       "kind": type(optimizer).__name__, "params": sum(t.numel for t in trainable)}
        log(f"{NAME}: {name} ({built[name]['kind']}) holds {built[name]['bytes'] / 2**20:.1f} MiB of state")

    def timer(name: str):
        def variant(_round: int) -> float:
            optimizer = built[name]["optimizer"]
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                optimizer.step()
                times.append(time.perf_counter() - started)
            return median(times)
        return variant

    times = alternate(rounds, {name: timer(name) for name in OPTIMIZERS}, label=NAME)
    adamw_bytes = built["adamw"]["bytes"]
    rows = []
    for name in OPTIMIZERS:
        info = built[name]
        memory = info["bytes"] / adamw_bytes
        rows.append(Row(
            bench="optimizers", figure=f"{name}: state bytes / adamw's", value=f"{memory:.3f}x",
            detail=f"{info['kind']}: {info['bytes']:,} bytes of state for {info['params']:,} trainable values "
                   f"({info['bytes'] / info['params']:.2f} bytes a value); the plan predicts {info['predicted']:,} "
                   f"({info['predicted'] / info['bytes']:.3f}x)",
            raw={"bytes": info["bytes"], "predicted": info["predicted"]}))
    for name in OPTIMIZERS:
        ratios = [t / a for t, a in zip(times[name], times["adamw"])]
        rows.append(Row(
            bench="optimizers", figure=f"{name}: optimizer step time / adamw's", value=f"{median(ratios):.2f}x",
            spread=spread(ratios, "{:.2f}", "x"),
            detail=f"{median(times[name]) * 1000:.1f} ms a step (median of {steps} steps x {rounds} rounds); the "
                   f"first forward and backward of the {TOKENS} tokens took {forward_backward * 1000:.0f} ms",
            raw={"seconds": times[name]}))
    return rows


if __name__ == "__main__":
    main_for(run)
