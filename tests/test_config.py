"""Unit tests of the job file: loading, type and range checks, cross-field rules, overrides, paths,
TOML round trip, the generated reference and derived values. All offline, milliseconds each.

    .venv/bin/pytest tests/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import typing
from pathlib import Path

import pytest

import launcher.config as config_module
from launcher.config import (
    ConfigError,
    DataConfig,
    EnvironmentConfig,
    HyperparamsConfig,
    JobConfig,
    LaunchConfig,
    LockedConfig,
    LoraConfig,
    ModelConfig,
    MonitoringConfig,
    OutputConfig,
    ProfileConfig,
    config_from_dict,
    field_docs,
    load_config,
    parse_override,
    reference_markdown,
)

SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "profile": ProfileConfig, "hyperparams": HyperparamsConfig,
    "output": OutputConfig, "monitoring": MonitoringConfig, "environment": EnvironmentConfig,
    "lora": LoraConfig, "launch": LaunchConfig, "locked": LockedConfig,
}
# Keys that hold a list of tables (`[[data.sources]]`), as "section.key", with their dataclass.
LIST_TABLES = {f"{section}.{key}": typing.get_args(tp)[0] for section, cls in SECTION_CLASSES.items()
               for key, tp in typing.get_type_hints(cls).items()
               if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0])}
TABLE_CLASSES = {**SECTION_CLASSES, **LIST_TABLES}
# What one such table needs to be valid.
TABLE_REQUIRED = {"data.sources": {"path": "a.jsonl"}}
HUB_ID = "Qwen/Qwen3-0.6B"
# The smallest job that loads: the three required keys, with the data file created next to the job.
REQUIRED_LINES = {
    "model": f'model_path = "{HUB_ID}"',
    "data": 'dataset_path = "train.jsonl"',
    "output": 'output_dir = "out"',
}
# The same as a parsed job, for `config_from_dict` (paths resolve against the cwd; nothing is read).
REQUIRED_DICT = {"model": {"model_path": HUB_ID}, "data": {"dataset_path": "train.jsonl"},
                 "output": {"output_dir": "out"}}


# --- helpers -----------------------------------------------------------------------------------

def toml_literal(value) -> str:
    """A TOML literal written independently of `launcher.config._toml_value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def job_text(sections: dict[str, str | dict] | None = None, *, required: bool = True) -> str:
    """A job file: the required keys (unless `required=False`) plus extra lines or values per section."""
    sections = dict(sections or {})
    out = []
    for name in dict.fromkeys([*(REQUIRED_LINES if required else {}), *sections]):
        out.append(f"[{name}]")
        if required and name in REQUIRED_LINES:
            out.append(REQUIRED_LINES[name])
        extra = sections.get(name, "")
        if isinstance(extra, dict):
            extra = "\n".join(f"{key} = {toml_literal(value)}" for key, value in extra.items())
        if extra:
            out.append(extra)
        out.append("")
    return "\n".join(out)


def write_job(folder: Path, text: str, *, name: str = "job.toml", with_data: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if with_data:
        (folder / "train.jsonl").write_text('{"text": "hello"}\n')
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, sections=None, *, overrides=None, **kwargs) -> JobConfig:
    return load_config(write_job(tmp_path, job_text(sections)), overrides=overrides, **kwargs)


def load_error(tmp_path: Path, sections=None, *, overrides=None, **kwargs) -> tuple[str, Path, str]:
    """(message, job path, job text) of a job that must be refused."""
    text = job_text(sections)
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides=overrides, **kwargs)
    return str(info.value), path, text


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of `text` that starts with `needle` (leading spaces aside)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith(needle):
            return number
    raise AssertionError(f"{needle!r} not in job text")


def problem_lines(message: str) -> list[str]:
    return [line[4:] for line in message.splitlines() if line.startswith("  - ")]


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """No test depends on the machine: CUDA is absent unless a test says otherwise (and torch is not imported)."""
    monkeypatch.setattr(config_module, "cuda_available", lambda: False)
    # Which tracker packages happen to be installed is the machine's business too
    # (tests/test_watching.py checks the refusal of a missing one).
    monkeypatch.setattr(config_module, "_tracker_installed", lambda tracker: True)


# --- defaults and explicit values --------------------------------------------------------------

def test_minimal_job_loads_with_every_default(tmp_path):
    config = load(tmp_path)
    assert config.model == ModelConfig(model_path=HUB_ID)
    assert config.data == DataConfig(dataset_path=str(tmp_path / "train.jsonl"))
    assert config.output == OutputConfig(output_dir=str(tmp_path / "out"))
    for name in ("profile", "hyperparams", "monitoring", "environment", "lora", "launch", "locked"):
        assert getattr(config, name) == SECTION_CLASSES[name](), name
    assert config.source == str(tmp_path / "job.toml")
    assert config.output_path == tmp_path / "out"


def test_a_job_with_only_the_required_keys_trains_one_example_per_step_for_one_epoch(tmp_path):
    """What the defaults mean for a run, in numbers worked out by hand: no batching, no accumulation,
    one pass over the data, no step limit."""
    config = load(tmp_path)
    assert config.global_batch_size(1) == 1
    assert config.num_optimizer_steps(10, 1) == 10    # 10 rows, one per step, once
    assert config.num_optimizer_steps(10, 2) == 5     # two processes share the 10 rows
    assert config.num_optimizer_steps(7, 2) == 4      # 7 rows on 2 processes: 4 batches each (one repeated)


def test_list_defaults_are_not_shared_between_instances():
    first, second = HyperparamsConfig(), HyperparamsConfig()
    before = list(second.adam_betas)
    first.adam_betas.append(0.5)
    assert second.adam_betas == before and first.adam_betas != before


# A non-default value for every key of every section; together they pass every cross-field rule.
EXPLICIT = {
    "model": {
        "model_path": "models/tiny", "tokenizer_path": "models/tok", "dtype": "bfloat16",
        "attn_implementation": "eager", "load_in_4bit": True, "gradient_checkpointing": True,
        "trust_remote_code": True, "compile": True,
    },
    "data": {
        "dataset_path": "data/train.jsonl", "validation_path": "data/val.jsonl", "max_length": 512,
        "packing": True, "shuffle": False, "on_bad_record": "skip", "too_long": "drop",
        "chat_template": "template.jinja", "group_by_length": True, "pad_to_multiple_of": 8, "num_proc": 4,
        "cache_dir": "cache", "split": "train", "subset": "main", "revision": "v1",
        "column_map": {"instruction": "question"}, "validation_split_name": "test", "streaming": True,
        "stream_buffer": 64,
    },
    "profile": {"name": "alpaca", "system_prompt": "Today is {date}.", "train_on": "last_assistant",
                "unstable_turns": "refuse"},
    "hyperparams": {
        "batch_size": 4, "gradient_accumulation": 8, "learning_rate": 1e-4, "lr_scheduler": "linear",
        "warmup_steps": 10, "num_epochs": 2.5, "max_steps": 100, "max_grad_norm": 0.5, "weight_decay": 0.01,
        "adam_betas": [0.8, 0.95], "adam_epsilon": 1e-6, "fp_precision": "fp32", "optimizer": "adafactor",
        "loss": "logits", "seed": 7, "save_steps": 50, "save_total_limit": 2, "eval_steps": 25,
    },
    "output": {"output_dir": "runs/a", "resume": "never", "overwrite": True, "merge_lora": True,
               "resume_changes": "allow"},
    "monitoring": {
        "validation_split": 0.1, "validation_max_samples": 100, "preview_steps": 20,
        "preview_prompts": ["Hi", "Bye"], "preview_num_prompts": 3, "preview_max_new_tokens": 32,
    },
    "environment": {"logging_steps": 5, "report_to": ["tensorboard", "wandb"], "log_level": "debug"},
    "lora": {
        "enabled": True, "r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
    },
    "launch": {"num_processes": 2, "accelerate_config": "accel.yaml", "timeout_minutes": 10,
               "main_process_port": 29500, "preflight_seconds": 60, "backend": "ray"},
    "locked": {"base_model": "tiny", "model_architecture": "Qwen3ForCausalLM", "max_context_length": 4096,
               "vocab_size": 1000},
}
EXPLICIT_PATHS = {  # keys whose value is resolved against the job folder
    ("model", "model_path"), ("model", "tokenizer_path"), ("data", "dataset_path"), ("data", "validation_path"),
    ("data", "chat_template"), ("data", "cache_dir"), ("output", "output_dir"), ("launch", "accelerate_config"),
}


def write_explicit_job(folder: Path) -> Path:
    for name in ("models/tiny", "models/tok", "data"):
        (folder / name).mkdir(parents=True)
    for name in ("data/train.jsonl", "data/val.jsonl", "template.jinja"):
        (folder / name).write_text("x\n")
    (folder / "accel.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    return write_job(folder, job_text(EXPLICIT, required=False), with_data=False)


# Keys that cannot join the others: `[[data.sources]]` replaces `data.dataset_path` (see
# test_round_trip_of_data_sources).
NOT_IN_EXPLICIT = {"data": {"sources"}}


def test_explicit_values_cover_every_key():
    for name, cls in SECTION_CLASSES.items():
        keys = {f.name for f in dataclasses.fields(cls)} - NOT_IN_EXPLICIT.get(name, set())
        assert set(EXPLICIT[name]) == keys, name
        defaults = cls()
        for key, value in EXPLICIT[name].items():
            assert getattr(defaults, key) != value, f"{name}.{key} equals its default"
    assert set(SECTION_CLASSES) == {f.name for f in dataclasses.fields(JobConfig) if f.name != "source"}


@pytest.mark.parametrize("section", list(EXPLICIT))
def test_every_section_loads_explicit_values(tmp_path, section):
    config = load_config(write_explicit_job(tmp_path))
    loaded = getattr(config, section)
    for key, value in EXPLICIT[section].items():
        expected = str(tmp_path / value) if (section, key) in EXPLICIT_PATHS else value
        assert getattr(loaded, key) == expected, f"{section}.{key}"
        assert type(getattr(loaded, key)) is type(expected), f"{section}.{key}"


def test_ints_are_accepted_for_float_keys_and_become_floats(tmp_path):
    config = load(tmp_path, {"hyperparams": {"learning_rate": 1, "num_epochs": 2, "max_grad_norm": 0},
                             "lora": {"alpha": 16}})
    h = config.hyperparams
    assert (h.learning_rate, h.num_epochs, h.max_grad_norm, config.lora.alpha) == (1.0, 2.0, 0.0, 16.0)
    assert all(type(v) is float for v in (h.learning_rate, h.num_epochs, h.max_grad_norm, config.lora.alpha))


def test_ints_in_a_float_list_become_floats(tmp_path):
    config = load(tmp_path, {"hyperparams": "adam_betas = [0, 0.5]"})
    assert config.hyperparams.adam_betas == [0.0, 0.5]
    assert all(type(b) is float for b in config.hyperparams.adam_betas)


def test_target_modules_accepts_all_linear_or_a_list(tmp_path):
    assert load(tmp_path, {"lora": 'target_modules = "all-linear"'}).lora.target_modules == "all-linear"
    assert load(tmp_path, {"lora": 'target_modules = ["q_proj"]'}).lora.target_modules == ["q_proj"]


def test_inline_table_sections_load(tmp_path):
    text = "hyperparams = { batch_size = 3 }\n" + job_text()  # top-level keys come before any [section]
    config = load_config(write_job(tmp_path, text))
    assert config.hyperparams.batch_size == 3


# --- type errors -------------------------------------------------------------------------------

TYPE_CASES = [
    # (section, key, TOML value, expected type as the message says it, the value as shown)
    ("hyperparams", "batch_size", '"4"', "an integer", '"4"'),
    ("hyperparams", "batch_size", "4.0", "an integer", "4.0"),
    ("hyperparams", "batch_size", "true", "an integer", "true"),
    ("hyperparams", "max_steps", "[10]", "an integer", "[10]"),
    ("data", "max_length", "2048.5", "an integer", "2048.5"),
    ("hyperparams", "learning_rate", '"1e-4"', "a number", '"1e-4"'),
    ("hyperparams", "learning_rate", "false", "a number", "false"),
    ("hyperparams", "fp_precision", '"fp8"', 'one of "bf16", "fp16", "fp32"', '"fp8"'),
    ("hyperparams", "fp_precision", "16", 'one of "bf16", "fp16", "fp32"', "16"),
    ("hyperparams", "lr_scheduler", '"Cosine"', 'one of "cosine", "linear", "constant"', '"Cosine"'),
    ("profile", "train_on", '"everything"', 'one of "assistant", "last_assistant", "all"', '"everything"'),
    ("data", "on_bad_record", "true", 'one of "error", "skip"', "true"),
    ("data", "packing", '"yes"', "true or false", '"yes"'),
    ("data", "shuffle", "1", "true or false", "1"),
    ("model", "load_in_4bit", '"false"', "true or false", '"false"'),
    ("profile", "system_prompt", "3", "a string", "3"),
    ("hyperparams", "adam_betas", '["a", "b"]', "a list of numbers", '["a", "b"]'),
    ("hyperparams", "adam_betas", "[0.9, true]", "a list of numbers", "[0.9, true]"),
    ("hyperparams", "adam_betas", "0.9", "a list of numbers", "0.9"),
    ("environment", "report_to", '"wandb"', "a list of strings", '"wandb"'),
    ("environment", "report_to", "[1, 2]", "a list of strings", "[1, 2]"),
    ("monitoring", "preview_prompts", '["ok", 3]', "a list of strings", '["ok", 3]'),
    ("lora", "target_modules", "3", "a string or a list of strings", "3"),
    ("lora", "target_modules", '["q_proj", 1]', "a string or a list of strings", '["q_proj", 1]'),
]


@pytest.mark.parametrize("section,key,raw,expected,shown", TYPE_CASES,
                         ids=[f"{c[0]}.{c[1]}={c[2]}" for c in TYPE_CASES])
def test_type_error_names_key_file_line_expected_type_and_value(tmp_path, section, key, raw, expected, shown):
    message, path, text = load_error(tmp_path, {section: f"{key} = {raw}"})
    line = line_of(text, f"{key} = ")
    assert f"{path}:{line}: {section}.{key}: expected {expected}, got {shown}" in message
    assert "1 problem" in message


def test_type_error_of_a_required_key_reports_the_type_not_missing(tmp_path):
    text = job_text(required=False, sections={"model": "model_path = 3", "data": 'dataset_path = "train.jsonl"',
                                              "output": 'output_dir = "out"'})
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert problem_lines(str(info.value)) == [f"{path}:2: model.model_path: expected a string, got 3"]


def test_a_section_that_is_not_a_table(tmp_path):
    text = "hyperparams = 3\n" + job_text()
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:1: hyperparams: expected a [hyperparams] table, got 3" in str(info.value)


def test_an_array_of_tables_is_not_a_section(tmp_path):
    text = job_text() + "[[lora]]\nr = 4\n"
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError, match=r"expected a \[lora\] table"):
        load_config(path)


def test_type_error_inside_an_inline_table_points_at_its_line(tmp_path):
    text = 'hyperparams = { batch_size = "x" }\n' + job_text()
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f'{path}:1: hyperparams.batch_size: expected an integer, got "x"' in str(info.value)


# --- unknown sections and keys -----------------------------------------------------------------

def test_unknown_key_names_it_with_line_and_suggests_the_closest(tmp_path):
    message, path, text = load_error(tmp_path, {"hyperparams": "batch_size = 2\nlearnig_rate = 1e-4"})
    line = line_of(text, "learnig_rate")
    assert (f"{path}:{line}: hyperparams.learnig_rate: unknown key `learnig_rate` in [hyperparams]; "
            "did you mean `learning_rate`?") in message


@pytest.mark.parametrize("section,typo,fix", [
    ("data", "dataset", "dataset_path"),
    ("model", "load_in_4_bit", "load_in_4bit"),
    ("lora", "lora_alpha", "alpha"),
    ("environment", "reportto", "report_to"),
    ("hyperparams", "gradient_accumulation_steps", "gradient_accumulation"),
])
def test_unknown_key_suggestions(tmp_path, section, typo, fix):
    message, _, _ = load_error(tmp_path, {section: f"{typo} = 1"})
    assert f"unknown key `{typo}` in [{section}]; did you mean `{fix}`?" in message


def test_unknown_key_without_a_close_match_lists_the_valid_keys(tmp_path):
    message, _, _ = load_error(tmp_path, {"launch": "zzzz = 1"})
    assert "unknown key `zzzz` in [launch]; valid keys: `num_processes`, `accelerate_config`" in message


def test_unknown_section_names_it_with_line_and_suggests_the_closest(tmp_path):
    message, path, text = load_error(tmp_path, {"hyperparam": "batch_size = 2"})
    line = line_of(text, "[hyperparam]")
    assert f"{path}:{line}: hyperparam: unknown section [hyperparam]; did you mean `hyperparams`?" in message


def test_unknown_section_without_a_close_match_lists_the_sections(tmp_path):
    message, _, _ = load_error(tmp_path, {"zzz": "a = 1"})
    assert "unknown section [zzz]; valid sections: `model`, `data`, `profile`, `hyperparams`" in message


def test_a_top_level_key_is_an_unknown_section(tmp_path):
    path = write_job(tmp_path, "learning_rate = 1e-4\n" + job_text())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:1: learning_rate: unknown section [learning_rate]" in str(info.value)


# --- ranges ------------------------------------------------------------------------------------

RANGE_CASES = [
    # Lower bounds.
    ("hyperparams", "batch_size", "0", "must be >= 1 and <= 1_048_576"),
    ("hyperparams", "batch_size", "-3", "must be >= 1 and <= 1_048_576"),
    ("hyperparams", "gradient_accumulation", "0", "must be >= 1 and <= 1_048_576"),
    ("hyperparams", "learning_rate", "0", "must be > 0 and <= 10"),
    ("hyperparams", "learning_rate", "-1e-4", "must be > 0 and <= 10"),
    ("hyperparams", "max_steps", "-2", "must be >= -1 and <= 1_000_000_000"),
    ("hyperparams", "num_epochs", "-1", "must be >= 0 and <= 10_000"),
    ("hyperparams", "save_total_limit", "0", "must be >= 1 and <= 1_000_000"),
    ("hyperparams", "save_steps", "-1", "must be >= 0 and <= 1_000_000_000"),
    ("hyperparams", "warmup_steps", "-1", "must be >= 0 and <= 1_000_000_000"),
    ("hyperparams", "adam_epsilon", "0.0", "must be > 0 and <= 1"),
    ("hyperparams", "seed", "-1", "must be >= 0 and <= 4_294_967_295"),
    ("data", "max_length", "4", "must be >= 8 and <= 4_194_304"),
    ("data", "num_proc", "0", "must be >= 1 and <= 1024"),
    ("monitoring", "validation_split", "1.0", "must be >= 0 and < 1"),
    ("monitoring", "validation_split", "-0.1", "must be >= 0 and < 1"),
    ("monitoring", "validation_max_samples", "0", "must be >= 1 and <= 1_000_000_000"),
    ("environment", "logging_steps", "0", "must be >= 1 and <= 1_000_000_000"),
    ("lora", "r", "0", "must be >= 1 and <= 65_536"),
    ("lora", "dropout", "1", "must be >= 0 and < 1"),
    ("launch", "num_processes", "0", "must be >= 1 and <= 1024"),
    # Upper bounds: what numpy, timedelta and int64 tensors cannot hold, and typos.
    ("hyperparams", "seed", "4294967296", "must be >= 0 and <= 4_294_967_295"),   # numpy: seeds < 2**32
    ("launch", "timeout_minutes", "10000000000000", "must be >= 1 and <= 10_080"),  # timedelta overflows
    ("launch", "timeout_minutes", "10081", "must be >= 1 and <= 10_080"),
    ("hyperparams", "batch_size", "99999999999999999999999", "must be >= 1 and <= 1_048_576"),
    ("hyperparams", "gradient_accumulation", "9223372036854775808", "must be >= 1 and <= 1_048_576"),  # 2**63
    ("hyperparams", "max_steps", "1_000_000_001", "must be >= -1 and <= 1_000_000_000"),
    ("data", "max_length", "4194305", "must be >= 8 and <= 4_194_304"),
    ("hyperparams", "learning_rate", "2e5", "must be > 0 and <= 10"),   # 2e-5 with the sign lost
    ("hyperparams", "learning_rate", "1" + "0" * 400, "must be > 0 and <= 10"),  # an int no float holds
    ("hyperparams", "num_epochs", "-" + "9" * 400, "must be >= 0 and <= 10_000"),
    ("hyperparams", "weight_decay", "10.5", "must be >= 0 and <= 10"),
    ("hyperparams", "max_grad_norm", "1e16", "must be >= 0 and <= 1_000_000"),
    ("launch", "main_process_port", "70000", "must be >= 0 and <= 65_535"),
    ("locked", "vocab_size", "16777217", "must be >= 0 and <= 16_777_216"),
    # Not finite: TOML's nan and inf, and a literal too large for a float (Python reads it as inf).
    ("hyperparams", "learning_rate", "nan", "must be a finite number"),
    ("hyperparams", "learning_rate", "1e400", "must be a finite number"),
    ("hyperparams", "learning_rate", "1" + "0" * 400 + ".0", "must be a finite number"),
    ("hyperparams", "num_epochs", "inf", "must be a finite number"),
    ("lora", "alpha", "-inf", "must be a finite number"),
    ("monitoring", "validation_split", "nan", "must be a finite number"),
    ("hyperparams", "adam_betas", "[nan, 0.9]", "must be a finite number"),
]


@pytest.mark.parametrize("section,key,raw,rule", RANGE_CASES,
                         ids=[f"{c[0]}.{c[1]}={c[2][:24]}" for c in RANGE_CASES])
def test_range_error_names_key_file_line_rule_and_value(tmp_path, section, key, raw, rule):
    message, path, text = load_error(tmp_path, {section: f"{key} = {raw}"})
    line = line_of(text, f"{key} = ")
    assert f"{path}:{line}: {section}.{key}: {rule}, got " in message
    assert len(message.splitlines()[-1]) < 200  # a 400-digit value is not repeated in full


def test_a_huge_integer_is_shown_by_its_size():
    with pytest.raises(ConfigError) as info:
        config_from_dict({**REQUIRED_DICT, "hyperparams": {"learning_rate": 10**400}}, check_environment=False)
    assert "hyperparams.learning_rate: must be > 0 and <= 10, got an integer of about 401 digits" in str(info.value)


@pytest.mark.parametrize("section,key,raw", [
    ("hyperparams", "batch_size", "1"), ("hyperparams", "max_steps", "-1"), ("hyperparams", "num_epochs", "0.5"),
    ("hyperparams", "max_grad_norm", "0"), ("hyperparams", "save_steps", "0"), ("monitoring", "validation_split", "0.99"),
    ("launch", "main_process_port", "65535"), ("data", "max_length", "8"), ("lora", "dropout", "0"),
    ("hyperparams", "seed", "4294967295"), ("launch", "timeout_minutes", "10080"),
    ("hyperparams", "batch_size", "1048576"), ("hyperparams", "learning_rate", "10"),
    ("data", "max_length", "4194304"), ("hyperparams", "max_steps", "1_000_000_000"),
])
def test_range_boundaries_that_are_allowed(tmp_path, section, key, raw):
    load(tmp_path, {section: f"{key} = {raw}"})


def numeric_fields() -> list[tuple[str, str, type]]:
    """(table, key, type) of every number, or list of numbers, in the job file; a table is a section
    (`hyperparams`) or a list of tables (`data.sources`)."""
    found = []
    for table, cls in TABLE_CLASSES.items():
        for key, tp in typing.get_type_hints(cls).items():
            if tp in (int, float, list[float]):
                found.append((table, key, tp))
    return found


def range_cell(table: str, key: str) -> str:
    """The reference's range cell of a key, e.g. `>= 1 and <= 1_048_576` (without the backticks)."""
    row = next(r for r in reference_section(table) if r.startswith(f"| `{key}` |"))
    return table_cells(row)[2].removeprefix("each item ").strip("`")


