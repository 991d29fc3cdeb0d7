"""Data at scale: memory and time of preparing large JSONL files, packing a million examples, and a
single huge line.

    python -m bench.data_scale            # 200k records (about 300 MB) and 1M (about 1.5 GB): ~30 minutes on 2 cores
    python -m bench.data_scale --quick    # 20k and 100k records, a 5 MB line: a few minutes

Every preparation runs `build_datasets` (packing on, max_length 2048, num_proc 1, an empty cache)
in a fresh process (`--child`), which reports:
- peak resident memory: `ru_maxrss` of the process, and the peaks of its anonymous memory (heap) and
  of its mapped files, sampled every 50 ms from /proc/self/status (file pages are the page cache's,
  given back under pressure; the heap is what the preparation holds);
- CPU time (and wall time), and so time per record: CPU time, since other processes may share the
  cores (`data.num_proc = 1`, so the preparation is this one process).

The data: one-turn chat records of about 1.5 KB (a 250-character question, a 1200-character reply,
pseudo-words of the bench tokenizer's lexicon), written once per size into the workspace.

Targets (issue #16): peak resident memory <= 1 GB at 200k records; flat from 200k to 1M (ratio
<= 1.25); CPU time per record flat (ratio <= 1.25); best-fit-decreasing packing of 1M examples in
seconds (<= 10 s); a 50 MB line prepared without tokenizing all of it (its preparation takes less
than a tenth of tokenizing the whole line once with the Rust tokenizer).
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import threading
import time
from pathlib import Path

from bench.common import PYTHON, Row, bench_model, log, main_for, run_command, verdict, workspace

NAME = "data_scale"
SIZES = {False: (200_000, 1_000_000), True: (20_000, 100_000)}
HUGE_LINE_BYTES = {False: 50 << 20, True: 5 << 20}


# --- data ------------------------------------------------------------------------------------------

def write_records(path: Path, count: int, seed: int = 0) -> Path:
    """`count` chat records of about 1.5 KB each, composed from a pool of pseudo-word texts (fast to make)."""
    if path.exists():
        return path
    from bench.common import TextSource

    source = TextSource(seed=seed)
    questions = [source.text(40) for _ in range(500)]
    replies = [source.text(190) for _ in range(2000)]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(count):
            record = {"messages": [{"role": "user", "content": f"{i}. {rng.choice(questions)[:250]}"},
                                   {"role": "assistant", "content": rng.choice(replies)[:1200]}]}
            out.write(json.dumps(record) + "\n")
    return path


def write_huge_line(path: Path, num_bytes: int) -> Path:
    """A few ordinary records and one whose reply is `num_bytes` of text."""
    from bench.common import TextSource

    text = TextSource(seed=5).text(3000)
    reply = (text * (num_bytes // len(text) + 1))[:num_bytes]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        out.write(json.dumps({"messages": [{"role": "user", "content": "Write at length."},
                                           {"role": "assistant", "content": reply}]}) + "\n")
        for i in range(3):
            out.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                               {"role": "assistant", "content": f"Answer {i}."}]}) + "\n")
    return path


# --- one preparation, in a fresh process ------------------------------------------------------------

class PeakMemory:
    """Peaks of RssAnon and RssFile (bytes), sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            values = {}
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        name, amount, _ = line.split()
                        values[name] = int(amount) * 1024
            self.anon = max(self.anon, values.get("RssAnon:", 0))
            self.file = max(self.file, values.get("RssFile:", 0))
            self._stop.wait(interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(data: str, model: str, cache: str, out: str) -> None:
    """Prepare `data` once with an empty cache; write the measurements to `out` (JSON)."""
    import datasets

    from launcher.config import load_config
    from loop.data import build_datasets, load_tokenizer
    from tests.helpers import write_job

    datasets.disable_progress_bars()
    job = write_job(Path(cache).parent / f"job-{Path(data).stem}", model, **{
        "data.dataset_path": data, "data.cache_dir": cache, "data.packing": True, "data.max_length": 2048,
        "data.num_proc": 1})
    config = load_config(job)
    tokenizer = load_tokenizer(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakMemory() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        prepared = build_datasets(config, tokenizer)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    Path(out).write_text(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu_seconds, "records": prepared.report.num_read,
        "sequences": len(prepared.train),
        "tokens": prepared.report.num_tokens, "truncated": prepared.report.num_truncated,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "maxrss_before": before,
        "children_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_anon": peak.anon, "peak_file": peak.file}))


def measure(data: Path, label: str) -> dict:
    folder = workspace() / NAME / label
    result = folder / "result.json"
    log(f"{NAME}: preparing {data.name} ({data.stat().st_size / 1e6:.0f} MB) in a fresh process")
    run_command([PYTHON, "-m", "bench.data_scale", "--child", str(data), str(bench_model()), str(folder / "cache"),
                 str(result)], folder / "child.log", timeout=3600)
    return json.loads(result.read_text())


