"""What a hostile tester found (issue #14), each reproduced as it was done and now refused or survived.

    pytest tests/reliability/test_hostile.py -q

Defects covered here: code run from a checkpoint pickle (1), a user's folder as output_dir (2),
`overwrite` mixing two runs (3), resume silently accepting changed data or settings (6), an unusable
output_dir found late (10), a corrupt newest checkpoint or a foreign one (11), a rerun wiping a
finished run's loss (14), and signals during start-up, Ctrl-C without a traceback. The lock race
and pid reuse (4, 5) are in tests/test_run_dir.py.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from launcher.cli import main
from loop.checkpoint import COMPLETE_MARKER, PROGRESS_FILE
from loop.run_dir import MARKER

from .reliability_helpers import REPO, launcher_command, read_json_if_present, small_job, snapshot, subprocess_env


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def checkpoint(output: Path, step: int) -> Path:
    return output / "checkpoints" / f"step_{step:06d}"


def interrupted_run(tmp_path, model_dir, capsys, **overrides) -> tuple[Path, Path]:
    """A 4-step run with checkpoints at 2 and 4 that "died" after its last checkpoint (no result, no final)."""
    job = small_job(tmp_path, model_dir, **{"hyperparams.save_steps": 2, "hyperparams.save_total_limit": 5,
                                            **overrides})
    code, text = run_cli(["run", job], capsys)
    assert code == 0, text[-2000:]
    output = tmp_path / "out"
    (output / "result.json").unlink()
    shutil.rmtree(output / "final")
    return job, output


def reseal(folder: Path) -> None:
    """Rewrite a checkpoint's COMPLETE marker to match its files, as an attacker who read the code would."""
    from loop.checkpoint import _file_sizes

    (folder / COMPLETE_MARKER).write_text(json.dumps({"files": _file_sizes(folder)}))


class Payload:
    """Unpickling this creates `path`: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# --- 1. code from a checkpoint pickle --------------------------------------------------------------

@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_pickle_planted_in_a_checkpoint_never_runs(tmp_path, tiny_model_dir, capsys, planted):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    sentinel = tmp_path / "pwned"
    newest = checkpoint(output, 4)
    if planted.startswith("custom"):
        (newest / planted).write_bytes(pickle.dumps(Payload(sentinel)))
    else:
        torch.save({"python": Payload(sentinel)}, newest / planted)  # a torch file with a payload inside
    reseal(newest)

    # Named explicitly: refused with its path.
    code, text = run_cli(["run", job, "--set", f"output.resume={newest}"], capsys)
    assert code == 2 and str(newest / planted) in text and "Traceback" not in text, text[-2000:]
    assert not sentinel.exists()
    # Found by "auto": passed over with a warning for the checkpoint before it, which resumes.
    code, text = run_cli(["run", job], capsys)
    assert code == 0, text[-2000:]
    assert not sentinel.exists(), "the planted pickle ran"
    result = read_json_if_present(output / "result.json")
    assert result["summary"]["resumed_from"] == str(checkpoint(output, 2)) and result["global_step"] == 4


def test_checkpoints_hold_no_pickle_of_ours(tmp_path, tiny_model_dir, capsys):
    """The scheduler's state is JSON in progress.json; no custom pickle is written at all."""
    _, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    names = {p.name for p in checkpoint(output, 4).iterdir()}
    assert not any(name.startswith("custom_checkpoint") for name in names), names
    record = json.loads((checkpoint(output, 4) / PROGRESS_FILE).read_text())
    assert record["scheduler"]["last_epoch"] == 4


# --- 2. a user's folder ----------------------------------------------------------------------------

def test_a_folder_of_the_users_files_is_never_written_into(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **{"output.output_dir": "."})
    (tmp_path / "report.md").write_text("my report")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "my_weights.bin").write_bytes(b"precious")
    before = snapshot(tmp_path)
    code, text = run_cli(["run", job], capsys)
    assert code == 2 and "not a run of this project" in text and "Traceback" not in text, text[-2000:]
    assert snapshot(tmp_path) == before


# --- 3. overwrite ----------------------------------------------------------------------------------

