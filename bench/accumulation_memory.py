"""Peak memory of gradient accumulation: accumulation 8 against accumulation 1 at the same micro-batch.

    python -m bench.accumulation_memory [--quick]

The loop prefetches the whole accumulation window (to count its supervised tokens first) but runs
backward per micro-batch, so it holds at most one micro-batch's graph at a time: the extra memory
of accumulation 8 is only the seven extra batches of token ids. Each variant runs `loop.train.train`
in a fresh process; the figure is the training's peak resident memory above the process's resident
memory just before the first step (Linux `ru_maxrss` and `/proc/self/statm`), median over rounds.
Holding every micro-batch's graph would multiply the activation memory by the accumulation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys
import loop.train as lt
from launcher.config import load_config

page = os.sysconf("SC_PAGE_SIZE")
before = {}
original_fit = lt.fit

def fit(run, stop, started):
    before["rss"] = int(open("/proc/self/statm").read().split()[1]) * page
    return original_fit(run, stop, started)

lt.fit = fit
result = lt.train(load_config(sys.argv[1]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"success": result.success, "extra": peak - before["rss"]}))
"""


def write_job(folder: Path, model_dir: Path, accumulation: int, steps: int, seq: int) -> Path:
    words = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
             "sigma tau upsilon phi chi psi omega").split()
    lines = []
    for i in range(64):
        reply = " ".join(words[(i + j) % len(words)] for j in range(seq))
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                              {"role": "assistant", "content": reply}]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    job = folder / f"job_{accumulation}.toml"
    job.write_text(f"""
[model]
model_path = "{model_dir}"
[data]
dataset_path = "train.jsonl"
max_length = {seq}
cache_dir = "cache"
[hyperparams]
batch_size = 4
gradient_accumulation = {accumulation}
max_steps = {steps}
fp_precision = "fp32"
save_steps = 0
[output]
output_dir = "out_{accumulation}"
resume = "never"
overwrite = true
[environment]
logging_steps = 100
""")
    return job


def measure(job: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(job)], capture_output=True, text=True, env=env,
                         cwd=job.parent, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert record["success"]
    return record["extra"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from launcher.demo import build_model, build_tokenizer

    rounds, seq = (2, 256) if args.quick else (3, 512)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = build_tokenizer(folder / "model", vocab_size=1024)
        build_model(folder / "model", tokenizer, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
        jobs = {a: write_job(folder, folder / "model", a, steps=2, seq=seq) for a in (1, 8)}
        extra = {1: [], 8: []}
        for _ in range(rounds):  # alternating A/B rounds
            for accumulation, job in jobs.items():
                extra[accumulation].append(measure(job))
    one, eight = statistics.median(extra[1]), statistics.median(extra[8])
    print("| variant | peak training memory above the start of training (MiB, median) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| micro-batch 4 x accumulation 1 | {one / 2**20:.1f} | 1.00x |")
    print(f"| micro-batch 4 x accumulation 8 | {eight / 2**20:.1f} | {eight / max(one, 1):.2f}x |")


if __name__ == "__main__":
    main()
