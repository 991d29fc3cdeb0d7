"""The command line: exit codes 0/1/2 and one clear message (never a traceback) for a refused job."""

from __future__ import annotations

import json

import pytest

from helpers import EXPLODING, REPO, run_cli, run_launcher, small_job
from launcher.cli import main
from launcher.config import load_config

EXAMPLE_JOBS = sorted((REPO / "examples").glob("*.toml"))
# The small job, 2 steps.
SETTINGS = {"hyperparams.max_steps": 2}


def test_misspelled_key_exits_2_and_suggests_the_right_one(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS, **{"hyperparams.learnig_rate": 1e-4})
    code, out, err = run_cli(["run", job], capsys)
    assert code == 2
    assert "did you mean `learning_rate`?" in err and f"{job}:" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_bad_override_exits_2_naming_the_key_and_type(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS)
    code, _, err = run_cli(["validate", job, "--set", "hyperparams.batch_size=abc"], capsys)
    assert code == 2
    assert "hyperparams.batch_size" in err and "expected an integer" in err and '"abc"' in err


def test_unknown_override_key_is_refused_with_a_suggestion(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS)
    code, _, err = run_cli(["validate", job, "--set", "hyperparams.lerning_rate=1e-4"], capsys)
    assert code == 2 and "did you mean `learning_rate`?" in err


def test_missing_job_file_exits_2(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path / "nope.toml"], capsys)
    assert code == 2 and "job file not found" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "validate", "demo", "reference"):
        assert command in out


def test_bad_data_record_exits_2_naming_the_line(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'  # truncated JSON on line 3
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["run", job], capsys)
    assert code == 2
    assert "train.jsonl:3" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_validate_prints_the_data_report(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS)
    code, out, err = run_cli(["validate", job], capsys)
    assert code == 0, err
    assert "optimizer steps: 2" in out
    assert "the job is valid" in out
    assert not (tmp_path / "out").exists()  # validate writes nothing to the output folder


def test_run_exit_codes_for_success_and_failure(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS)
    code, out, _ = run_cli(["run", job], capsys)
    assert code == 0
    assert json.loads(out)["success"] is True
    exploding = [item for key, value in EXPLODING.items() for item in ("--set", f"{key}={value}")]
    code, _, err = run_cli(["run", job, *exploding, "--set", "hyperparams.max_steps=30", "--set",
                            "output.output_dir='out2'"], capsys)
    assert code == 1 and "non-finite" in err


def test_a_refused_job_prints_no_traceback_as_a_process(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir, **SETTINGS, **{"bogus.x": 1})
    process = run_launcher("run", job)
    assert process.returncode == 2
    assert "unknown section [bogus]" in process.stderr
    assert "Traceback" not in process.stderr


def test_reference_is_generated_from_the_config(capsys):
    code, out, _ = run_cli(["reference"], capsys)
    assert code == 0 and "### `[hyperparams]`" in out and "`learning_rate`" in out


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=[p.name for p in EXAMPLE_JOBS])
def test_every_example_job_validates(job, tiny_model_dir, capsys):
    config = load_config(job, overrides={"model.model_path": str(tiny_model_dir)})
    assert config.data.dataset_path
    code, out, err = run_cli(["validate", job, "--set", f"model.model_path='{tiny_model_dir}'"], capsys)
    assert code == 0, err


def test_the_readme_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    opening = readme[:600]
    assert "make demo" in opening and "make test" in opening
    assert "make test" in (REPO / ".ci" / "run").read_text()