def test_overwrite_leaves_no_checkpoint_of_the_replaced_run(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.save_steps": 2, "hyperparams.save_total_limit": 5})
    assert run_cli(["run", job], capsys)[0] == 0
    output = tmp_path / "out"
    old_run = json.loads((output / MARKER).read_text())["run_id"]
    fresh = ["--set", "output.resume=never", "--set", "output.overwrite=true", "--set", "hyperparams.max_steps=2",
             "--set", "hyperparams.save_steps=1", "--set", "hyperparams.save_total_limit=1"]
    code, text = run_cli(["run", job, *fresh], capsys)
    assert code == 0, text[-2000:]
    new_run = json.loads((output / MARKER).read_text())["run_id"]
    assert new_run != old_run
    left = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert left == ["step_000002"], left  # the old run's step_000004 is gone; retention kept the newest
    assert json.loads((checkpoint(output, 2) / PROGRESS_FILE).read_text())["run_id"] == new_run
    # A later "auto" continues the new run, never the old one's weights.
    more = ["--set", "hyperparams.max_steps=3", "--set", "hyperparams.save_steps=1", "--set",
            "hyperparams.save_total_limit=1", "--set", "output.resume_changes=allow"]
    code, text = run_cli(["run", job, *more], capsys)
    assert code == 0, text[-2000:]
    result = read_json_if_present(output / "result.json")
    assert result["summary"]["resumed_from"] == str(checkpoint(output, 2)) and result["global_step"] == 3


# --- 6. changed inputs on resume -----------------------------------------------------------------

def test_resume_refuses_changed_data_with_the_same_record_count(tmp_path, tiny_model_dir, capsys):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][-1]["content"] += " (edited)"
    (tmp_path / "train.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    before = snapshot(output)
    code, text = run_cli(["run", job], capsys)
    assert code == 2 and "training data changed" in text and "Traceback" not in text, text[-2000:]
    assert snapshot(output) == before


def test_resume_refuses_a_changed_learning_rate_naming_both_values(tmp_path, tiny_model_dir, capsys):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    shutil.rmtree(checkpoint(output, 4))
    before = snapshot(output)
    code, text = run_cli(["run", job, "--set", "hyperparams.learning_rate=0.1"], capsys)
    assert code == 2, text[-2000:]
    assert "hyperparams.learning_rate: 0.001 in the checkpoint, 0.1 now" in text
    assert 'output.resume_changes = "allow"' in text
    assert snapshot(output) == before


def test_an_allowed_learning_rate_change_applies_from_the_resumed_step(tmp_path, tiny_model_dir, capsys):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys, **{"hyperparams.lr_scheduler": "constant"})
    shutil.rmtree(checkpoint(output, 4))
    code, text = run_cli(["run", job, "--set", "hyperparams.learning_rate=0.1", "--set",
                          "output.resume_changes=allow"], capsys)
    assert code == 0, text[-2000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in records if "loss" in r}
    assert rates == {1: 0.001, 2: 0.001, 3: 0.1, 4: 0.1}
    change = [r for r in records if "resume_changes" in r]
    assert change == [{"step": 2, "resume_changes": {"hyperparams.learning_rate": {"checkpoint": 0.001, "now": 0.1}}}]
    assert "learning_rate = 0.1" in (output / "job.toml").read_text()
    # The optimizer took the new rate, not the checkpoint's: a step at 0.1 moves the weights ~100x more.
    state = torch.load(checkpoint(output, 4) / "optimizer.bin", weights_only=True)
    assert {group["lr"] for group in state["param_groups"]} == {0.1}


def test_lowering_max_steps_below_the_newest_checkpoint_is_refused(tmp_path, tiny_model_dir, capsys):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    code, text = run_cli(["run", job, "--set", "hyperparams.max_steps=3", "--set", "output.resume_changes=allow"],
                         capsys)
    assert code == 2 and "at step 4, beyond this job's 3 optimizer steps" in text, text[-2000:]


# --- 10. an unusable output_dir is found first ------------------------------------------------------

@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_an_unusable_output_dir_is_refused_before_anything_loads(tmp_path, capsys, where):
    (tmp_path / "taken").write_text("a file")
    output = "taken" if where == "a-file" else "taken/out"
    # The model does not exist either: the output folder is checked first, before any loading.
    job = small_job(tmp_path, tmp_path / "no-such-model", **{"output.output_dir": output})
    code, text = run_cli(["run", job], capsys)
    assert code == 2 and "output.output_dir" in text and "no-such-model" not in text, text[-2000:]
    assert (tmp_path / "taken").read_text() == "a file"


# --- 11. corrupt and foreign checkpoints -----------------------------------------------------------

def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, tiny_model_dir, capsys, caplog):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    weights = checkpoint(output, 4) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, text = run_cli(["run", job], capsys)
    assert code == 0, text[-2000:]
    assert read_json_if_present(output / "result.json")["summary"]["resumed_from"] == str(checkpoint(output, 2))
    assert f"{weights} should have" in caplog.text  # the warning names the file


