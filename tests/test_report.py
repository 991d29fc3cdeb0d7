"""The status summary and the run report, on run folders fabricated with the contract's file formats.

    .venv/bin/pytest tests/test_report.py -q
"""

from __future__ import annotations

import builtins
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, write_jsonl
from launcher.config import ConfigError, JobConfig
from launcher.report import format_duration, main_report, main_status, status_text, write_report

PREVIEW = {"step": 30, "samples": [{"prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                              "<|im_start|>assistant\n",
                                    "completion": "The capital of France is Paris."}]}


def make_run(root: Path, *, state: str = "completed", total_steps: int = 30, timestamp: float | None = None,
             error: str | None = None, with_result: bool | None = None) -> Path:
    """An output folder as the loop leaves it: 30 steps, logging every 10, eval every 15, saves every 10."""
    out = root / "run"
    out.mkdir(parents=True)
    job = JobConfig()
    job.model.model_path, job.data.dataset_path, job.output.output_dir = "/models/tiny", "/data/chat.jsonl", str(out)
    job.hyperparams.batch_size, job.hyperparams.gradient_accumulation = 2, 4
    job.hyperparams.learning_rate = 1e-4
    (out / "job.toml").write_text(job.to_toml())

    done = total_steps if state == "completed" else 20
    records = []
    for step in range(10, done + 1, 10):
        records.append({"step": step, "epoch": step / 30, "loss": 3.0 - step / 20,
                        "learning_rate": 1e-4 * (1 - step / 40), "grad_norm": 1.5, "num_tokens": step * 1000, "tokens_per_sec": 2500.0,
                        "input_tokens_per_sec": 4000.0, "elapsed_sec": step * 0.4})
        if step % 15 == 0 or step == 20:
            records.append({"step": step, "eval_loss": 2.9 - step / 25})
    write_jsonl(out / "metrics.jsonl", records)

    for step in range(10, done + 1, 10):
        checkpoint = out / "checkpoints" / f"step_{step:06d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "progress.json").write_text(json.dumps({"progress": {"step": step, "epoch": 0}}))
        (checkpoint / "COMPLETE").write_text("")
    # A checkpoint being written when the status was read: not complete, never reported.
    (out / "checkpoints" / f"step_{done + 10:06d}").mkdir()

    status = {"status": state, "current_step": done, "total_steps": total_steps, "epoch": done / 30,
              "loss": records[-2 if "eval_loss" in records[-1] else -1]["loss"], "learning_rate": 5e-5,
              "tokens_per_sec": 2500.0, "eta_sec": 192.0 if state == "running" else 0.0, "validation_loss": 2.1,
              "timestamp": time.time() if timestamp is None else timestamp,
              "error_message": error, "preview": PREVIEW}
    (out / "status.json").write_text(json.dumps(status, indent=2))

    if with_result if with_result is not None else state != "running":
        (out / "final").mkdir()
        result = {"success": state == "completed", "global_step": done, "runtime_sec": 754.2,
                  "last_checkpoint_path": str(out / "checkpoints" / f"step_{done:06d}"), "final_loss": 1.5,
                  "summary": {"train_loss": 1.5, "eval_loss": 1.7, "num_train_tokens": 30000, "tokens_per_sec": 2480.0,
                              "world_size": 2, "peak_memory_bytes": 1 << 30, "total_steps": total_steps},
                  "error": error}
        (out / "result.json").write_text(json.dumps(result, indent=2))
    return out


# --- status ------------------------------------------------------------------------------------

def test_status_of_a_completed_run(tmp_path):
    text = status_text(make_run(tmp_path))
    assert "state: completed" in text
    assert "step: 30 / 30 (100%)" in text
    assert "loss: 1.5000" in text and "eval loss: 2.1000" in text
    assert "runtime: 12m34s" in text and "ETA" not in text
    assert "last checkpoint: step 30 (" in text and "step_000030" in text
    assert "final model:" in text
    assert "The capital of France is Paris." in text and "sample generations at step 30" in text
    assert "error" not in text


def test_status_of_a_running_run(tmp_path):
    out = make_run(tmp_path, state="running", total_steps=40)
    # An earlier attempt's failure must not be reported as the state of the resumed run.
    (out / "result.json").write_text(json.dumps({"success": False, "error": "killed earlier", "final_loss": 9.0}))
    text = status_text(out)
    assert "state: running (updated " in text
    assert "step: 20 / 40 (50%)" in text
    assert "ETA: 3m12s" in text
    assert "tokens/s: 2,500" in text
    assert "last checkpoint: step 20" in text
    assert "killed earlier" not in text and "9.0" not in text


