"""5. Preprocessing, cold and from the cache: runs `bench/bench_preprocess.py` and reads its table.

    python -m bench.preprocess [--quick]

`bench_preprocess.py` (see its docstring) times, in one process and in this order: the floor (a
bare `apply_chat_template` loop), `build_datasets` cold with num_proc 1 and 2, and a cache hit.
Each run gives the ratios cold / floor and hit / cold; this runs it `rounds` times with a smaller
`--records` than its default (8000, 1000 with --quick) to fit the time budget, and reports the
median and min-max of those per-run ratios.
"""

from __future__ import annotations

import re

from bench.common import PYTHON, REPO_ROOT, Row, log, main_for, median, run_command, spread, verdict, workspace

NAME = "preprocess"
ROW = re.compile(r"^\| (?P<step>[^|]+?) \| (?P<seconds>[\d.]+) \| (?P<rate>[\d,]+) \|")


def parse(output: str) -> dict[str, float]:
    """{step name: seconds} from the markdown table bench_preprocess prints."""
    return {m["step"]: float(m["seconds"]) for m in map(ROW.match, output.splitlines()) if m}


def run(quick: bool = False) -> list[Row]:
    rounds, records = (1, 1000) if quick else (2, 8000)
    folder = workspace() / NAME
    runs = []
    for round_index in range(rounds):
        log(f"{NAME}: bench_preprocess.py --records {records}, run {round_index + 1}/{rounds}")
        output = folder / f"run-{round_index}.log"
        run_command([PYTHON, str(REPO_ROOT / "bench" / "bench_preprocess.py"), "--records", str(records)], output)
        seconds = parse(output.read_text(encoding="utf-8"))
        floor = seconds["floor: apply_chat_template loop"]
        runs.append({"floor": floor, "cold1": seconds["cold, num_proc 1"], "cold2": seconds["cold, num_proc 2"],
                     "hit": seconds["cache hit"]})

    def column(key: str, over: str) -> list[float]:
        return [r[key] / r[over] for r in runs]

    cold1, cold2, hit = column("cold1", "floor"), column("cold2", "floor"), column("hit", "cold1")
    def seconds(key: str) -> float:
        return median([r[key] for r in runs])

    detail = (f"{records} records; floor {seconds('floor'):.2f} s, cold {seconds('cold1'):.2f} s, cold num_proc 2 "
              f"{seconds('cold2'):.2f} s, hit {seconds('hit'):.3f} s")
    return [
        Row(bench="5 preprocessing", figure="cold `build_datasets` (num_proc 1) / bare apply_chat_template loop",
            value=f"{median(cold1):.2f}x", spread=spread(cold1, "{:.2f}", "x"), target="<= 1.50x",
            met=verdict(median(cold1) <= 1.5), detail=detail, raw={"runs": runs}),
        Row(bench="5 preprocessing", figure="cold `build_datasets` (num_proc 2) / bare loop",
            value=f"{median(cold2):.2f}x", spread=spread(cold2, "{:.2f}", "x")),
        Row(bench="5 preprocessing", figure="cache hit / cold (num_proc 1)",
            value=f"{median(hit):.1%}", spread=spread([h * 100 for h in hit], "{:.1f}", "%"), target="< 5%",
            met=verdict(median(hit) < 0.05)),
    ]


if __name__ == "__main__":
    main_for(run)