# --- the rows ---------------------------------------------------------------------------------------

def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MB"


def run(quick: bool = False) -> list[Row]:
    small, large = SIZES[quick]
    data = workspace() / "data"
    runs = {}
    for count in (small, large):
        log(f"{NAME}: writing {count} records")
        runs[count] = measure(write_records(data / f"chat-{count}.jsonl", count), f"records-{count}")
    a, b = runs[small], runs[large]
    # CPU time, not wall time: other processes share the machine's cores (wall time is in the detail).
    per_record = {count: r["cpu_seconds"] / r["records"] for count, r in runs.items()}
    rows = [
        Row(bench="data at scale", figure=f"peak resident memory preparing {small:,} records "
                                          f"({(data / f'chat-{small}.jsonl').stat().st_size / 1e6:.0f} MB JSONL)",
            value=_mb(a["maxrss"]), target="<= 1024 MB" if not quick else "", met=verdict(a["maxrss"] <= 2**30)
            if not quick else "",
            detail=f"heap peak {_mb(a['peak_anon'])}, mapped files peak {_mb(a['peak_file'])}, "
                   f"{_mb(a['maxrss_before'])} before preparing (imports, tokenizer)", raw=a),
        Row(bench="data at scale", figure=f"peak resident memory, {large:,} / {small:,} records",
            value=f"{b['maxrss'] / a['maxrss']:.2f}x", target="<= 1.25x", met=verdict(b["maxrss"] / a["maxrss"] <= 1.25),
            detail=f"{_mb(b['maxrss'])} at {large:,} records (heap peak {_mb(b['peak_anon'])}, mapped files "
                   f"peak {_mb(b['peak_file'])})", raw=b),
        Row(bench="data at scale", figure=f"CPU time per record, {large:,} / {small:,} records",
            value=f"{per_record[large] / per_record[small]:.2f}x", target="<= 1.25x",
            met=verdict(per_record[large] / per_record[small] <= 1.25),
            detail=f"{a['cpu_seconds']:.0f} s CPU ({a['seconds']:.0f} s wall) for {small:,} "
                   f"({per_record[small] * 1e6:.0f} us/record), {b['cpu_seconds']:.0f} s CPU ({b['seconds']:.0f} s "
                   f"wall) for {large:,} ({per_record[large] * 1e6:.0f} us/record); "
                   f"{b['tokens']:,} tokens in {b['sequences']:,} packed rows"),
    ]
    rows.append(_packing_row())
    rows.append(_huge_line_row(quick))
    return rows


def _packing_row() -> Row:
    import numpy as np

    from loop.data.prepare import best_fit_decreasing

    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(300), 1.0, 1_000_000), 8, 2048).astype(np.int64)
    log(f"{NAME}: best-fit decreasing of 1,000,000 examples")
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        bins = best_fit_decreasing(lengths, 2048)
        seconds.append(time.perf_counter() - start)
    fill = lengths.sum() / (len(bins) * 2048)
    best = min(seconds)
    return Row(bench="data at scale", figure="best-fit-decreasing packing of 1,000,000 examples (capacity 2048)",
               value=f"{sorted(seconds)[1]:.1f} s", spread=f"{best:.1f}-{max(seconds):.1f} s (n=3)",
               target="<= 10 s", met=verdict(sorted(seconds)[1] <= 10),
               detail=f"lognormal lengths (median 300 tokens), {len(bins):,} bins, {fill:.1%} filled")


def _huge_line_row(quick: bool) -> Row:
    from transformers import AutoTokenizer

    size = HUGE_LINE_BYTES[quick]
    path = write_huge_line(workspace() / "data" / f"huge-{size >> 20}mb.jsonl", size)
    result = measure(path, f"huge-{size >> 20}mb")
    tokenizer = AutoTokenizer.from_pretrained(bench_model())
    text = json.loads(path.open(encoding="utf-8").readline())["messages"][1]["content"]
    log(f"{NAME}: tokenizing the whole {size >> 20} MB reply once (the cost avoided)")
    start = time.perf_counter()
    num_tokens = len(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)
    whole = time.perf_counter() - start
    return Row(bench="data at scale", figure=f"a {size >> 20} MB line: preparing its file / tokenizing the line once",
               value=f"{result['seconds'] / whole:.2f}x", target="< 0.10x", met=verdict(result["seconds"] / whole < 0.10),
               detail=f"prepared in {result['seconds']:.1f} s ({result['truncated']} example truncated to 2048 tokens; "
                      f"peak {_mb(result['maxrss'])}); the whole reply is {num_tokens:,} tokens, {whole:.1f} s to tokenize")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        child(*sys.argv[2:6])
    else:
        main_for(run)
