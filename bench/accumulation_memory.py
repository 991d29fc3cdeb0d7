"""Peak memory of gradient accumulation: accumulation 8 against accumulation 1 at the same micro-batch.

    python -m bench.accumulation_memory [--quick]

The loop prefetches the whole accumulation window (to count its supervised tokens first) but runs
backward per micro-batch, so it holds at most one micro-batch's graph at a time: the extra memory
of accumulation 8 is only the seven extra batches of token ids. Each variant runs `loop.train.train`
in a fresh process (`--child JOB`); the figure is the training's peak resident memory above the
process's resident memory when the run reports "running" through the loop's `status_writer` hook
(everything loaded, before the first step), Linux `ru_maxrss` and `/proc/self/statm`, median over
rounds. Holding every micro-batch's graph would multiply the activation memory by the accumulation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from pathlib import Path

from bench.common import (PYTHON, bench_job, bench_model, configure_process, dataset_file, load_job, run_command,
                          workspace)


def child(job: Path) -> None:
    """Train `job` in this process; print {"success", "extra"}: peak resident bytes above those at the start."""
    from loop.train import train

    page = os.sysconf("SC_PAGE_SIZE")
    before: dict[str, int] = {}

    def at_start(fields: dict) -> None:
        if fields.get("status") == "running" and "rss" not in before:
            with open("/proc/self/statm") as statm:
                before["rss"] = int(statm.read().split()[1]) * page

    result = train(load_job(job), status_writer=at_start)
    if not result.success or "rss" not in before:
        sys.exit(f"training {job} failed: {result.error}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"success": result.success, "extra": peak - before["rss"]}))


def measure(job: Path) -> int:
    log_path = job.parent / "child.log"
    run_command([PYTHON, "-m", "bench.accumulation_memory", "--child", str(job)], log_path)
    record = json.loads(next(line for line in reversed(log_path.read_text().splitlines()) if line.startswith("{")))
    assert record["success"]
    return record["extra"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_process()
    if args.child:
        return child(args.child)

    rounds, seq = (2, 256) if args.quick else (3, 512)
    data = dataset_file(f"long-{seq}", 64, lengths="uniform", low=seq, high=seq)
    jobs = {accumulation: bench_job(workspace() / f"accumulation-{accumulation}", bench_model(), data, **{
        "data.max_length": seq, "hyperparams.batch_size": 4, "hyperparams.gradient_accumulation": accumulation,
        "hyperparams.max_steps": 2, "environment.logging_steps": 100,
        "output.resume": "never", "output.overwrite": True}) for accumulation in (1, 8)}  # every round trains anew
    extra: dict[int, list[int]] = {1: [], 8: []}
    for _ in range(rounds):  # alternating A/B rounds
        for accumulation, job in jobs.items():
            extra[accumulation].append(measure(job))
    one, eight = statistics.median(extra[1]), statistics.median(extra[8])
    print("| variant | peak training memory above the start of training (MiB, median) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| micro-batch 4 x accumulation 1 | {one / 2**20:.1f} | 1.00x |")
    print(f"| micro-batch 4 x accumulation 8 | {eight / 2**20:.1f} | {eight / max(one, 1):.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
