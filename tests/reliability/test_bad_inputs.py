"""The bad-input catalogue: every way a job can be wrong ends in exit 2 and one message that says what to change.

    pytest tests/reliability/test_bad_inputs.py -q

Each case writes a job (or a data file, tokenizer, Accelerate config, override) that is wrong in one
way and runs the CLI: most in process through `launcher.cli.main` (fast), a few as real
`python -m launcher` subprocesses. Each must exit 2 within seconds, print a message holding the
case's substrings (the key, the file and line or record, and what to change), print no traceback,
and leave the output folder as it was: absent, or, for cases that start from an earlier run's
folder (a sentinel file, result.json and status.json), byte for byte unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers import SMALL_JOB, chat_records, run_launcher, snapshot, write_job, write_jsonl
from launcher.cli import main

IN_PROCESS_LIMIT_SEC = 30    # "within seconds", with room for 2 busy cores
SUBPROCESS_LIMIT_SEC = 120   # start-up of torch and transformers included
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


CHAT = chat_records(12)


class Ctx:
    """The case's folder: `job()` writes data and a valid job with overrides; the rest break one thing."""

    def __init__(self, folder: Path, model_dir: Path):
        self.folder, self.model_dir = folder, model_dir
        self.path = folder / "job.toml"

    def job(self, records=None, **overrides) -> Path:
        """A small valid job with `overrides` (`section__key=value`; None removes the key), reading `records`
        (bytes are written as they are), else the data already there, else CHAT."""
        if isinstance(records, bytes):
            self.data(records)
            records = None
        elif records is None and not (self.folder / "train.jsonl").exists():
            records = CHAT
        return write_job(self.folder, self.model_dir, records, **{**SMALL_JOB, **overrides})

    def raw(self, text: str) -> Path:
        """A job whose text is given; `{model}` is the tiny model's folder."""
        self.data(CHAT)
        self.path.write_text(text.replace("{model}", str(self.model_dir)), encoding="utf-8")
        return self.path

    def data(self, records, name: str = "train.jsonl") -> Path:
        path = self.folder / name
        if isinstance(records, bytes):
            path.write_bytes(records)
        else:
            write_jsonl(path, records)
        return path

    def accelerate(self, text: str) -> str:
        (self.folder / "launch.yaml").write_text(text, encoding="utf-8")
        return "launch.yaml"

    def line_of(self, needle: str) -> int:
        return next(n for n, line in enumerate(self.path.read_text().splitlines(), 1) if needle in line)


@dataclass
class Case:
    id: str
    build: Callable[[Ctx], list]
    """Writes the case's files; returns the CLI arguments after `python -m launcher`."""
    expect: Callable[[Ctx], list] | list
    """Substrings the message must hold (a function of the folder for paths and line numbers); a tuple
    item is satisfied by any one of its strings."""
    existing: bool = False
    """Start from an earlier run's output folder (sentinel, result.json, status.json) that must stay as it was."""
    process: bool = False
    """Run `python -m launcher` as a real subprocess."""
    marks: tuple = ()
    setup: Callable | None = field(default=None)
    """Called with (ctx, monkeypatch) before the run (in-process cases only)."""


def run(job: Path, *extra) -> list:
    return ["run", job, *extra]


def validate(job: Path, *extra) -> list:
    return ["validate", job, *extra]


def no_template_tokenizer(ctx: Ctx) -> str:
    """A copy of the tiny model's tokenizer with its chat template removed."""
    folder = ctx.folder / "plain-tokenizer"
    folder.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (ctx.model_dir / name).exists():
            shutil.copy(ctx.model_dir / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def fake_checkpoint(ctx: Ctx) -> None:
    """An earlier run's complete checkpoint in the output folder."""
    path = ctx.folder / "out" / "checkpoints" / "step_000002"
    path.mkdir(parents=True)
    (path / "progress.json").write_text(json.dumps({"progress": {"step": 2}, "shape": {}}))
    (path / "COMPLETE").write_text("")


def deny_reading(path_of: Callable[[Ctx], Path]):
    """Simulate EACCES on one file (root reads any file whatever its mode, so chmod 000 cannot)."""
    import builtins
    import io

    def setup(ctx: Ctx, monkeypatch) -> None:
        target = str(path_of(ctx).resolve())
        real_open, real_io_open = builtins.open, io.open

        def guarded(opener):
            def open_(file, *args, **kwargs):
                if isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()) == target:
                    raise PermissionError(13, "Permission denied", str(file))
                return opener(file, *args, **kwargs)
            return open_

        monkeypatch.setattr(builtins, "open", guarded(real_open))
        monkeypatch.setattr(io, "open", guarded(real_io_open))

    return setup