def documented_range(section: str, key: str) -> list[tuple[str, int | float]]:
    """The range of a key as the reference states it: [(">=", 1), ("<=", 1048576)]."""
    parts = []
    for part in range_cell(section, key).split(" and ") if range_cell(section, key) else []:
        op, number = part.split(" ")
        parts.append((op, int(number) if re.fullmatch(r"-?[\d_]+", number) else float(number)))
    return parts


def test_every_number_has_a_lower_and_an_upper_bound_in_the_reference():
    fields = numeric_fields()
    assert len(fields) >= 30  # the scan finds the numbers (seed, batch_size, ...)
    for section, key, _ in fields:
        ops = sorted(op for op, _ in documented_range(section, key))
        assert len(ops) == 2 and ops[0] in ("<", "<=") and ops[1] in (">", ">="), f"{section}.{key}: {ops}"


def test_every_default_lies_in_its_range():
    config_from_dict(REQUIRED_DICT, check_environment=False)


# Edges of a range that a rule of their own refuses: an explicit `weight = 0` (0 is "unset").
REFUSED_BY_ANOTHER_RULE = {("data.sources", "weight", 0.0): "weight = 0 takes nothing from this source"}
# Keys whose values at the range's edge need another key set to be a valid job.
COMPANIONS = {"hyperparams.eval_steps": {"monitoring": {"validation_split": 0.1}},
              "hyperparams.num_epochs": {"hyperparams": {"max_steps": 10}}}