def test_bytes_changed_in_place_are_caught_when_the_checkpoint_fails_to_load(tmp_path, tiny_model_dir, capsys):
    job, output = interrupted_run(tmp_path, tiny_model_dir, capsys)
    weights = checkpoint(output, 4) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10 ** 12).to_bytes(8, "little")  # a header length that cannot be: same size, unloadable
    weights.write_bytes(bytes(data))
    code, text = run_cli(["run", job, "--set", f"output.resume={checkpoint(output, 4)}"], capsys)
    assert code == 2 and str(checkpoint(output, 4)) in text and "does not load" in text, text[-2000:]
    assert "Traceback" not in text and len(text.splitlines()) < 60


def test_a_checkpoint_of_another_kind_of_job_is_refused_in_a_few_lines(tmp_path, tiny_model_dir, capsys):
    """A full-model checkpoint given to a LoRA job: named, with what differs, not hundreds of keys."""
    _, output = interrupted_run(tmp_path / "full", tiny_model_dir, capsys)
    lora = small_job(tmp_path / "lora", tiny_model_dir, **{"lora.enabled": True,
                                                            "output.resume": str(checkpoint(output, 2))})
    code, text = run_cli(["run", lora], capsys)
    assert code == 2 and str(checkpoint(output, 2)) in text and "lora.enabled" in text, text[-2000:]
    assert "Traceback" not in text and len(text.splitlines()) < 60


# --- 14. rerunning a finished job ------------------------------------------------------------------

def test_rerunning_a_finished_job_changes_nothing(tmp_path, tiny_model_dir, capsys, caplog):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.save_steps": 2})
    assert run_cli(["run", job], capsys)[0] == 0
    output = tmp_path / "out"
    result = read_json_if_present(output / "result.json")
    assert result["final_loss"] is not None and result["summary"]["train_loss"] is not None
    before = snapshot(output)
    code, text = run_cli(["run", job], capsys)
    assert code == 0 and "completed run" in caplog.text and '"final_loss": null' not in text, text[-2000:]
    assert snapshot(output) == before


# --- 13. a custom profile next to the job file, with two processes ---------------------------------

@pytest.mark.slow
def test_a_profile_next_to_the_job_file_is_found_with_two_processes(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "my_profiles.py").write_text(
        "from profiles import ChatProfile\n\n"
        "class Shouting(ChatProfile):\n"
        "    def messages(self, example, index):\n"
        "        return [{**m, 'content': m['content'].upper()} for m in super().messages(example, index)]\n")
    job = small_job(tmp_path, tiny_model_dir, **{"profile.name": "my_profiles:Shouting",
                                                  "launch.num_processes": 2, "hyperparams.max_steps": 2})
    code, text = run_cli(["run", job], capsys)
    assert code == 0, text[-3000:]
    result = read_json_if_present(tmp_path / "out" / "result.json")
    assert result["success"] and result["summary"]["world_size"] == 2


# --- signals ---------------------------------------------------------------------------------------

def _start(job: Path) -> subprocess.Popen:
    # SIGINT back to its default: a shell starts background jobs (`pytest ... &`) with it ignored, an
    # ignored signal stays ignored across exec, and Python then never raises KeyboardInterrupt.
    return subprocess.Popen(launcher_command("run", job), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_sigterm_while_loading_stops_with_exit_3_and_no_running_status(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.max_steps": 50})
    process = _start(job)
    time.sleep(1.0)  # importing torch and transformers: long before the first step
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    status = read_json_if_present(tmp_path / "out" / "status.json")
    if process.returncode == -signal.SIGTERM:  # still inside Python's start-up, before our handler
        assert status is None
        return
    assert process.returncode == 3, err[-3000:]
    assert status["status"] == "preempted" and "before the first step" in status["error_message"]
    assert "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_mid_run_prints_no_traceback(tmp_path, tiny_model_dir):
    # Far more steps than can run before the signal lands (status.json says the step at every step).
    job = small_job(tmp_path, tiny_model_dir, **{"hyperparams.max_steps": 100_000, "hyperparams.save_steps": 0})
    process = _start(job)
    status_file = tmp_path / "out" / "status.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        status = read_json_if_present(status_file) if status_file.exists() else None
        if status and (status.get("current_step") or 0) >= 2:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err
    assert read_json_if_present(status_file)["status"] == "failed"
