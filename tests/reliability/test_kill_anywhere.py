"""Kill anywhere: SIGKILL `python -m launcher run job.toml` at random moments, rerun, and end exactly right.

    pytest tests/reliability/test_kill_anywhere.py -q            # short form: 5 kills, about 2 minutes
    pytest tests/reliability/test_kill_anywhere.py -q --long     # long form: 40 kills (RELIABILITY_LONG_TRIALS)

A trial is one SIGKILL. Trials run in chains: the job is started, killed, started again (the rerun
may itself be killed: that is the next trial), and the last start runs to completion. Each kill
moment comes from a seeded RNG in one of four ways:

    random      a delay drawn over the whole life of the process (start-up, training, final save)
    steps       right after a randomly drawn optimizer step (read from status.json)
    checkpoint  the moment `checkpoints/.tmp-step_*` of this process exists (inside a checkpoint save)
    startup     a delay drawn over the start-up, before the first status: loading, and when a complete
                checkpoint exists, restoring it (a kill during a resume)
    final       the moment `.tmp-final` of this process exists (inside the final save)

After every kill: `result.json` and `status.json` parse when present, `metrics.jsonl` parses with the
torn-line tolerance and holds each step at most once. Every start resumes from the newest complete
checkpoint at the moment it starts (never a partial one, never an older one), and the completing
start ends with exactly the weights of an uninterrupted run (CPU fp32, `torch.equal`), each step in
`metrics.jsonl` exactly once, no temporary folders, no lock.

Where the kills landed (start-up, training, inside a checkpoint save, inside the final save, after
the run) is judged from the folder after each kill and written to `$RELIABILITY_STATS_DIR/
kill_anywhere.json` when that variable is set (scripts/reliability_figures.py sets it).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loop.status import read_jsonl

from helpers import (
    REPO,
    complete_checkpoints,
    launcher_command,
    read_json_if_present,
    small_job,
    subprocess_env,
    write_stats,
)

TOTAL_STEPS = 50          # not a multiple of SAVE_STEPS: a kill in the final save redoes steps 49-50
SAVE_STEPS = 3
SAVE_TOTAL_LIMIT = 2
SHORT_CHAINS = [["startup", "checkpoint", "random", "startup", "steps", "checkpoint", "final"]]
LONG_TRIALS = int(os.environ.get("RELIABILITY_LONG_TRIALS", "40"))  # kills in the long form
LONG_CHAIN = 5                                                       # kills per chain (then one full run)
MODES = ("random", "steps", "checkpoint", "startup", "final")
RESUMING = re.compile(r"resuming from (\S+) at step (\d+)")
INVOCATION_TIMEOUT = 300


def job_values() -> dict:
    return {"hyperparams.max_steps": TOTAL_STEPS, "hyperparams.save_steps": SAVE_STEPS,
            "hyperparams.save_total_limit": SAVE_TOTAL_LIMIT, "hyperparams.warmup_steps": 2,
            "data.shuffle": True}


def chains_for(long_form: bool, rng: random.Random) -> list[list[str]]:
    if not long_form:
        return [list(chain) for chain in SHORT_CHAINS]
    chains, remaining = [], LONG_TRIALS
    while remaining:
        size = min(LONG_CHAIN, remaining)
        # "final" only comes last: after it there is nothing left to interrupt but the final save.
        # Every other chain ends with it, so the long form surely kills inside the final save.
        modes = [rng.choices(MODES[:4], weights=(4, 3, 3, 2))[0] for _ in range(size - 1)]
        modes.append("final" if len(chains) % 2 == 0 else rng.choices(MODES, weights=(3, 2, 2, 2, 3))[0])
        chains.append(modes)
        remaining -= size
    return chains


@dataclass
class Stats:
    seed: int
    form: str
    chains: int = 0
    trials: int = 0
    invocations: int = 0
    modes: Counter = field(default_factory=Counter)
    landed: Counter = field(default_factory=Counter)
    kill_steps: list = field(default_factory=list)
    resumes_checked: int = 0
    fresh_starts_checked: int = 0
    exact_weight_matches: int = 0
    passed: bool = False
    duration_sec: float = 0.0

    def to_dict(self) -> dict:
        return {"seed": self.seed, "form": self.form, "chains": self.chains, "trials": self.trials,
                "kills": self.trials, "invocations": self.invocations, "modes": dict(self.modes),
                "landed": dict(self.landed), "kills_in_checkpoint_save": self.landed["checkpoint_save"],
                "kills_in_final_save": self.landed["final_save"], "kill_steps": self.kill_steps,
                "resumes_checked": self.resumes_checked, "fresh_starts_checked": self.fresh_starts_checked,
                "exact_weight_matches": self.exact_weight_matches, "passed": self.passed,
                "duration_sec": round(self.duration_sec, 1)}


@dataclass
class Timing:
    """Running estimates for drawing `random` kill moments over a process's life."""

    startup: float = 4.0
    per_step: float = 0.08
    tail: float = 3.0

    def life(self, remaining_steps: int) -> float:
        return self.startup + remaining_steps * self.per_step + self.tail