def edges(bounds: list[tuple[str, int | float]], is_int: bool) -> tuple[list, list]:
    """(values just inside the range, values just outside it)."""
    def beside(value, direction):
        return value + direction if is_int else math.nextafter(float(value), direction * math.inf)

    inside, outside = [], []
    for op, bound in bounds:
        if op in (">=", "<="):
            inside.append(bound if is_int else float(bound))
            outside.append(beside(bound, -1 if op == ">=" else 1))
        else:
            inside.append(beside(bound, 1 if op == ">" else -1))
            outside.append(bound if is_int else float(bound))
    return inside, outside


@pytest.mark.parametrize("section,key,tp", numeric_fields(), ids=[f"{s}.{k}" for s, k, _ in numeric_fields()])
def test_the_range_in_the_reference_is_the_range_the_loader_enforces(section, key, tp):
    """Each edge of the documented range is accepted just inside and refused just outside, and the
    message names the key and the range as the reference states it."""
    inside, outside = edges(documented_range(section, key), tp is int)
    shown = range_cell(section, key)
    given = (lambda value: [value, 0.5]) if tp == list[float] else (lambda value: value)

    if section in SECTION_CLASSES:
        def job(value) -> dict:
            raw = {**REQUIRED_DICT, **COMPANIONS.get(f"{section}.{key}", {})}
            return {**raw, section: {**raw.get(section, {}), key: given(value)}}

        def loaded(config: JobConfig):
            return getattr(getattr(config, section), key)
        label = f"{section}.{key}"
    else:  # one table of a list of tables, such as [[data.sources]], in place of the section's data key
        parent, name = section.split(".")

        def job(value) -> dict:
            table = {**TABLE_REQUIRED[section], key: given(value)}
            return {**{k: v for k, v in REQUIRED_DICT.items() if k != parent}, parent: {name: [table]}}

        def loaded(config: JobConfig):
            return getattr(getattr(getattr(config, parent), name)[0], key)
        label = f"{section}[1].{key}"

    for value in inside:
        if (section, key, value) in REFUSED_BY_ANOTHER_RULE:
            with pytest.raises(ConfigError, match=REFUSED_BY_ANOTHER_RULE[section, key, value]):
                config_from_dict(job(value), check_environment=False)
            continue
        assert loaded(config_from_dict(job(value), check_environment=False)) == given(value)
    for value in outside:
        with pytest.raises(ConfigError) as info:
            config_from_dict(job(value), check_environment=False)
        prefix = "each item " if tp == list[float] else ""
        assert f"{label}: {prefix}must be {shown}, got " in str(info.value), value


