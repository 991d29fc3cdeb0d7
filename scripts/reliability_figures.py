"""Run the reliability suite and write its figures to `bench/results/reliability.md`.

    .venv/bin/python scripts/reliability_figures.py            # short form (a few minutes)
    .venv/bin/python scripts/reliability_figures.py --long     # long form: 40 kill trials (15-20 minutes)
    .venv/bin/python scripts/reliability_figures.py --seed 7 -- -k kill   # extra pytest arguments after --

It runs `pytest tests/reliability` and the property tests (`tests/test_config_properties.py`,
`tests/test_data_properties.py`) with `--junitxml=...` and RELIABILITY_STATS_DIR set (the kill test
writes its trial statistics there, tests/conftest.py the number of hypothesis examples run), then
replaces this form's section of the markdown file (the other form's section is kept): date, kill
trials and where they landed, property examples, signals, bad inputs, and passed/failed counts per
category, with the failures named. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "reliability.md"
TITLE = "# Reliability\n\nWritten by `scripts/reliability_figures.py`; each form's section is replaced when it runs again.\n"
CATEGORIES = {  # test file -> category (signals are picked out of test_failures by name)
    "test_kill_anywhere": "kill anywhere",
    "test_failures": "failures (NaN, full disk)",
    "test_output_lock": "one output folder, one run",
    "test_bad_inputs": "bad inputs",
    "test_safety": "safety",
    "test_hostile": "a hostile tester's defects",
    "test_config_properties": "property tests: job files",
    "test_data_properties": "property tests: data records",
}
SUITES = ["tests/reliability", "tests/test_config_properties.py", "tests/test_data_properties.py"]
SIGNALS = "signals"
SIGNAL_NAME = re.compile(r"sigterm|sigusr1|sigint|ctrl_c|interrupted")
LANDED = [("startup", "start-up (before training)"), ("resume", "start-up, restoring a checkpoint (a resume)"),
          ("training", "training"),
          ("checkpoint_save", "inside a checkpoint save"), ("final_save", "inside the final save"),
          ("after_training", "after training, before exit"), ("after_exit", "after the process had exited")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long form (40 kill trials)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the kill moments")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to update")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    return parser.parse_args(argv)


def run_suite(args, stats_dir: Path, junit: Path) -> tuple[int, float]:
    command = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *args.pytest_args]
    if args.long:
        command.append("--long")
    if args.seed is not None:
        command.append(f"--reliability-seed={args.seed}")
    env = dict(os.environ, RELIABILITY_STATS_DIR=str(stats_dir))
    print("running:", " ".join(command), flush=True)
    started = time.time()
    code = subprocess.call(command, cwd=REPO, env=env)
    return code, time.time() - started


def read_junit(path: Path) -> list[dict]:
    """One dict per test case: file, name, outcome (passed/failed/skipped/xfailed), message."""
    if not path.exists():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                is_xfail = "xfail" in (child.get("type", "") + child.get("message", ""))
                outcome, message = ("xfailed" if is_xfail else "skipped"), child.get("message", "")
        cases.append({"file": module, "name": case.get("name", ""), "outcome": outcome, "message": message,
                      "time": float(case.get("time", 0) or 0)})
    return cases


def category_of(case: dict) -> str:
    if case["file"] == "test_failures" and SIGNAL_NAME.search(case["name"].lower()):
        return SIGNALS
    return CATEGORIES.get(case["file"], case["file"])


def section(form: str, cases: list[dict], kills: dict | None, examples: dict | None, code: int, elapsed: float,
            args) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python scripts/reliability_figures.py" + (" --long" if args.long else "") + \
        (f" --seed {args.seed}" if args.seed is not None else "")
    lines = [f"## {form.capitalize()} form, {now}", "",
             f"`{command}` ran `pytest {' '.join(SUITES)} -q{' --long' if args.long else ''}` in "
             f"{elapsed / 60:.1f} min; pytest exit status {code}.", ""]

    lines += [f"### Kill anywhere, {form} form", ""]
    if kills:
        landed = kills.get("landed", {})
        lines += [f"Seed {kills['seed']}: **{_n(kills['trials'], 'kill trial')}** (SIGKILL) in "
                  f"{_n(kills['chains'], 'chain')}, {_n(kills['invocations'], 'start')} of `python -m launcher run`; "
                  f"{_n(kills['resumes_checked'], 'resume')} checked against the newest complete checkpoint, "
                  f"{_n(kills['exact_weight_matches'], 'final model')} bit-identical to the uninterrupted run; "
                  f"{'passed' if kills['passed'] else 'FAILED'} in {kills['duration_sec'] / 60:.1f} min.", "",
                  "| where the kill landed | kills |", "| --- | ---: |"]
        lines += [f"| {label} | {landed.get(key, 0)} |" for key, label in LANDED]
        modes = ", ".join(f"{k} {v}" for k, v in sorted(kills.get("modes", {}).items()))
        lines += ["", f"Kill moments chosen by: {modes}.", ""]
    else:
        lines += ["No statistics: the kill test did not run (deselected, or it failed before writing them).", ""]

    lines += [f"### Property tests, {form} form", ""]
    if examples:
        lines += [f"Hypothesis ran **{examples.get('passed', 0) + examples.get('failed', 0)} examples** "
                  f"({examples.get('failed', 0)} failing) of generated job files and data records; "
                  f"{examples.get('gave_up', 0)} more were discarded by the strategies' filters.", ""]
    else:
        lines += ["No statistics: the property tests did not run.", ""]

    by_category: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for case in cases:
        by_category[category_of(case)][case["outcome"]] += 1
    order = [*CATEGORIES.values(), SIGNALS]
    lines += [f"### Outcomes, {form} form", "", "| category | tests | passed | failed | skipped | xfailed |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in sorted(by_category, key=lambda n: order.index(n) if n in order else len(order)):
        counts = by_category[name]
        total = sum(counts.values())
        lines.append(f"| {name} | {total} | {counts['passed']} | {counts['failed']} | {counts['skipped']} | "
                     f"{counts['xfailed']} |")
    totals = defaultdict(int)
    for counts in by_category.values():
        for outcome, count in counts.items():
            totals[outcome] += count
    lines.append(f"| **all** | {sum(totals.values())} | {totals['passed']} | {totals['failed']} | "
                 f"{totals['skipped']} | {totals['xfailed']} |")
    signals = [c["name"] for c in cases if category_of(c) == SIGNALS]
    bad_inputs = [c for c in cases if c["file"] == "test_bad_inputs" and "[" in c["name"]]
    lines += ["", f"Signals exercised: {_n(len(signals), 'test')} ({', '.join(signals) or 'none'}); SIGTERM "
                  "under 1 and 2 processes is in tests/test_launch.py.",
              f"Bad inputs: {len(bad_inputs)} cases, "
              f"{sum(c['outcome'] == 'passed' for c in bad_inputs)} refused with exit 2 and the expected message.", ""]
    failed = [c for c in cases if c["outcome"] == "failed"]
    if failed:
        lines += ["Failed:", ""]
        lines += [f"- `{c['file']}::{c['name']}`: {_first_line(c['message'])}" for c in failed]
        lines.append("")
    xfailed = [c for c in cases if c["outcome"] == "xfailed"]
    if xfailed:
        lines += ["Expected failures: " + ", ".join(f"`{c['name']}` ({_first_line(c['message'])})" for c in xfailed),
                  ""]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _first_line(text: str) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return (line[:220] + "...") if len(line) > 220 else line


def update_markdown(path: Path, form: str, body: str) -> None:
    start, end = f"<!-- reliability:{form}:start -->", f"<!-- reliability:{form}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else TITLE
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    args = parse_args(argv)
    form = "long" if args.long else "short"
    with tempfile.TemporaryDirectory(prefix="reliability-") as folder:
        stats_dir, junit = Path(folder) / "stats", Path(folder) / "junit.xml"
        code, elapsed = run_suite(args, stats_dir, junit)
        cases = read_junit(junit)
        kill_file = stats_dir / "kill_anywhere.json"
        kills = json.loads(kill_file.read_text()) if kill_file.exists() else None
        examples_file = stats_dir / "property_examples.json"
        examples = json.loads(examples_file.read_text()) if examples_file.exists() else None
    if not cases:
        print(f"pytest wrote no report (exit status {code}); {args.output} left as it was", file=sys.stderr)
        return code or 1
    update_markdown(args.output, form, section(form, cases, kills, examples, code, elapsed, args))
    print(f"wrote the {form} form's section of {args.output}")
    return code


if __name__ == "__main__":
    sys.exit(main())
