"""The command line: exit codes 0/1/2 and one clear message (never a traceback) for a refused job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import load_config
from launcher.demo import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_JOBS = sorted((REPO / "examples").glob("*.toml"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_job(folder: Path, model_dir: Path, extra: str = "", records: list | None = None) -> Path:
    records = records if records is not None else [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    job = folder / "job.toml"
    job.write_text(f"""
[model]
model_path = "{model_dir}"
[data]
dataset_path = "train.jsonl"
max_length = 128
cache_dir = "cache"
[hyperparams]
max_steps = 2
fp_precision = "fp32"
save_steps = 0
[output]
output_dir = "out"
{extra}
""")
    return job


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_misspelled_key_exits_2_and_suggests_the_right_one(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
    job.write_text(job.read_text().replace("max_steps = 2", "learnig_rate = 1e-4"))
    code, out, err = run_cli(["run", job], capsys)
    assert code == 2
    assert "did you mean `learning_rate`?" in err and f"{job}:" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_bad_override_exits_2_naming_the_key_and_type(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
    code, _, err = run_cli(["validate", job, "--set", "hyperparams.batch_size=abc"], capsys)
    assert code == 2
    assert "hyperparams.batch_size" in err and "expected an integer" in err and '"abc"' in err


def test_unknown_override_key_is_refused_with_a_suggestion(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
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


def test_bad_data_record_exits_2_naming_the_line(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'  # truncated JSON on line 3
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["run", job], capsys)
    assert code == 2
    assert "train.jsonl:3" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists()


def test_validate_prints_the_data_report(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
    code, out, err = run_cli(["validate", job], capsys)
    assert code == 0, err
    assert "optimizer steps: 2" in out
    assert "the job is valid" in out
    assert not (tmp_path / "out").exists()  # validate writes nothing to the output folder


def test_run_exit_codes_for_success_and_failure(tmp_path, model_dir, capsys):
    job = write_job(tmp_path, model_dir)
    code, out, _ = run_cli(["run", job], capsys)
    assert code == 0
    assert json.loads(out)["success"] is True
    code, _, err = run_cli(["run", job, "--set", "hyperparams.learning_rate=1e30", "--set", "hyperparams.max_steps=30",
                            "--set", "hyperparams.max_grad_norm=0", "--set", "output.output_dir='out2'"], capsys)
    assert code == 1 and "non-finite" in err


def test_a_refused_job_prints_no_traceback_as_a_process(tmp_path, model_dir):
    job = write_job(tmp_path, model_dir, extra="[bogus]\nx = 1\n")
    process = subprocess.run([sys.executable, "-m", "launcher", "run", str(job)], cwd=REPO,
                             capture_output=True, text=True)
    assert process.returncode == 2
    assert "unknown section [bogus]" in process.stderr
    assert "Traceback" not in process.stderr


def test_reference_is_generated_from_the_config(capsys):
    code, out, _ = run_cli(["reference"], capsys)
    assert code == 0 and "### `[hyperparams]`" in out and "`learning_rate`" in out


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=[p.name for p in EXAMPLE_JOBS])
def test_every_example_job_validates(job, model_dir, capsys):
    config = load_config(job, overrides={"model.model_path": str(model_dir)})
    assert config.data.dataset_path
    code, out, err = run_cli(["validate", job, "--set", f"model.model_path='{model_dir}'"], capsys)
    assert code == 0, err


def test_the_readme_opens_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    opening = readme[:600]
    assert "make demo" in opening and "make test" in opening
    assert "make test" in (REPO / ".ci" / "run").read_text()