@pytest.mark.parametrize("betas", ["[0.9]", "[]", "[0.9, 0.99, 0.999]"])
def test_adam_betas_must_be_two_numbers(tmp_path, betas):
    message, path, text = load_error(tmp_path, {"hyperparams": f"adam_betas = {betas}"})
    line = line_of(text, "adam_betas")
    assert f"{path}:{line}: hyperparams.adam_betas: expected two numbers in [0, 1)" in message


@pytest.mark.parametrize("betas", ["[0.9, 1.0]", "[-0.1, 0.9]", "[1.5, 0.9]", "[0.9, 99999999999999999999999]"])
def test_adam_betas_must_each_be_in_0_1(tmp_path, betas):
    message, path, text = load_error(tmp_path, {"hyperparams": f"adam_betas = {betas}"})
    line = line_of(text, "adam_betas")
    assert f"{path}:{line}: hyperparams.adam_betas: each item must be >= 0 and < 1, got [" in message


def test_adam_betas_accept_zero(tmp_path):
    assert load(tmp_path, {"hyperparams": "adam_betas = [0.0, 0.5]"}).hyperparams.adam_betas == [0.0, 0.5]


# --- several problems together -----------------------------------------------------------------

def test_several_problems_are_reported_together_with_the_count(tmp_path):
    message, path, text = load_error(tmp_path, {
        "hyperparams": 'batch_size = 0\nlearning_rate = "fast"\nlearnig_rate = 1e-4',
        "data": 'packing = "yes"',
        "trainer": "x = 1",
    })
    assert message.startswith(f"{path}: the job has 5 problems:\n")
    problems = problem_lines(message)
    assert len(problems) == 5
    for needle in ("hyperparams.batch_size: must be >= 1", "hyperparams.learning_rate: expected a number",
                   "did you mean `learning_rate`", "data.packing: expected true or false",
                   "unknown section [trainer]"):
        assert sum(needle in p for p in problems) == 1, needle


def test_cross_field_problems_are_reported_together(tmp_path):
    message, path, _ = load_error(tmp_path, {
        "model": "load_in_4bit = true",
        "hyperparams": "eval_steps = 10",
        "output": "merge_lora = true",
        "environment": 'report_to = ["tensorbord"]',
    })
    assert message.startswith(f"{path}: the job has 4 problems:\n")
    assert [p.split(": ")[1] for p in problem_lines(message)] == [
        "model.load_in_4bit", "output.merge_lora", "hyperparams.eval_steps", "environment.report_to"]


def test_a_single_problem_says_one_problem(tmp_path):
    message, path, _ = load_error(tmp_path, {"hyperparams": "batch_size = 0"})
    assert message.startswith(f"{path}: the job has 1 problem:\n")


def test_config_from_dict_without_a_file_names_only_the_key():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"hyperparams": {"batch_size": 0}, "lora": {"alpah": 8}})
    message = str(info.value)
    # Type problems and the missing required keys come back together, in one message.
    assert message.startswith("the job has 5 problems:\n")
    assert "  - model.model_path: required; set it in [model]" in message
    assert "  - hyperparams.batch_size: must be >= 1 and <= 1_048_576, got 0" in message
    assert "  - lora.alpah: unknown key `alpah` in [lora]; did you mean `alpha`?" in message


# --- required keys -----------------------------------------------------------------------------

def test_every_required_key_missing_is_reported(tmp_path):
    path = write_job(tmp_path, "# a job, to be written\n", with_data=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "the job has 3 problems" in message
    for dotted, section in [("model.model_path", "model"), ("data.dataset_path", "data"),
                            ("output.output_dir", "output")]:
        assert f"{path}: {dotted}: required; set it in [{section}]" in message


def test_a_required_key_missing_points_at_its_section(tmp_path):
    text = job_text(required=False, sections={"model": 'model_path = "org/model"', "data": "packing = true",
                                              "output": 'output_dir = "out"'})
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert problem_lines(str(info.value)) == [
        f"{path}:{line_of(text, '[data]')}: data.dataset_path: required; set it in [data]"]


def test_an_empty_required_string_counts_as_missing(tmp_path):
    message, path, text = load_error(tmp_path, overrides={"output.output_dir": ""})
    assert "output.output_dir: required; set it in [output]" in message


# --- cross-field rules -------------------------------------------------------------------------

def test_fp16_is_refused_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "cuda_available", lambda: False)
    message, path, text = load_error(tmp_path, {"hyperparams": 'fp_precision = "fp16"'})
    line = line_of(text, "fp_precision")
    assert f"{path}:{line}: hyperparams.fp_precision: fp16 needs a CUDA GPU" in message
    assert '"bf16"' in message


def test_fp16_is_accepted_with_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "cuda_available", lambda: True)
    assert load(tmp_path, {"hyperparams": 'fp_precision = "fp16"'}).hyperparams.fp_precision == "fp16"


def test_fp16_without_environment_checks_does_not_ask_for_cuda(tmp_path, monkeypatch):
    def fail():
        raise AssertionError("cuda_available must not be called")
    monkeypatch.setattr(config_module, "cuda_available", fail)
    config = load(tmp_path, {"hyperparams": 'fp_precision = "fp16"'}, check_environment=False)
    assert config.hyperparams.fp_precision == "fp16"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_other_precisions_do_not_ask_for_cuda(tmp_path, monkeypatch, precision):
    def fail():
        raise AssertionError("cuda_available must not be called")
    monkeypatch.setattr(config_module, "cuda_available", fail)
    load(tmp_path, {"hyperparams": f'fp_precision = "{precision}"'})


def test_load_in_4bit_needs_lora(tmp_path):
    message, path, text = load_error(tmp_path, {"model": "load_in_4bit = true"})
    assert f"{path}:{line_of(text, 'load_in_4bit')}: model.load_in_4bit: " in message
    assert "[lora] enabled = true" in message
    assert load(tmp_path, {"model": "load_in_4bit = true", "lora": "enabled = true"}).model.load_in_4bit


def test_merge_lora_needs_lora(tmp_path):
    message, path, text = load_error(tmp_path, {"output": "merge_lora = true"})
    assert f"{path}:{line_of(text, 'merge_lora')}: output.merge_lora: only applies with [lora] enabled" in message
    assert load(tmp_path, {"output": "merge_lora = true", "lora": "enabled = true"}).output.merge_lora


def test_eval_steps_need_validation_data(tmp_path):
    message, path, text = load_error(tmp_path, {"hyperparams": "eval_steps = 10"})
    assert f"{path}:{line_of(text, 'eval_steps')}: hyperparams.eval_steps: evaluation needs validation data" in message
    assert "data.validation_path" in message and "monitoring.validation_split" in message


def test_eval_steps_with_a_validation_split_or_file(tmp_path):
    config = load(tmp_path, {"hyperparams": "eval_steps = 10", "monitoring": "validation_split = 0.1"})
    assert config.hyperparams.eval_steps == 10
    (tmp_path / "val.jsonl").write_text("{}\n")
    config = load(tmp_path, {"hyperparams": "eval_steps = 10", "data": 'validation_path = "val.jsonl"'})
    assert config.data.validation_path == str(tmp_path / "val.jsonl")


def test_no_max_steps_and_no_epochs_is_refused(tmp_path):
    message, path, text = load_error(tmp_path, {"hyperparams": "max_steps = -1\nnum_epochs = 0"})
    assert f"{path}:{line_of(text, 'num_epochs')}: hyperparams.num_epochs: with max_steps = -1, " \
           "num_epochs must be > 0" in message


def test_max_steps_makes_zero_epochs_fine(tmp_path):
    config = load(tmp_path, {"hyperparams": "max_steps = 10\nnum_epochs = 0"})
    assert (config.hyperparams.max_steps, config.hyperparams.num_epochs) == (10, 0.0)


def test_max_steps_zero_with_zero_epochs_is_refused(tmp_path):
    message, _, _ = load_error(tmp_path, {"hyperparams": "max_steps = 0\nnum_epochs = 0"})
    assert "num_epochs must be > 0" in message


def test_unknown_tracker_is_refused_with_a_suggestion(tmp_path):
    message, path, text = load_error(tmp_path, {"environment": 'report_to = ["tensorboard", "wandbb"]'})
    assert (f"{path}:{line_of(text, 'report_to')}: environment.report_to: unknown tracker 'wandbb'; "
            "did you mean `wandb`?") in message
    assert "tensorboard" not in message.split("unknown tracker")[1].split(";")[0]