def chmod_000(path_of: Callable[[Ctx], Path]):
    def setup(ctx: Ctx, monkeypatch) -> None:
        path_of(ctx).chmod(0)
    return setup


# --- the catalogue -----------------------------------------------------------------------------------

CASES = [
    # TOML syntax: the parser's own position, in the job file.
    Case("toml-unclosed-string", lambda c: run(c.raw('[model]\nmodel_path = "{model}\n')),
         lambda c: [f"{c.path}: invalid TOML", "line 2", "Check quoting"], process=True),
    Case("toml-missing-equals", lambda c: run(c.raw('[model]\nmodel_path = "{model}"\n[hyperparams]\nbatch_size 2\n')),
         lambda c: [f"{c.path}: invalid TOML", "line 4"]),
    Case("toml-duplicate-key", lambda c: run(c.raw('[model]\nmodel_path = "{model}"\nmodel_path = "x"\n')),
         lambda c: [f"{c.path}: invalid TOML", "line 3"]),
    Case("toml-unclosed-table", lambda c: run(c.raw('[model\nmodel_path = "{model}"\n')),
         lambda c: [f"{c.path}: invalid TOML", "line 1"]),
    Case("toml-not-utf8", lambda c: (c.path.write_bytes(b'[model]\nmodel_path = "\xff\xfe"\n'), run(c.path))[1],
         lambda c: [f"{c.path}: cannot read the job file"]),

    # Unknown and misspelled keys and sections: named with file and line, closest valid key suggested.
    Case("misspelled-key", lambda c: run(c.job(hyperparams__learnig_rate=1e-4)),
         lambda c: [f"{c.path}:{c.line_of('learnig_rate')}: hyperparams.learnig_rate", "unknown key `learnig_rate`",
                    "did you mean `learning_rate`?"], process=True),
    Case("unknown-section", lambda c: run(c.job(hyperparameters__batch_size=2)),
         lambda c: [f"{c.path}:{c.line_of('[hyperparameters]')}", "unknown section [hyperparameters]",
                    "did you mean `hyperparams`?"]),
    Case("misspelled-required-key", lambda c: run(c.job(data__dataset_path=None, data__datset_path="train.jsonl")),
         ["unknown key `datset_path`", "did you mean `dataset_path`?", "data.dataset_path: required"]),
    Case("unknown-key-no-close-match", lambda c: run(c.job(model__frobnicate=1)),
         ["model.frobnicate", "unknown key `frobnicate` in [model]", "valid keys:", "`model_path`"]),
    Case("section-is-not-a-table", lambda c: run(c.raw('hyperparams = 3\n[model]\nmodel_path = "{model}"\n')),
         ["expected a [hyperparams] table"]),
    Case("missing-required-keys", lambda c: run(c.raw('[model]\nmodel_path = "{model}"\n')),
         ["data.dataset_path: required", "output.output_dir: required", "2 problems"]),

    # Wrong types and ranges.
    Case("type-int-given-string", lambda c: run(c.job(hyperparams__batch_size="two")),
         lambda c: [f"{c.path}:{c.line_of('batch_size')}: hyperparams.batch_size", "expected an integer", '"two"']),
    Case("range-batch-size-zero", lambda c: run(c.job(hyperparams__batch_size=0)),
         ["hyperparams.batch_size", "must be >= 1", "got 0"]),
    Case("range-negative-learning-rate", lambda c: run(c.job(hyperparams__learning_rate=-1e-4)),
         ["hyperparams.learning_rate", "must be > 0"]),
    Case("range-nan-learning-rate", lambda c: run(c.job(hyperparams__learning_rate=float("nan"))),
         ["hyperparams.learning_rate", "must be a finite number"]),
    Case("enum-precision", lambda c: run(c.job(hyperparams__fp_precision="fp8")),
         ["hyperparams.fp_precision", 'one of "bf16", "fp16", "fp32"', '"fp8"']),
    Case("enum-scheduler-typo", lambda c: run(c.job(hyperparams__lr_scheduler="cosin")),
         ["hyperparams.lr_scheduler", '"cosine"', '"cosin"']),
    Case("list-betas-length", lambda c: run(c.job(hyperparams__adam_betas=[0.9])),
         ["hyperparams.adam_betas", "expected two numbers in [0, 1)"]),
    Case("range-validation-split", lambda c: run(c.job(monitoring__validation_split=1.5)),
         ["monitoring.validation_split", "must be >= 0 and < 1"]),
    Case("type-bool-given-string", lambda c: run(c.job(data__packing="yes")),
         ["data.packing", "expected true or false", '"yes"']),
    Case("range-max-length", lambda c: run(c.job(data__max_length=4)), ["data.max_length", "must be >= 8"]),
    Case("type-list-given-string", lambda c: run(c.job(environment__report_to="tensorboard")),
         ["environment.report_to", "expected a list of strings"]),
    Case("no-steps-and-no-epochs", lambda c: run(c.job(hyperparams__max_steps=-1, hyperparams__num_epochs=0)),
         ["hyperparams.num_epochs", "num_epochs must be > 0"]),

    # Missing and unreadable files.
    Case("job-file-missing", lambda c: ["run", c.folder / "nope.toml"], lambda c: [f"{c.folder / 'nope.toml'}",
                                                                                 "job file not found"]),
    Case("job-file-is-a-directory", lambda c: (c.path.mkdir(), ["run", c.path])[1],
         lambda c: [f"{c.path}: cannot read the job file"]),
    Case("data-file-missing", lambda c: run(c.job(data__dataset_path="missing.jsonl")),
         lambda c: [f"{c.path}:{c.line_of('missing.jsonl')}: data.dataset_path", "file not found",
                    str(c.folder / "missing.jsonl")], process=True),
    Case("data-file-is-a-directory", lambda c: ((c.folder / "dir.jsonl").mkdir(), run(c.job(data__dataset_path="dir.jsonl")))[1],
         lambda c: ["data.dataset_path", "file not found", str(c.folder / "dir.jsonl")]),
    Case("data-file-unreadable-simulated", lambda c: run(c.job()),
         lambda c: ["data.dataset_path", str(c.folder / "train.jsonl"), "Permission denied"], existing=True,
         setup=deny_reading(lambda c: c.folder / "train.jsonl")),
    Case("data-file-chmod-000", lambda c: run(c.job()),
         lambda c: ["data.dataset_path", str(c.folder / "train.jsonl"), "Permission denied"],
         setup=chmod_000(lambda c: c.folder / "train.jsonl"),
         marks=(pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file; see the simulated variant"),)),
    Case("validation-file-missing", lambda c: run(c.job(data__validation_path="valid.jsonl")),
         ["data.validation_path", "file not found"]),
    # The message must say the folder does not exist (today the tokenizer loader reports the hub's
    # "Repo id must be in the form ..." instead; loop/model.py has the right message for the model).
    Case("model-folder-missing", lambda c: run(c.job(model__model_path="no-such-model")),
         lambda c: ["model.model_path", str(c.folder / "no-such-model"),
                    ("no such local folder", "does not exist", "not found")], existing=True),
    Case("model-folder-empty", lambda c: ((c.folder / "empty-model").mkdir(), run(c.job(model__model_path="empty-model")))[1],
         lambda c: ["model.model_path", str(c.folder / "empty-model")], existing=True),
    Case("chat-template-file-missing", lambda c: run(c.job(data__chat_template="template.jinja")),
         ["data.chat_template", "file not found", "chatml"]),
    Case("accelerate-config-missing", lambda c: run(c.job(launch__accelerate_config="nope.yaml")),
         ["launch.accelerate_config", "file not found"]),
    Case("resume-path-missing", lambda c: run(c.job(output__resume="checkpoints/step_000009")),
         ["output.resume", '"auto", "never" or a checkpoint folder']),

    # Malformed JSONL: file and line, and the way to skip bad records.
    Case("jsonl-invalid-json", lambda c: run(c.job(records=CHAT[:2] + ['{"messages": [}'] + CHAT[3:])),
         lambda c: [f"{c.folder / 'train.jsonl'}:3: invalid JSON", 'on_bad_record = "skip"'], existing=True,
         process=True),
    Case("jsonl-array-line", lambda c: run(c.job(records=CHAT[:1] + ["[1, 2]"] + CHAT[2:])),
         lambda c: [f"{c.folder / 'train.jsonl'}:2: expected a JSON object, got list"]),
    Case("jsonl-not-utf8", lambda c: run(c.job(records=b"".join(json.dumps(r).encode() + b"\n" for r in CHAT[:3])
                                                + b'{"messages": "\xff"}\n')),
         lambda c: [f"{c.folder / 'train.jsonl'}:4: not UTF-8"], existing=True),
    Case("jsonl-torn-last-line", lambda c: run(c.job(records=CHAT[:11] + ['{"messages": [{"role": "us'])),
         lambda c: [f"{c.folder / 'train.jsonl'}:12: invalid JSON"]),

    # Records of the wrong shape for the profile.
    Case("chat-profile-given-alpaca", lambda c: run(c.job(records=[{"instruction": "a", "output": "b"}] * 4)),
         lambda c: [f"{c.folder / 'train.jsonl'}:1: missing field `messages`", "instruction"]),
    Case("chat-unknown-role", lambda c: run(c.job(records=[CHAT[0], {"messages": [{"role": "robot", "content": "x"}]}])),
         lambda c: [f"{c.folder / 'train.jsonl'}:2: messages[0]: unknown role 'robot'", "assistant"]),
    Case("chat-content-not-string", lambda c: run(c.job(records=[{"messages": [{"role": "user", "content": 5}]}])),
         lambda c: [f"{c.folder / 'train.jsonl'}:1: messages[0]: `content` must be a string"]),
    Case("chat-empty-conversation", lambda c: run(c.job(records=[CHAT[0], CHAT[1], {"messages": []}])),
         lambda c: [f"{c.folder / 'train.jsonl'}:3: empty conversation"]),
    Case("alpaca-profile-given-chat", lambda c: validate(c.job(profile__name="alpaca")),
         lambda c: [f"{c.folder / 'train.jsonl'}:1: missing field `instruction`", "messages"]),
    Case("sharegpt-unknown-speaker", lambda c: validate(c.job(
        profile__name="sharegpt", records=[{"conversations": [{"from": "martian", "value": "hi"}]}])),
         lambda c: [f"{c.folder / 'train.jsonl'}:1:", "unknown `from` value 'martian'"]),

    # Empty data and data with nothing to train on.
    Case("data-file-empty", lambda c: run(c.job(records=[])),
         lambda c: [f"{c.folder / 'train.jsonl'}: no usable examples", "0 records read", "has no records"],
         existing=True),
    Case("data-file-blank-lines", lambda c: run(c.job(records=["", "   ", ""])),
         ["no usable examples", "0 records read"]),
    # (Every assistant reply empty is not such a case: the end-of-turn token is still trained.)
    Case("truncation-leaves-nothing-trained", lambda c: run(c.job(
        records=[{"messages": [{"role": "user", "content": "word " * 40 + str(i)},
                               {"role": "assistant", "content": "yes"}]} for i in range(5)], data__max_length=16)),
         ["no usable examples", "5 records read", "no_trained_tokens"]),
    Case("no-assistant-turns", lambda c: validate(c.job(records=[
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}]} for i in range(4)])),
         ["no usable examples", "4 records read", "no_trained_tokens"]),
    Case("every-record-bad-under-skip", lambda c: run(c.job(records=["{nope"] * 3, data__on_bad_record="skip")),
         ["no usable examples", "3 records read", "invalid_json"]),

    # A tokenizer without a chat template.
    Case("tokenizer-without-chat-template", lambda c: run(c.job(model__tokenizer_path=no_template_tokenizer(c))),
         ["data.chat_template", "has no chat template", 'data.chat_template = "chatml"'], existing=True),

    # Launch settings that contradict the job.
    Case("accelerate-precision-contradicts-job", lambda c: run(c.job(launch__accelerate_config=c.accelerate(
        "distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n"))),
         ["launch.accelerate_config", "mixed_precision: bf16", "hyperparams.fp_precision is 'fp32'"]),
    Case("accelerate-accumulation-contradicts-job", lambda c: run(c.job(launch__accelerate_config=c.accelerate(
        "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config:\n  gradient_accumulation_steps: 4\n"))),
         ["deepspeed_config.gradient_accumulation_steps: 4", "hyperparams.gradient_accumulation is 1", "auto"]),
    Case("accelerate-multi-cpu", lambda c: run(c.job(launch__accelerate_config=c.accelerate(
        "distributed_type: MULTI_CPU\nnum_processes: 2\n"))), ["distributed_type MULTI_CPU", "multi_cpu.yaml"]),
    Case("fp16-on-cpu", lambda c: run(c.job(hyperparams__fp_precision="fp16")),
         ["hyperparams.fp_precision", "fp16 needs a CUDA GPU", '"bf16" or "fp32"'],
         marks=(pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 runs on a GPU"),)),
    Case("4bit-without-lora", lambda c: run(c.job(model__load_in_4bit=True)),
         ["model.load_in_4bit", "[lora] enabled = true"]),
    Case("eval-steps-without-validation", lambda c: run(c.job(hyperparams__eval_steps=5)),
         ["hyperparams.eval_steps", "validation_split"]),
    Case("resume-never-over-an-earlier-run", lambda c: (fake_checkpoint(c), run(c.job(output__resume="never")))[1],
         ["output.resume", "output.overwrite = true", "new output.output_dir"], existing=True),
    Case("unknown-profile", lambda c: run(c.job(profile__name="chatt")),
         ["profile.name", "unknown profile 'chatt'", '"chat"'], existing=True),

    # [locked] against the loaded model (the tiny model has 512 embedding rows).
    Case("locked-vocab-size", lambda c: run(c.job(locked__vocab_size=999)), ["locked.vocab_size", "999", "512"],
         existing=True),
    Case("locked-max-context", lambda c: run(c.job(locked__max_context_length=32)),
         ["data.max_length", "locked.max_context_length"]),

    # Bad --set values.
    Case("set-wrong-type", lambda c: run(c.job(), "--set", "hyperparams.batch_size=abc"),
         ["--set hyperparams.batch_size", "expected an integer", '"abc"'], process=True),
    Case("set-unknown-section", lambda c: run(c.job(), "--set", "hyperparam.batch_size=2"),
         ["--set hyperparam.batch_size", "unknown section", "did you mean `hyperparams`?"]),
    Case("set-misspelled-key", lambda c: validate(c.job(), "--set", "hyperparams.lerning_rate=1e-4"),
         ["--set hyperparams.lerning_rate", "did you mean `learning_rate`?"]),
    Case("set-section-without-key", lambda c: run(c.job(), "--set", "hyperparams=1"),
         ["--set hyperparams", "expected SECTION.KEY=VALUE"]),
    Case("set-without-equals", lambda c: run(c.job(), "--set", "hyperparams.batch_size"),
         ["--set 'hyperparams.batch_size'", "expected KEY=VALUE"]),
    Case("set-out-of-range", lambda c: run(c.job(), "--set", "hyperparams.learning_rate=-1"),
         ["--set hyperparams.learning_rate", "must be > 0"]),
]

SENTINEL = {"sentinel.txt": "an earlier run's file\n", ".trainer-engine-run": '{"run_id": "earlier"}\n',
            "result.json": json.dumps({"success": True, "global_step": 7, "error": None}) + "\n",
            "status.json": json.dumps({"status": "completed", "current_step": 7}) + "\n"}


def earlier_run(output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    for name, text in SENTINEL.items():
        (output / name).write_text(text)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_a_bad_input_is_refused_with_exit_2_and_a_message(case: Case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    ctx = Ctx(tmp_path / "job", tiny_model_dir)
    ctx.folder.mkdir()
    output = ctx.folder / "out"
    args = [str(a) for a in case.build(ctx)]
    if case.existing:
        earlier_run(output)
    before = snapshot(output) if output.exists() else None
    if case.setup is not None:
        assert not case.process, "a setup hook only applies in process"
        case.setup(ctx, monkeypatch)

    started = time.monotonic()
    if case.process:
        completed = run_launcher(*args, timeout=SUBPROCESS_LIMIT_SEC + 60)
        code, text, limit = completed.returncode, completed.stdout + completed.stderr, SUBPROCESS_LIMIT_SEC
    else:
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse
            code = exit_.code
        captured = capsys.readouterr()
        text, limit = captured.out + captured.err, IN_PROCESS_LIMIT_SEC
    elapsed = time.monotonic() - started
    monkeypatch.undo()

    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}, expected 2 (refused): {errors[-1] if errors else ''}\n{text[-3000:]}"
    expected = case.expect(ctx) if callable(case.expect) else case.expect
    # An item that is a tuple asks for any one of its phrasings.
    missing = [s for s in expected if not any(option in text for option in (s if isinstance(s, tuple) else (s,)))]
    assert not missing, f"the message lacks {missing}: {errors[-1] if errors else ''}\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert elapsed < limit, f"took {elapsed:.1f}s to refuse"
    if before is None:
        assert not output.exists(), f"a refused job created {output}: {sorted(os.listdir(output))}"
    else:
        assert snapshot(output) == before, "a refused job changed the earlier run's output folder"