def test_a_silent_running_run_is_shown_as_stalled(tmp_path):
    text = status_text(make_run(tmp_path, state="running", timestamp=time.time() - 1200))
    assert "running (no update for 20m00s: stalled or killed?)" in text
    assert "ETA" not in text  # a stalled run will not finish on schedule


def test_a_failed_run_shows_its_error(tmp_path):
    error = "NonFiniteError: non-finite loss at step 21"
    text = status_text(make_run(tmp_path, state="failed", error=error))
    assert "state: failed" in text and f"error: {error}" in text


def test_the_error_comes_from_result_json_when_there_is_no_status(tmp_path):
    out = make_run(tmp_path, state="failed", error="RuntimeError: out of memory")
    (out / "status.json").unlink()
    text = status_text(out)
    assert "state: failed" in text and "error: RuntimeError: out of memory" in text


def test_torn_metrics_null_and_nan_values_are_tolerated(tmp_path):
    out = make_run(tmp_path, state="running")
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 30, "loss": 1.2, "learn')  # killed mid-write
    status = json.loads((out / "status.json").read_text())
    status.update(loss=None, validation_loss=float("nan"), tokens_per_sec=None, eta_sec=float("inf"),
                  learning_rate="garbage", preview={"step": None, "samples": []})
    (out / "status.json").write_text(json.dumps(status))  # json writes NaN and Infinity literals
    text = status_text(out)
    assert "loss: 2.0000" in text  # null in status: the last complete metrics record
    assert "eval loss: nan" in text and "ETA: n/a" in text and "lr: garbage" in text
    assert "tokens/s: 2,500" in text


def test_an_empty_folder_holds_no_run(tmp_path, capsys):
    """`status` on a folder no run has written into exits 2 saying so, rather than "not started"."""
    from launcher.cli import main

    (tmp_path / "run").mkdir()
    assert main(["status", str(tmp_path / "run")]) == 2
    assert "holds no run of this project" in capsys.readouterr().err


def test_a_missing_folder_or_a_foreign_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such folder"):
        status_text(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="holds no run of this project"):
        status_text(tmp_path)
    with pytest.raises(ConfigError, match="is a file"):
        status_text(tmp_path / "notes.txt")


def test_a_job_file_stands_for_its_output_folder(tmp_path):
    out = make_run(tmp_path)
    assert "state: completed" in status_text(out / "job.toml")


def test_main_status_exit_codes(tmp_path, capsys):
    assert main_status(make_run(tmp_path)) == 0
    assert "state: completed" in capsys.readouterr().out
    assert main_status(tmp_path / "nope") == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err and not captured.out


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (45.4, "45s"), (192, "3m12s"), (3600 * 2 + 300, "2h05m"),
                                           (86400 + 3 * 3600, "1d03h"), (None, "n/a"), (math.nan, "n/a"),
                                           (math.inf, "n/a"), (-5, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


# --- report ------------------------------------------------------------------------------------

def test_write_report_writes_markdown_and_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path)
    paths = write_report(out)
    assert paths == [out / "report.md", out / "loss.png"]
    report = (out / "report.md").read_text()
    for expected in ("| outcome | completed |", "| model | /models/tiny |", "| data | /data/chat.jsonl |",
                     "| batch | 2 x 4 accumulation x 2 process(es) |", "| learning rate | 0.0001 (cosine, warmup 0) |",
                     "| steps | 30 / 30 |", "| final train loss | 1.5000 |",
                     "| eval loss | best 1.7000 (step 30), last 1.7000 (step 30) |", "| tokens trained | 30,000 |",
                     "| runtime | 12m34s |", "step 30 (`checkpoints/step_000030`)", "![", "(loss.png)",
                     "The capital of France is Paris."):
        assert expected in report, expected
    png = (out / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = make_run(tmp_path, state="failed", error="ValueError: boom")
    assert write_report(out) == [out / "report.md"]
    report = (out / "report.md").read_text()
    assert "matplotlib is not installed" in report and "| outcome | failed: ValueError: boom |" in report
    assert not (out / "loss.png").exists()


def test_report_of_a_run_without_result_or_job(tmp_path):
    out = make_run(tmp_path, state="running")
    (out / "job.toml").unlink()
    report = (out / "report.md")
    write_report(out)
    text = report.read_text()
    assert "| outcome | running |" in text and "| steps | 20 / 30 |" in text and "| model | n/a |" in text
    assert "| final train loss | 2.0000 |" in text  # from metrics.jsonl


def test_main_report_exit_codes(tmp_path, capsys):
    assert main_report(make_run(tmp_path)) == 0
    assert "report.md" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main_report(tmp_path / "empty") == 2
    assert "holds no run of this project" in capsys.readouterr().err


def test_pyplot_is_never_imported(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path)
    code = ("import sys; import launcher.report as r; assert 'matplotlib' not in sys.modules; "
            f"r.write_report({str(out)!r}); assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