def test_known_trackers_are_accepted(tmp_path):
    trackers = ["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]
    assert load(tmp_path, {"environment": {"report_to": trackers}}).environment.report_to == trackers


def test_target_modules_string_other_than_all_linear_is_refused(tmp_path):
    message, _, _ = load_error(tmp_path, {"lora": 'enabled = true\ntarget_modules = "q_proj"'})
    assert "lora.target_modules: expected \"all-linear\" or a list of module names, got \"q_proj\"" in message


def test_missing_dataset_file(tmp_path):
    text = job_text()
    path = write_job(tmp_path, text, with_data=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = line_of(text, "dataset_path")
    assert problem_lines(str(info.value)) == [
        f"{path}:{line}: data.dataset_path: file not found: {tmp_path / 'train.jsonl'}"]


def test_a_folder_is_not_a_dataset_file(tmp_path):
    (tmp_path / "data").mkdir()
    message, _, _ = load_error(tmp_path, overrides={"data.dataset_path": "data"})
    assert f"data.dataset_path: file not found: {tmp_path / 'data'}" in message


def test_missing_validation_and_accelerate_config_files(tmp_path):
    message, _, _ = load_error(tmp_path, {"data": 'validation_path = "val.jsonl"',
                                          "launch": 'accelerate_config = "nope.yaml"'})
    assert f"data.validation_path: file not found: {tmp_path / 'val.jsonl'}" in message
    assert f"launch.accelerate_config: file not found: {tmp_path / 'nope.yaml'}" in message


def test_missing_files_are_not_checked_without_environment_checks(tmp_path):
    text = job_text({"data": 'validation_path = "val.jsonl"\nchat_template = "t.jinja"',
                     "output": 'resume = "ckpt"', "launch": 'accelerate_config = "a.yaml"'})
    config = load_config(write_job(tmp_path, text, with_data=False), check_environment=False)
    assert config.data.dataset_path == str(tmp_path / "train.jsonl")
    assert config.data.chat_template == str(tmp_path / "t.jinja")


def test_chat_template_file_not_found(tmp_path):
    message, path, text = load_error(tmp_path, {"data": 'chat_template = "missing.jinja"'})
    assert (f"{path}:{line_of(text, 'chat_template')}: data.chat_template: expected \"chatml\" or a template "
            f"file; file not found: {tmp_path / 'missing.jinja'}") in message


def test_chat_template_chatml_is_a_name_not_a_path(tmp_path):
    assert load(tmp_path, {"data": 'chat_template = "chatml"'}).data.chat_template == "chatml"


def test_chat_template_file_resolves_against_the_job_folder(tmp_path, monkeypatch):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.jinja").write_text("{{ messages }}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(tmp_path, {"data": 'chat_template = "templates/t.jinja"'})
    assert config.data.chat_template == str(tmp_path / "templates" / "t.jinja")


def test_resume_names_and_checkpoint_paths(tmp_path, monkeypatch):
    assert load(tmp_path, {"output": 'resume = "never"'}).output.resume == "never"
    assert load(tmp_path).output.resume == "auto"
    (tmp_path / "ckpt" / "step_000010").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "ckpt")  # the path is relative to the job file, not the cwd
    config = load(tmp_path, {"output": 'resume = "ckpt/step_000010"'})
    assert config.output.resume == str(tmp_path / "ckpt" / "step_000010")


def test_resume_path_that_does_not_exist(tmp_path):
    message, _, _ = load_error(tmp_path, {"output": 'resume = "latest"'})
    assert "output.resume: expected \"auto\", \"never\" or a checkpoint folder" in message
    assert str(tmp_path / "latest") in message


# --- overrides ---------------------------------------------------------------------------------

@pytest.mark.parametrize("item,key,value", [
    ("hyperparams.learning_rate=1e-4", "hyperparams.learning_rate", 1e-4),
    ("hyperparams.learning_rate=0.0003", "hyperparams.learning_rate", 3e-4),
    ("hyperparams.batch_size=8", "hyperparams.batch_size", 8),
    ("hyperparams.max_steps=-1", "hyperparams.max_steps", -1),
    ("data.packing=true", "data.packing", True),
    ("data.shuffle=false", "data.shuffle", False),
    ("hyperparams.adam_betas=[0.9, 0.95]", "hyperparams.adam_betas", [0.9, 0.95]),
    ('environment.report_to=["wandb"]', "environment.report_to", ["wandb"]),
    ("environment.report_to=[]", "environment.report_to", []),
    ("model.model_path=Qwen/Qwen3-0.6B", "model.model_path", "Qwen/Qwen3-0.6B"),
    ("data.dataset_path=data/train.jsonl", "data.dataset_path", "data/train.jsonl"),
    ("profile.name=chat", "profile.name", "chat"),
    ("profile.name=pkg.module:Class", "profile.name", "pkg.module:Class"),
    ('profile.system_prompt="Be brief."', "profile.system_prompt", "Be brief."),
    ("profile.system_prompt=a=b", "profile.system_prompt", "a=b"),
    ("profile.system_prompt=", "profile.system_prompt", ""),
    ("  hyperparams.seed = 3  ", "hyperparams.seed", 3),
])
def test_parse_override_reads_toml_typed_values(item, key, value):
    parsed_key, parsed = parse_override(item)
    assert parsed_key == key
    assert parsed == value and type(parsed) is type(value)


def test_parse_override_without_equals_is_refused():
    with pytest.raises(ConfigError) as info:
        parse_override("hyperparams.batch_size")
    assert "'hyperparams.batch_size'" in str(info.value) and "KEY=VALUE" in str(info.value)


def test_override_replaces_a_file_value(tmp_path):
    config = load(tmp_path, {"hyperparams": "batch_size = 2\nlearning_rate = 3e-5"},
                  overrides=dict([parse_override("hyperparams.batch_size=8")]))
    assert (config.hyperparams.batch_size, config.hyperparams.learning_rate) == (8, 3e-5)


def test_override_fills_a_section_absent_from_the_file(tmp_path):
    overrides = dict(parse_override(s) for s in ["lora.enabled=true", "lora.target_modules=[\"q_proj\"]",
                                                 "hyperparams.max_steps=20"])
    config = load(tmp_path, overrides=overrides)
    assert config.lora.enabled and config.lora.target_modules == ["q_proj"]
    assert config.hyperparams.max_steps == 20


def test_override_of_a_float_key_with_an_int(tmp_path):
    config = load(tmp_path, overrides=dict([parse_override("hyperparams.num_epochs=3")]))
    assert config.hyperparams.num_epochs == 3.0 and type(config.hyperparams.num_epochs) is float


def test_override_with_a_wrong_type_names_the_key(tmp_path):
    message, _, _ = load_error(tmp_path, overrides=dict([parse_override("hyperparams.batch_size=abc")]))
    assert '--set hyperparams.batch_size: expected an integer, got "abc"' in message


def test_override_out_of_range_names_the_key(tmp_path):
    message, _, _ = load_error(tmp_path, overrides={"monitoring.validation_split": 1.0})
    assert "--set monitoring.validation_split: must be >= 0 and < 1, got 1.0" in message


def test_unknown_override_key_suggests_the_closest(tmp_path):
    message, _, _ = load_error(tmp_path, overrides={"hyperparams.learnig_rate": 1e-4})
    assert "--set hyperparams.learnig_rate: unknown key `learnig_rate` in [hyperparams]; " \
           "did you mean `learning_rate`?" in message


def test_unknown_override_section_suggests_the_closest(tmp_path):
    message, _, _ = load_error(tmp_path, overrides={"hyperparam.batch_size": 2})
    assert "--set hyperparam.batch_size: unknown section `hyperparam`; did you mean `hyperparams`?" in message


def test_override_of_a_whole_section_asks_for_a_key(tmp_path):
    message, _, _ = load_error(tmp_path, overrides={"hyperparams": 3})
    assert "--set hyperparams: expected SECTION.KEY=VALUE, e.g. --set hyperparams.batch_size=..." in message
    assert "unknown section" not in message


def test_override_problems_and_file_problems_are_reported_together(tmp_path):
    message, _, _ = load_error(tmp_path, {"hyperparams": "batch_size = 0"},
                               overrides={"lora.rank": 8, "data.max_length": "long"})
    assert "the job has 3 problems" in message


def test_override_of_a_path_resolves_against_the_job_folder(tmp_path, monkeypatch):
    (tmp_path / "other.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path.parent)
    config = load(tmp_path, overrides={"data.dataset_path": "other.jsonl"})
    assert config.data.dataset_path == str(tmp_path / "other.jsonl")


# --- paths -------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_job_folder_not_the_cwd(tmp_path, monkeypatch):
    jobs = tmp_path / "jobs"
    (jobs / "data").mkdir(parents=True)
    (jobs / "data" / "train.jsonl").write_text("{}\n")
    (jobs / "data" / "val.jsonl").write_text("{}\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "accel.yaml").write_text("num_processes: 2\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = job_text(required=False, sections={
        "model": 'model_path = "./models/tiny"\ntokenizer_path = "tok"',
        "data": 'dataset_path = "data/train.jsonl"\nvalidation_path = "./data/val.jsonl"\ncache_dir = "cache"',
        "output": 'output_dir = "../outputs/run"',
        "launch": 'accelerate_config = "../shared/accel.yaml"',
    })
    config = load_config(write_job(jobs, text, with_data=False))
    assert config.model.model_path == str(jobs / "models" / "tiny")
    assert config.model.tokenizer_path == str(jobs / "tok")
    assert config.data.dataset_path == str(jobs / "data" / "train.jsonl")
    assert config.data.validation_path == str(jobs / "data" / "val.jsonl")
    assert config.data.cache_dir == str(jobs / "cache")
    assert config.output.output_dir == str(tmp_path / "outputs" / "run")
    assert config.launch.accelerate_config == str(tmp_path / "shared" / "accel.yaml")


def test_a_relative_job_path_is_fine(tmp_path, monkeypatch):
    write_job(tmp_path / "jobs", job_text())
    monkeypatch.chdir(tmp_path)
    config = load_config("jobs/job.toml")
    assert config.data.dataset_path == str(tmp_path / "jobs" / "train.jsonl")


def test_absolute_paths_are_kept(tmp_path):
    data = tmp_path / "elsewhere" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    config = load(tmp_path / "jobs", overrides={
        "data.dataset_path": str(data), "output.output_dir": str(tmp_path / "runs" / "x")})
    assert config.data.dataset_path == str(data)
    assert config.output.output_dir == str(tmp_path / "runs" / "x")


def test_tilde_expands_to_the_home_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "train.jsonl").write_text("{}\n")
    monkeypatch.setenv("HOME", str(home))
    text = job_text(required=False, sections={
        "model": 'model_path = "~/models/tiny"', "data": 'dataset_path = "~/train.jsonl"',
        "output": 'output_dir = "~/runs/x"'})
    config = load_config(write_job(tmp_path / "jobs", text, with_data=False))
    assert config.model.model_path == str(home / "models" / "tiny")
    assert config.data.dataset_path == str(home / "train.jsonl")
    assert config.output.output_dir == str(home / "runs" / "x")


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen3-0.6B", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v2"])
def test_a_hub_id_is_kept_when_no_such_local_folder_exists(tmp_path, monkeypatch, hub_id):
    monkeypatch.chdir(tmp_path)
    config = load(tmp_path / "jobs", overrides={"model.model_path": hub_id, "model.tokenizer_path": hub_id})
    assert config.model.model_path == hub_id
    assert config.model.tokenizer_path == hub_id


