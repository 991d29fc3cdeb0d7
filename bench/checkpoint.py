"""7. Checkpoint: save time and size of a step checkpoint, against the model's parameter bytes.

    python -m bench.checkpoint [--quick]

In this process: `loop.train.train` on the steady job of benchmark 1 for 2 steps (so AdamW has its
state); at the end of step 2, in the loop's `on_step(run)` hook, alternating in rounds, our
`Checkpointer.save` (Accelerate's `save_state` into a temporary folder, progress.json, the COMPLETE
marker, fsyncs, the rename, retention) against the least a resumable save needs, written the plain
way: `torch.save` of the model's and the optimizer's state dicts into a fresh folder. Size is the
folder's bytes on disk after the save; parameter bytes are the model's unique parameters times their
element size. Figures: median of the per-round time ratio ours / plain, and our checkpoint's bytes
over the parameter bytes (AdamW's two moments make about 3x the floor in fp32).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

from bench.common import Row, alternate, log, main_for, median, spread, steady_job, train_in_process, verdict, workspace

NAME = "checkpoint"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(quick: bool = False) -> list[Row]:
    import torch

    rounds = 2 if quick else 5
    folder = workspace() / NAME
    job = steady_job(folder)
    log(f"{NAME}: 2 training steps, then {rounds} rounds of saves")
    measured: dict = {}

    def measure_saves(run_) -> None:
        if run_.progress.step != 2:
            return
        model = run_.accelerator.unwrap_model(run_.model)
        unique = {p.data_ptr(): p for p in model.parameters()}.values()
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

        measured.update(seconds=alternate(rounds, {"ours": ours, "plain": plain}, label=NAME), sizes=sizes,
                        param_bytes=sum(p.numel() * p.element_size() for p in unique),
                        files={f.name: f.stat().st_size for f in run_.checkpointer.last_path.iterdir()})

    train_in_process(job, folder / "out", on_step=measure_saves, **{"hyperparams.max_steps": 2})
    seconds, sizes, param_bytes, files = (measured[key] for key in ("seconds", "sizes", "param_bytes", "files"))
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