# --- one start of the job --------------------------------------------------------------------------

class Invocation:
    """One `python -m launcher run job.toml` with its output captured to a file."""

    def __init__(self, job: Path, output: Path, log: Path):
        self.output, self.log = output, log
        self.expected = complete_checkpoints(output)[-1] if complete_checkpoints(output) else None
        # A kill after the run had written its result leaves a finished run, which a start leaves as it is.
        finished = read_json_if_present(output / "result.json") if (output / "result.json").exists() else None
        self.finished_before = finished if finished and finished.get("success") else None
        self.started = time.time()
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(launcher_command("run", job), cwd=REPO, env=subprocess_env(),
                                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    # What this process has done so far, judged from the folder (files it created after it started).
    def status(self) -> dict | None:
        try:
            status = json.loads((self.output / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return status if (status.get("timestamp") or 0) >= self.started else None

    def _is_ours(self, path: Path) -> bool:
        try:
            return path.stat().st_ctime >= self.started
        except OSError:
            return False

    def saving_checkpoint(self) -> bool:
        root = self.output / "checkpoints"
        try:
            names = os.listdir(root)
        except OSError:
            return False
        return any(n.startswith(".tmp-step_") and self._is_ours(root / n) for n in names)

    def saving_final(self) -> bool:
        return self._is_ours(self.output / ".tmp-final")

    def reached_step(self, step: int) -> bool:
        status = self.status()
        return status is not None and (status.get("current_step") or 0) >= step

    def wait_until(self, predicate, timeout: float, interval: float = 0.001) -> bool:
        """Poll until `predicate()` or the process exits; True when the predicate held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(interval)
        return False

    def kill(self) -> str:
        """SIGKILL the process group; returns where the kill landed."""
        exited = self.process.poll() is not None
        if not exited:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        if exited:
            return "after_exit"
        if self.saving_final():
            return "final_save"
        if self.saving_checkpoint():
            return "checkpoint_save"
        status = self.status()
        if status is None:
            return "resume" if self.expected is not None else "startup"
        if status.get("status") == "completed" or self._is_ours(self.output / "final"):
            return "after_training"
        return "training"

    def finish(self) -> int:
        return self.process.wait(timeout=INVOCATION_TIMEOUT)

    def output_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def check_resume_point(self, stats: Stats) -> None:
        """A start that got far enough to say where it resumed from must name the newest complete one."""
        match = RESUMING.search(self.output_text())
        if match:
            assert self.expected is not None, f"resumed from {match.group(1)} but no complete checkpoint existed"
            assert (Path(match.group(1)), int(match.group(2))) == (self.expected[1], self.expected[0]), \
                f"resumed from {match.group(1)} at step {match.group(2)}; newest complete was {self.expected}"
            stats.resumes_checked += 1
        elif self.expected is None and self.status() is not None:
            stats.fresh_starts_checked += 1


# --- checks ------------------------------------------------------------------------------------------

def train_steps(output: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(output / "metrics.jsonl") if "loss" in r]


def check_after_kill(output: Path, landed: str) -> None:
    for name in ("result.json", "status.json"):
        read_json_if_present(output / name)  # a torn file fails here
    steps = train_steps(output)
    assert steps == list(range(1, len(steps) + 1)), f"metrics.jsonl after a kill ({landed}): steps {steps}"


def check_completed(output: Path, last: Invocation, reference: dict[str, torch.Tensor]) -> None:
    code = last.finish()
    assert code == 0, last.output_text()[-4000:]
    result = read_json_if_present(output / "result.json")
    assert result["success"] and result["global_step"] == TOTAL_STEPS, result
    if last.finished_before:  # the run had finished before this start: its result stands, untouched
        assert result == last.finished_before
    else:
        expected = str(last.expected[1]) if last.expected else None
        assert result["summary"]["resumed_from"] == expected, (result["summary"]["resumed_from"], expected)
    status = read_json_if_present(output / "status.json")
    assert status["status"] == "completed" and status["current_step"] == TOTAL_STEPS, status
    assert train_steps(output) == list(range(1, TOTAL_STEPS + 1)), "each step exactly once in metrics.jsonl"
    checkpoints = output / "checkpoints"
    leftovers = [p.name for p in checkpoints.iterdir() if not (p / "COMPLETE").is_file()]
    assert not leftovers, f"incomplete checkpoint folders left behind: {leftovers}"
    complete = complete_checkpoints(output)
    assert len(complete) <= SAVE_TOTAL_LIMIT and complete[-1][0] == TOTAL_STEPS // SAVE_STEPS * SAVE_STEPS
    assert not (output / ".tmp-final").exists() and not (output / ".lock").exists()
    weights = load_file(output / "final" / "model.safetensors")
    assert weights.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(weights[name], reference[name])]
    assert not different, f"final weights differ from the uninterrupted run in {different}"


# --- the test ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_weights(tmp_path_factory, tiny_model_dir) -> dict[str, torch.Tensor]:
    """The uninterrupted run, in this process (the tiny fp32 model gives the same bits at any thread count)."""
    from launcher.config import load_config
    from loop.train import train

    folder = tmp_path_factory.mktemp("uninterrupted")
    config = load_config(small_job(folder, tiny_model_dir, **job_values()))
    result = train(config)
    assert result.success and result.global_step == TOTAL_STEPS, result.error
    return load_file(config.output_path / "final" / "model.safetensors")


@pytest.mark.slow
def test_kill_anywhere_then_rerun_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, reference_weights,
                                                                     long_form, reliability_seed):
    rng = random.Random(reliability_seed)
    chains = chains_for(long_form, rng)
    stats = Stats(seed=reliability_seed, form="long" if long_form else "short")
    timing = Timing()
    # The short form kills the moment a save is seen, so its few trials surely land inside one; the
    # long form also waits a few milliseconds, to hit later points of the save.
    jitters = (0.0, 0.0, 0.002, 0.005, 0.01) if long_form else (0.0,)
    started = time.time()
    invocation = None
    try:
        for number, modes in enumerate(chains):
            folder = tmp_path / f"chain{number:02d}"
            job = small_job(folder, tiny_model_dir, **job_values())
            output = folder / "out"
            for trial, mode in enumerate(modes):
                invocation = Invocation(job, output, folder / f"start{trial}.log")
                stats.invocations += 1
                resume_step = invocation.expected[0] if invocation.expected else 0
                remaining = TOTAL_STEPS - resume_step
                if mode == "random":
                    delay = rng.uniform(0.0, timing.life(remaining))
                    invocation.wait_until(lambda: time.time() - invocation.started >= delay, INVOCATION_TIMEOUT,
                                          interval=0.005)
                elif mode == "steps":
                    target = rng.randint(resume_step + 1, TOTAL_STEPS)
                    invocation.wait_until(lambda: invocation.reached_step(target), INVOCATION_TIMEOUT)
                    time.sleep(rng.uniform(0.0, timing.per_step))
                elif mode == "startup":
                    delay = rng.uniform(0.0, 0.5 * timing.startup)  # surely before the first step
                    invocation.wait_until(lambda: time.time() - invocation.started >= delay
                                          or invocation.status() is not None, INVOCATION_TIMEOUT, interval=0.005)
                elif mode == "checkpoint":
                    # Let the run pass a random number of steps first, so kills hit different saves.
                    target = rng.randint(resume_step, max(resume_step, TOTAL_STEPS - SAVE_STEPS))
                    invocation.wait_until(lambda: invocation.reached_step(target), INVOCATION_TIMEOUT)
                    invocation.wait_until(invocation.saving_checkpoint, INVOCATION_TIMEOUT)
                    time.sleep(rng.choice(jitters))  # different points inside the save (long form)
                else:  # final
                    invocation.wait_until(invocation.saving_final, INVOCATION_TIMEOUT)
                    time.sleep(rng.choice(jitters))
                status = invocation.status()
                landed = invocation.kill()
                stats.trials += 1
                stats.modes[mode] += 1
                stats.landed[landed] += 1
                stats.kill_steps.append((status or {}).get("current_step"))
                _learn_timing(timing, invocation, resume_step)
                invocation.check_resume_point(stats)
                check_after_kill(output, landed)
            invocation = last = Invocation(job, output, folder / "final.log")
            stats.invocations += 1
            check_completed(output, last, reference_weights)
            _learn_timing(timing, last, last.expected[0] if last.expected else 0, wall=time.time() - last.started)
            last.check_resume_point(stats)
            stats.exact_weight_matches += 1
            stats.chains += 1
        assert stats.landed["checkpoint_save"] >= 1, f"no kill landed inside a checkpoint save: {stats.to_dict()}"
        assert stats.landed["final_save"] >= 1, f"no kill landed inside the final save: {stats.to_dict()}"
        assert stats.landed["startup"] >= 1, f"no kill landed during start-up: {stats.to_dict()}"
        assert stats.landed["resume"] >= 1, f"no kill landed during a resume: {stats.to_dict()}"
        stats.passed = True
    finally:
        if invocation is not None and invocation.process.poll() is None:  # a check failed mid-run
            os.killpg(invocation.process.pid, signal.SIGKILL)
            invocation.process.wait(timeout=60)
        stats.duration_sec = time.time() - started
        write_stats("kill_anywhere", stats.to_dict())


def _learn_timing(timing: Timing, invocation: Invocation, resume_step: int, wall: float | None = None) -> None:
    """Update the estimates from the steps this process logged (`wall`: its whole life, when it finished)."""
    records = [r for r in read_jsonl(invocation.output / "metrics.jsonl")
               if "loss" in r and r["step"] > resume_step and "elapsed_sec" in r]
    if len(records) >= 2:
        per_step = (records[-1]["elapsed_sec"] - records[0]["elapsed_sec"]) / (records[-1]["step"] - records[0]["step"])
        timing.per_step = max(0.005, per_step)
    result = read_json_if_present(invocation.output / "result.json") if wall is not None else None
    if records and result and result.get("runtime_sec"):
        runtime = result["runtime_sec"]
        timing.startup = max(1.0, wall - runtime + records[0]["elapsed_sec"] - timing.per_step)
        timing.tail = max(0.5, runtime - records[-1]["elapsed_sec"])


def test_the_long_form_draws_its_kill_chains():
    """The long form runs only before resolving an issue: draw its chains here, so that a mode added
    without its weight fails in every run, not in the long one."""
    for seed in range(20):
        chains = chains_for(True, random.Random(seed))
        assert sum(len(chain) for chain in chains) == LONG_TRIALS
        assert all(mode in MODES for chain in chains for mode in chain)
        assert all(chain[-1] == "final" for chain in chains[::2])