def test_a_local_folder_wins_over_a_hub_id(tmp_path):
    (tmp_path / "Qwen" / "Qwen3-0.6B").mkdir(parents=True)
    config = load(tmp_path)
    assert config.model.model_path == str(tmp_path / "Qwen" / "Qwen3-0.6B")


@pytest.mark.parametrize("value", ["./org/model", "../org/model", "a/b/c", "model"])
def test_paths_that_are_not_hub_ids_are_resolved(tmp_path, value):
    config = load(tmp_path / "jobs", overrides={"model.model_path": value})
    assert config.model.model_path == str((tmp_path / "jobs" / value).resolve())


def test_accelerate_config_next_to_the_job(tmp_path):
    (tmp_path / "multi_cpu.yaml").write_text("distributed_type: MULTI_GPU\n")
    config = load(tmp_path, {"launch": 'accelerate_config = "multi_cpu.yaml"'})
    assert config.launch.accelerate_config == str(tmp_path / "multi_cpu.yaml")


@pytest.fixture
def shipped_configs(tmp_path, monkeypatch) -> Path:
    """A stand-in for the repository's `accelerate_configs/` folder, found next to `launcher/`."""
    package = tmp_path / "repo" / "launcher"
    package.mkdir(parents=True)
    shipped = tmp_path / "repo" / "accelerate_configs"
    shipped.mkdir()
    (shipped / "multi_cpu.yaml").write_text("distributed_type: MULTI_GPU\n")
    monkeypatch.setattr(config_module, "__file__", str(package / "config.py"))
    return shipped


@pytest.mark.parametrize("name", ["multi_cpu", "multi_cpu.yaml"])
def test_accelerate_config_by_name_resolves_to_the_shipped_file(tmp_path, shipped_configs, name):
    config = load(tmp_path / "jobs", {"launch": {"accelerate_config": name}})
    assert config.launch.accelerate_config == str(shipped_configs / "multi_cpu.yaml")


def test_a_file_next_to_the_job_wins_over_the_shipped_one(tmp_path, shipped_configs):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "multi_cpu.yaml").write_text("num_processes: 4\n")
    config = load(jobs, {"launch": 'accelerate_config = "multi_cpu.yaml"'})
    assert config.launch.accelerate_config == str(jobs / "multi_cpu.yaml")


def test_an_unknown_accelerate_config_name_is_refused(tmp_path, shipped_configs):
    message, _, _ = load_error(tmp_path / "jobs", {"launch": 'accelerate_config = "multi_tpu"'})
    assert f"launch.accelerate_config: file not found: {tmp_path / 'jobs' / 'multi_tpu'}" in message


def test_shipped_accelerate_configs_resolve_by_name(tmp_path, monkeypatch):
    """Every YAML file the repository ships loads by its bare name."""
    monkeypatch.setattr(config_module, "cuda_available", lambda: True)  # fsdp.yaml needs GPUs
    shipped = Path(config_module.__file__).resolve().parent.parent / "accelerate_configs"
    for yaml in sorted(shipped.glob("*.yaml")):
        config = load(tmp_path, {"launch": {"accelerate_config": yaml.stem}})
        assert config.launch.accelerate_config == str(yaml)


# --- TOML round trip ---------------------------------------------------------------------------

def reload_elsewhere(config: JobConfig, folder: Path) -> JobConfig:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    return load_config(path)


def test_round_trip_of_a_minimal_job(tmp_path):
    config = load(tmp_path / "a")
    again = reload_elsewhere(config, tmp_path / "b")
    assert again == config
    assert again.source == str(tmp_path / "b" / "job.toml")


def test_round_trip_of_every_key(tmp_path):
    config = load_config(write_explicit_job(tmp_path / "a"))
    assert reload_elsewhere(config, tmp_path / "b") == config


def test_round_trip_of_data_sources(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "a" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / name).write_text('{"text": "hi"}\n')
    text = (f'[model]\nmodel_path = "{HUB_ID}"\n[output]\noutput_dir = "out"\n'
            '[[data.sources]]\npath = "a.jsonl"\nweight = 3.0\nprofile = "text"\n'
            '[[data.sources]]\npath = "b.jsonl"\nweight = 1\ncolumn_map = {text = "body"}\n')
    config = load_config(write_job(tmp_path / "a", text, with_data=False))
    assert [source.weight for source in config.data.sources] == [3.0, 1.0]
    assert reload_elsewhere(config, tmp_path / "b") == config


@pytest.mark.parametrize("text", [
    'He said "hi" and left',
    "C:\\Users\\me\\data and a trailing backslash \\",
    "Grüße, 日本語, emoji 😀, accents éàü",
    "line one\nline two\ttabbed\r\n",
    "control \x01\x1f and delete \x7f",
    "'single' and \"\"\"triple\"\"\" quotes",
    "{date} and {{braces}}",
    "",
])
def test_round_trip_of_strings(tmp_path, text):
    config = load(tmp_path / "a", overrides={"profile.system_prompt": text, "locked.base_model": text})
    again = reload_elsewhere(config, tmp_path / "b")
    assert again.profile.system_prompt == text
    assert again.locked.base_model == text


def test_round_trip_of_floats_and_lists(tmp_path):
    overrides = {
        "hyperparams.learning_rate": 2e-5, "hyperparams.adam_epsilon": 1e-8, "hyperparams.weight_decay": 0.1,
        "hyperparams.num_epochs": 0.3, "hyperparams.max_grad_norm": 1e6, "hyperparams.adam_betas": [0.9, 0.999],
        "lora.dropout": 5e-324,  # the smallest float: written with an exponent, read back exactly
        "monitoring.validation_split": 1 / 3, "monitoring.preview_prompts": ["a, b", "[c]", 'd"e'],
        "lora.enabled": True, "lora.target_modules": ["q_proj", "k_proj"], "lora.alpha": 16,
        "environment.report_to": ["tensorboard"],
    }
    config = load(tmp_path / "a", overrides=overrides)
    again = reload_elsewhere(config, tmp_path / "b")
    assert again == config
    h = again.hyperparams
    assert (h.learning_rate, h.adam_epsilon, h.weight_decay, h.num_epochs) == (2e-5, 1e-8, 0.1, 0.3)
    assert again.monitoring.validation_split == 1 / 3


def test_to_toml_is_valid_toml_with_every_section(tmp_path):
    import tomllib

    config = load(tmp_path)
    parsed = tomllib.loads(config.to_toml())
    assert list(parsed) == list(SECTION_CLASSES)
    assert parsed == config.to_dict()
    assert not re.search(r"(?m)^source\b", config.to_toml())  # the job file's path is no key


def test_source_does_not_affect_equality(tmp_path):
    assert load(tmp_path / "a") != load(tmp_path / "b")  # different resolved paths
    first = load(tmp_path / "a")
    second = load_config(write_job(tmp_path / "a", job_text(), name="copy.toml"))
    assert first == second and first.source != second.source


