"""7. Checkpoint: save time and size of a step checkpoint, against the model's parameter bytes.

    python -m bench.checkpoint [--quick]

In this process: `loop.train.setup` and `fit` on the steady job of benchmark 1 for 2 steps (so
AdamW has its state), then, alternating in rounds, our `Checkpointer.save` (Accelerate's
`save_state` into a temporary folder, progress.json, the COMPLETE marker, fsyncs, the rename,
retention) against the least a resumable save needs, written the plain way: `torch.save` of the
model's and the optimizer's state dicts into a fresh folder. Size is the folder's bytes on disk
after the save; parameter bytes are the model's unique parameters times their element size.
Figures: median of the per-round time ratio ours / plain, and our checkpoint's bytes over the
parameter bytes (AdamW's two moments make about 3x the floor in fp32).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from bench.common import (Row, alternate, load_job, log, main_for, median, spread, steady_job, verdict, workspace)

NAME = "checkpoint"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(quick: bool = False) -> list[Row]:
    import torch

    from loop.preemption import StopFlag
    from loop.run_dir import RunDir
    from loop.train import build_accelerator, fit, setup

    rounds = 2 if quick else 5
    folder = workspace() / NAME
    job = steady_job(folder)
    config = load_job(job, **{"hyperparams.max_steps": 2, "output.output_dir": str(folder / "out")})
    log(f"{NAME}: 2 training steps, then {rounds} rounds of saves")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    accelerator = build_accelerator(config)
    run_dir = RunDir(config.output_path, is_main=accelerator.is_main_process)
    try:
        run_ = setup(config, accelerator, run_dir, None, time.time())
        with StopFlag() as stop:
            fit(run_, stop)
        model = accelerator.unwrap_model(run_.model)
        unique = {p.data_ptr(): p for p in model.parameters()}.values()
        param_bytes = sum(p.numel() * p.element_size() for p in unique)
        sizes: dict[str, list[int]] = {"ours": [], "plain": []}

        def ours(round_index: int) -> float:
            progress = dataclasses.replace(run_.progress, step=1000 + round_index)
            started = time.perf_counter()
            path = run_.checkpointer.save(progress)
            seconds = time.perf_counter() - started
            sizes["ours"].append(folder_bytes(path))
            return seconds

        def plain(round_index: int) -> float:
            path = folder / f"plain-{round_index}"
            started = time.perf_counter()
            path.mkdir()
            torch.save(model.state_dict(), path / "model.pt")
            torch.save(run_.optimizer.state_dict(), path / "optimizer.pt")
            seconds = time.perf_counter() - started
            sizes["plain"].append(folder_bytes(path))
            shutil.rmtree(path)
            return seconds

        seconds = alternate(rounds, {"ours": ours, "plain": plain}, label=NAME)
        files = {f.name: f.stat().st_size for f in run_.checkpointer.last_path.iterdir()}
    finally:
        run_dir.close()
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    ratios = [o / p for o, p in zip(seconds["ours"], seconds["plain"])]
    size_ratio = median(sizes["ours"]) / param_bytes
    mb = 1024 * 1024
    return [
        Row(bench="7 checkpoint",
            figure="save time: ours (`Checkpointer.save`) / plain `torch.save` of model + optimizer",
            value=f"{median(ratios):.2f}x", spread=spread(ratios, "{:.2f}", "x"),
            detail=f"ours {median(seconds['ours']):.2f} s ({median(sizes['ours']) / mb / median(seconds['ours']):.0f} "
                   f"MiB/s), plain {median(seconds['plain']):.2f} s",
            raw={"seconds": seconds, "bytes": sizes, "param_bytes": param_bytes, "files": files}),
        Row(bench="7 checkpoint", figure="checkpoint size / parameter bytes (fp32 weights + AdamW moments)",
            value=f"{size_ratio:.2f}x", target="about 3x (weights + 2 moments)", met=verdict(size_ratio <= 3.1),
            detail=f"{median(sizes['ours']) / mb:.1f} MiB against {param_bytes / mb:.1f} MiB of parameters; plain "
                   f"save {median(sizes['plain']) / mb:.1f} MiB; files: "
                   + ", ".join(f"{name} {size / mb:.2f} MiB" for name, size in sorted(files.items()))),
    ]


if __name__ == "__main__":
    main_for(run)
