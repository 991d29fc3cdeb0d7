"""How fast is data preparation, cold and from the cache, against a bare chat-template loop?

    python bench/bench_preprocess.py                  # 100k chat records
    python bench/bench_preprocess.py --records 20000 --template chatml

Everything happens in a temporary folder: a tiny ChatML tokenizer (launcher.demo), a JSONL file of
the tests' chat records (`tests.helpers.chat_records`: one- and two-turn, some with a system
prompt), and fresh data caches. It prints a markdown table:

- floor: a bare loop of `tokenizer.apply_chat_template(messages, tokenize=True)` over the parsed
  records (no masks, no JSON, no cache); the least any preparation can cost;
- cold, num_proc 1 and 2: `build_datasets` with an empty cache (read, profile, masks, save);
- cache hit: `build_datasets` again with the same inputs.

Targets: cold (num_proc 1) within 1.5x of the floor; a cache hit under 5% of cold.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="chat records (default 100000)")
    parser.add_argument("--template", choices=("plain", "chatml"), default="plain",
                        help="plain: ChatML without {%% generation %%} markers (masks by prefix rendering); "
                             "chatml: data.chat_template = \"chatml\" (markers, exact assistant mask)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the floor and num_proc 1 on one core each
    import datasets

    from launcher.config import load_config
    from launcher.demo import build_tiny_model
    from loop.data import build_datasets, load_tokenizer
    from tests.helpers import chat_records, write_job, write_jsonl

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as folder:
        folder = Path(folder)
        build_tiny_model(folder / "model")
        records = chat_records(args.records)
        write_jsonl(folder / "train.jsonl", records)

        def config(num_proc: int, cache: str):
            job = write_job(folder / f"job-{cache}", folder / "model", **{
                "data.dataset_path": str(folder / "train.jsonl"), "data.cache_dir": str(folder / cache),
                "data.num_proc": num_proc, "data.max_length": 1024,
                "data.chat_template": "chatml" if args.template == "chatml" else None})
            return load_config(job)

        tokenizer = load_tokenizer(config(1, "cache-1"))
        floor, _ = timed(lambda: [tokenizer.apply_chat_template(r["messages"], tokenize=True) for r in records])
        cold_1, data = timed(lambda: build_datasets(config(1, "cache-1"), tokenizer))
        cold_2, _ = timed(lambda: build_datasets(config(2, "cache-2"), tokenizer))
        hit, cached = timed(lambda: build_datasets(config(1, "cache-1"), tokenizer))
        assert cached.from_cache and len(cached.train) == len(data.train)

    count = len(records)
    rows = [("floor: apply_chat_template loop", floor, "1.00x floor"),
            ("cold, num_proc 1", cold_1, f"{cold_1 / floor:.2f}x floor"),
            ("cold, num_proc 2", cold_2, f"{cold_2 / floor:.2f}x floor"),
            ("cache hit", hit, f"{hit / cold_1:.1%} of cold (num_proc 1)")]
    print(f"\n{count} records, template {args.template}, {data.report.num_tokens} tokens, "
          f"{os.cpu_count()} CPUs\n")
    print("| step | seconds | examples/s | ratio |\n| --- | ---: | ---: | --- |")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.2f} | {count / seconds:,.0f} | {ratio} |")
    print(f"\ntargets: cold (num_proc 1) <= 1.5x floor: {'met' if cold_1 <= 1.5 * floor else 'MISSED'}; "
          f"cache hit < 5% of cold: {'met' if hit < 0.05 * cold_1 else 'MISSED'}")


if __name__ == "__main__":
    main()