# --- the job file itself -----------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "[model\nmodel_path = 'x'\n",
    "[model]\nmodel_path = \n",
    "[model]\nmodel_path = 'a'\nmodel_path = 'b'\n",
    "[hyperparams]\nlearning_rate = 1e-4.0\n",
])
def test_invalid_toml_names_the_file(tmp_path, text):
    path = write_job(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_missing_job_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: job file not found"


def test_a_folder_or_binary_file_is_not_a_job(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the job file"):
        load_config(tmp_path)
    (tmp_path / "job.toml").write_bytes(b"\xff\xfe[model]\n")
    with pytest.raises(ConfigError, match="cannot read the job file"):
        load_config(tmp_path / "job.toml")


def test_config_error_is_a_value_error(tmp_path):
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        load(tmp_path, {"hyperparams": "batch_size = 0"})
    with pytest.raises(ValueError):
        load_config(tmp_path / "missing.toml")


def test_comments_and_a_utf8_job_file_load(tmp_path):
    text = job_text({"profile": 'system_prompt = "Réponds en français."  # a comment'})
    config = load_config(write_job(tmp_path, "# job file\n" + text))
    assert config.profile.system_prompt == "Réponds en français."


def test_a_job_file_with_a_utf8_byte_order_mark_loads_and_keeps_its_line_numbers(tmp_path):
    text = job_text({"hyperparams": "batch_size = 0"})
    path = tmp_path / "job.toml"
    (tmp_path / "train.jsonl").write_text("{}\n")
    path.write_bytes(b"\xef\xbb\xbf" + job_text().encode())  # what Notepad writes as "UTF-8 with BOM"
    assert load_config(path).data.dataset_path == str(tmp_path / "train.jsonl")
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:{line_of(text, 'batch_size')}: hyperparams.batch_size: must be >= 1" in str(info.value)


@pytest.mark.parametrize("data,expected", [
    (b'[model]\nmodel_path = "x"\n\n[data]\ndataset_path = "caf\xe9.jsonl"\n',
     "cannot read the job file: line 5 is not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ("[model]\n".encode("utf-16"), "cannot read the job file: it is saved as UTF-16; save it as UTF-8"),
    (b"", "the job file is empty; a job needs at least [model] model_path, [data] dataset_path, "
          "[output] output_dir"),
    (b" \n\t\n", "the job file is empty"),
    (b"\x00" * 100, "invalid TOML"),
    (b"a = " + b"[" * 100_000, "invalid TOML: arrays or tables nested too deeply to read"),
    (b"a = {b = " * 5_000, "invalid TOML"),
    (b"seed = " + b"1" * 5000, "invalid TOML: a number is too long to read"),
    (b"x" * ((1 << 20) + 1), "it is larger than 1 MiB, and a job file is a few KB of TOML"),
], ids=["latin-1", "utf-16", "empty", "blank", "nul-bytes", "deep-arrays", "deep-tables", "5000-digits", "huge"])
def test_a_job_file_that_is_not_toml_text_is_refused_with_what_to_do(tmp_path, data, expected):
    path = tmp_path / "job.toml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)
    assert len(str(info.value)) < 500


def test_a_folder_as_the_job_file_says_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the job file: it is a folder; give the path of a .toml"):
        load_config(tmp_path)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_an_endless_job_file_is_refused_without_reading_it_all():
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config("/dev/zero")


def test_garbage_with_thousands_of_problems_gives_a_message_of_bounded_size(tmp_path):
    message, _, _ = load_error(tmp_path, {"hyperparams": "\n".join(f"key_{i} = {i}" for i in range(3000))})
    assert message.splitlines()[0].endswith("the job has 3000 problems:")
    assert len(problem_lines(message)) == 51
    assert problem_lines(message)[-1] == "... and 2950 more (fix these first)"


@pytest.mark.parametrize("value", ["x" * 100_000, "é" * 50_000, "a\nb" * 1000])
def test_a_long_wrong_value_is_shown_cut_short(tmp_path, value):
    message, _, _ = load_error(tmp_path, overrides={"hyperparams.batch_size": value, "hyperparams.seed": [[[[1]]]]})
    assert all(len(line) < 300 for line in message.splitlines())
    assert "hyperparams.batch_size: expected an integer, got " in message
    assert "[...]" in message


def test_a_strange_key_name_is_shown_on_one_line(tmp_path):
    message, _, _ = load_error(tmp_path, {"hyperparams": '"line\\nbreak" = 1\n"' + "k" * 5000 + '" = 2'})
    problems = problem_lines(message)
    assert len(problems) == 2
    assert 'unknown key `"line\\nbreak"` in [hyperparams]' in message
    assert "k" * 100 not in message and "[...]" in problems[1]


@pytest.mark.parametrize("key", ["data.dataset_path", "output.output_dir", "model.model_path", "output.resume",
                                 "launch.accelerate_config", "data.chat_template"])
def test_a_path_with_a_nul_character_is_refused(tmp_path, key):
    message, _, _ = load_error(tmp_path, overrides={key: "a\x00b"})
    assert f"--set {key}: a path cannot contain a NUL character (\\u0000)" in message


@pytest.mark.parametrize("key", ["data.dataset_path", "data.validation_path", "data.chat_template",
                                 "launch.accelerate_config", "output.resume", "model.model_path"])
def test_a_path_too_long_for_the_file_system_is_not_found_rather_than_a_crash(tmp_path, key):
    name = "n" * 5000  # ENAMETOOLONG, which Path.is_file() raises instead of answering False
    try:
        config = load(tmp_path, overrides={key: name})
    except ConfigError as error:
        assert key in str(error)
    else:
        assert key == "model.model_path"  # a model folder is looked at when the model loads
        assert config.model.model_path == str(tmp_path / name)


# --- the reference -----------------------------------------------------------------------------

@functools.cache
def docs_of(cls: type) -> dict[str, str]:
    """`field_docs`, once per class: it parses the module source (tens of milliseconds a call)."""
    return field_docs(cls)


@functools.cache
def reference() -> str:
    return reference_markdown()


def reference_section(table: str) -> list[str]:
    """The key rows of one table of the reference: a section's (`hyperparams`) or a list of tables'
    (`data.sources`)."""
    heading = f"### `[{table}]`" if table in SECTION_CLASSES else f"#### `[[{table}]]`"
    block = reference().split(heading, 1)[1].split("\n#", 1)[0]
    return [row for row in block.splitlines() if row.startswith("| `")]


def table_cells(row: str) -> list[str]:
    """Cells of a markdown table row, splitting on `|` but not on an escaped `\\|`."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_every_field_of_every_section_has_a_docstring():
    missing = [f"{table}.{f.name}" for table, cls in TABLE_CLASSES.items()
               for f in dataclasses.fields(cls) if not docs_of(cls).get(f.name)]
    assert missing == []
    section_docs = docs_of(JobConfig)
    assert [s for s in SECTION_CLASSES if not section_docs.get(s)] == []


def test_field_docs_are_one_line_sentences():
    for section, cls in SECTION_CLASSES.items():
        for key, doc in docs_of(cls).items():
            assert "\n" not in doc, f"{section}.{key}"


def test_reference_lists_every_section_and_field_with_its_docstring():
    text = reference()
    section_docs = docs_of(JobConfig)
    for section, cls in SECTION_CLASSES.items():
        assert f"### `[{section}]`: {section_docs[section]}" in text
        docs = docs_of(cls)
        for f in dataclasses.fields(cls):
            rows = [r for r in text.splitlines() if r.startswith(f"| `{f.name}` |")]
            assert rows, f"{section}.{f.name}"
            assert any(table_cells(r)[3].replace("\\|", "|") == docs[f.name] for r in rows), f"{section}.{f.name}"


def test_reference_table_rows_have_four_cells():
    rows = [r for r in reference().splitlines() if r.startswith("|")]
    assert len(rows) == 2 * len(TABLE_CLASSES) + sum(len(dataclasses.fields(c)) for c in TABLE_CLASSES.values())
    for table, cls in TABLE_CLASSES.items():
        assert [table_cells(r)[0].strip("`") for r in reference_section(table)] == \
            [f.name for f in dataclasses.fields(cls)], table
    for row in rows:
        assert len(table_cells(row)) == 4, row


def test_reference_marks_required_keys_and_shows_each_default_as_toml_that_reads_back_to_it():
    import tomllib

    for section, cls in SECTION_CLASSES.items():
        defaults = cls()
        for row in reference_section(section):
            key, default = (cell.strip("`") for cell in table_cells(row)[:2])
            if f"{section}.{key}" in config_module.REQUIRED:
                assert default == "required", f"{section}.{key}"
            else:
                assert tomllib.loads(f"v = {default}")["v"] == getattr(defaults, key), f"{section}.{key}"
    required = [f"{s}.{table_cells(r)[0].strip('`')}" for s in SECTION_CLASSES for r in reference_section(s)
                if table_cells(r)[1] == "required"]
    assert required == ["model.model_path", "data.dataset_path", "output.output_dir"]


# --- derived values ----------------------------------------------------------------------------

def job_with(**hyperparams) -> JobConfig:
    return JobConfig(hyperparams=HyperparamsConfig(**hyperparams))


@pytest.mark.parametrize("batch_size,accumulation,processes,expected", [
    (1, 1, 1, 1), (4, 8, 1, 32), (4, 8, 2, 64), (2, 3, 5, 30),
])
def test_global_batch_size(batch_size, accumulation, processes, expected):
    config = job_with(batch_size=batch_size, gradient_accumulation=accumulation)
    assert config.global_batch_size(processes) == expected


@pytest.mark.parametrize("batches,accumulation,epochs,expected", [
    (8, 4, 1, 2),       # whole windows
    (10, 4, 1, 3),      # a partial last window is a step
    (10, 4, 2, 6),      # each epoch ends with its partial window
    (10, 1, 3, 30),
    (10, 4, 0.5, 2),    # fractional epochs round up
    (100, 1, 0.07, 7),  # 100 * 0.07 is 7.000000000000001 in floats: still 7 steps
    (10, 1, 0.3, 3),
    (1, 1, 0.01, 1),    # at least one step
    (3, 8, 1, 1),       # fewer batches than one window
])
def test_total_steps_from_epochs(batches, accumulation, epochs, expected):
    config = job_with(gradient_accumulation=accumulation, num_epochs=epochs)
    assert config.total_steps(batches) == expected


@pytest.mark.parametrize("batches", [1, 10, 10_000])
def test_max_steps_overrides_epochs(batches):
    assert job_with(max_steps=7, num_epochs=3, gradient_accumulation=4).total_steps(batches) == 7


def test_derived_values_of_a_loaded_job(tmp_path):
    config = load(tmp_path, {"hyperparams": "batch_size = 2\ngradient_accumulation = 4\nnum_epochs = 1.5"})
    assert config.global_batch_size(2) == 16
    # 10 batches in windows of 4: 3 steps an epoch (the last window has 2 batches); 1.5 epochs: 4.5, so 5.
    assert config.total_steps(10) == 5


@pytest.mark.parametrize("rows,batch_size,accumulation,processes,epochs,expected", [
    # rows -> batches -> batches per process (the last process repeats a few) -> steps an epoch -> steps
    (10, 1, 1, 1, 1, 10),
    (25, 2, 4, 3, 1.5, 3),     # 13 batches; 5 per process; 2 steps an epoch; 3 in 1.5 epochs
    (100, 4, 2, 2, 3, 21),     # 25 batches; 13 per process; 7 steps an epoch; 21 in 3 epochs
    (1, 8, 1, 4, 1, 1),        # one short batch, given to every process
    (64, 8, 8, 1, 0.25, 1),    # 8 batches make 1 step an epoch; a quarter epoch still takes a step
])
def test_num_optimizer_steps_from_rows(rows, batch_size, accumulation, processes, epochs, expected):
    config = job_with(batch_size=batch_size, gradient_accumulation=accumulation, num_epochs=epochs)
    assert config.num_optimizer_steps(rows, processes) == expected


def test_to_dict_has_every_section_and_key(tmp_path):
    config = load(tmp_path)
    assert {name: set(values) for name, values in config.to_dict().items()} == {
        name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTION_CLASSES.items()}


def test_loading_does_not_touch_the_environment_or_cwd(tmp_path, monkeypatch):
    path = write_job(tmp_path / "jobs", job_text({"data": 'cache_dir = "cache"'}))
    monkeypatch.chdir(tmp_path)
    before = {p.name for p in tmp_path.rglob("*")}
    environ = dict(os.environ)
    load_config(path)
    assert {p.name for p in tmp_path.rglob("*")} == before
    assert dict(os.environ) == environ
    assert not (tmp_path / "jobs" / "out").exists() and not (tmp_path / "jobs" / "cache").exists()


# --- the Accelerate config may not contradict the job ----------------------------------------

def accelerate_job(tmp_path, yaml_text: str, hyperparams: str = "") -> Path:
    (tmp_path / "accel.yaml").write_text(yaml_text)
    return write_job(tmp_path, job_text({"launch": 'accelerate_config = "accel.yaml"', "hyperparams": hyperparams}))


def test_accelerate_precision_that_contradicts_the_job_is_refused(tmp_path):
    path = accelerate_job(tmp_path, "distributed_type: MULTI_GPU\nmixed_precision: fp16\n", 'fp_precision = "fp32"')
    with pytest.raises(ConfigError, match="sets mixed_precision: fp16 but the job's hyperparams.fp_precision"):
        load_config(path)


def test_deepspeed_numbers_must_match_the_job_or_be_auto(tmp_path):
    yaml_text = ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 4\n"
                 "  gradient_clipping: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(accelerate_job(tmp_path, yaml_text, "gradient_accumulation = 2"))
    assert "deepspeed_config.gradient_accumulation_steps: 4 but the job's hyperparams.gradient_accumulation is 2" \
        in str(info.value)
    assert "deepspeed_config.gradient_clipping: 0.5" in str(info.value)
    matching = "distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 2\n"
    assert load_config(accelerate_job(tmp_path, matching, "gradient_accumulation = 2")).launch.accelerate_config


def test_a_file_that_is_not_an_accelerate_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not an Accelerate config"):
        load_config(accelerate_job(tmp_path, "just a string\n"))


def test_every_shipped_accelerate_config_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "cuda_available", lambda: True)  # fsdp.yaml needs GPUs
    shipped = sorted((Path(__file__).resolve().parent.parent / "accelerate_configs").glob("*.yaml"))
    assert len(shipped) >= 8
    for path in shipped:
        job = write_job(tmp_path, job_text({"launch": f'accelerate_config = "{path.stem}"'}))
        assert load_config(job).launch.accelerate_config == str(path)


def test_fsdp_without_cuda_is_refused(tmp_path):
    path = accelerate_job(tmp_path, "distributed_type: FSDP\n")
    with pytest.raises(ConfigError, match="FSDP needs CUDA GPUs"):
        load_config(path)


MALFORMED_ACCELERATE = [
    # (YAML text, key named, line of that key, what the message says)
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  gradient_clipping: abc\n",
     "deepspeed_config.gradient_clipping", 4, 'expected auto or a number, got "abc"'),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: [4]\n",
     "deepspeed_config.gradient_accumulation_steps", 3, "expected auto or a number, got [4]"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_clipping:\n",
     "deepspeed_config.gradient_clipping", 3, "expected auto or a number, got None"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: [1, 2]\n", "deepspeed_config", 2,
     "expected a mapping of settings, got [1, 2]"),
    ("distributed_type: FSDP\nfsdp_config: full_shard\n", "fsdp_config", 2,
     'expected a mapping of settings, got "full_shard"'),
    ("distributed_type: MULTI_GPU\nnum_processes: \"x\"\n", "num_processes", 2, 'expected an integer, got "x"'),
    ("distributed_type: MULTI_GPU\nnum_processes: 2.5\n", "num_processes", 2, "expected an integer, got 2.5"),
    ("distributed_type: MULTI_GPU\nnum_machines: true\n", "num_machines", 2, "expected an integer, got true"),
    ("distributed_type: MULTI_GPU\nmain_process_port: port\n", "main_process_port", 2, "expected an integer"),
    ("distributed_type: [MULTI_GPU]\n", "distributed_type", 1,
     'expected a string such as MULTI_GPU, got ["MULTI_GPU"]'),
    ("distributed_type: MULTI_GPU\nmixed_precision: no\n", "mixed_precision", 2,
     'expected a string such as "no" (quoted: YAML reads a bare no as false), got false'),
]


@pytest.mark.parametrize("yaml_text,key,line,expected", MALFORMED_ACCELERATE,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(MALFORMED_ACCELERATE)])
def test_a_malformed_accelerate_config_names_its_file_line_and_key(tmp_path, yaml_text, key, line, expected):
    path = accelerate_job(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    yaml_path = tmp_path / "accel.yaml"
    assert f"launch.accelerate_config: {yaml_path}:{line}: {key}: {expected}" in str(info.value)


@pytest.mark.parametrize("data,expected", [
    (b"- distributed_type: MULTI_GPU\n- num_processes: 2\n", "is not an Accelerate config (expected a YAML "
                                                            "mapping of settings, got a list)"),
    (b"42\n", "is not an Accelerate config (expected a YAML mapping of settings, got a number)"),
    (b"distributed_type: MULTI_GPU\n  num_processes: 2\n  - x\n", "as YAML (ScannerError"),
    (b"distributed_type: \xff\xfe\n", "as YAML (UnicodeDecodeError"),
    (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "as YAML (RecursionError"),
    (b"a: 1\n---\nb: 2\n", "as YAML (ComposerError"),
    (b"? [a, b]\n: 1\n", "as YAML (ConstructorError"),
], ids=["list", "scalar", "bad-indent", "not-utf8", "deep", "two-documents", "unhashable-key"])
def test_an_accelerate_config_that_is_not_a_yaml_mapping_is_refused(tmp_path, data, expected):
    (tmp_path / "accel.yaml").write_bytes(data)
    path = write_job(tmp_path, job_text({"launch": 'accelerate_config = "accel.yaml"'}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"launch.accelerate_config: " in str(info.value)
    assert str(tmp_path / "accel.yaml") in str(info.value) and expected in str(info.value)


def test_an_accelerate_config_of_nested_aliases_is_refused_without_writing_them_out(tmp_path):
    """YAML aliases let a few lines stand for billions of values ("billion laughs"; a million here, which
    JSON would still write out); the message must not spell them out."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 6)]
    yaml_text = "\n".join(lines) + "\ndistributed_type: MULTI_GPU\nnum_processes: *a5\n"
    with pytest.raises(ConfigError) as info:
        load_config(accelerate_job(tmp_path, yaml_text))
    assert f"{tmp_path / 'accel.yaml'}:8: num_processes: expected an integer, got a list of 10 items" \
        in str(info.value)


def test_deepspeed_numbers_equal_to_the_job_are_accepted_in_any_numeric_spelling(tmp_path):
    yaml_text = ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  gradient_accumulation_steps: 2\n"
                 "  gradient_clipping: 1\n")  # an int for the job's 1.0
    config = load_config(accelerate_job(tmp_path, yaml_text, "gradient_accumulation = 2"))
    assert config.hyperparams.max_grad_norm == 1.0


# --- shipped examples ------------------------------------------------------------------------

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("*.toml"))


def test_the_examples_folder_has_jobs():
    assert EXAMPLES, "examples/ ships no job file"


@pytest.mark.parametrize("job", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_job_loads_and_round_trips(job, tmp_path):
    config = load_config(job)
    assert Path(config.data.dataset_path).is_file()
    assert reload_elsewhere(config, tmp_path) == config
