"""Property-based attacks on the job loader (hypothesis): whatever a job file holds, `load_config`
returns a config or raises `ConfigError`, and `python -m launcher validate` answers 0 or 2, never a
traceback, and never creates the output folder.

    .venv/bin/python -m pytest tests/test_config_properties.py -q                  # ~200 examples a test, seconds
    .venv/bin/python -m pytest tests/test_config_properties.py -q --long           # 25 times as many

`--long` is the same as TRAINER_ENGINE_LONG=1. Hypothesis keeps no example
database and has no deadline here, so a run leaves no `.hypothesis` folder and a slow machine
cannot fail it; a failure prints the `@reproduce_failure` line that replays it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import launcher.config as config_module
from launcher.config import ConfigError, JobConfig, load_config, parse_override
from helpers import long_form

SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(JobConfig) if f.name != "source"}
TRACKERS = ["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio"]


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis caches character tables and the literals of the code under test in `.hypothesis/`
    of the current folder even without an example database; here they go next to pytest's temporary
    folders (kept between runs, so the tables are built once, and never in the repository)."""
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tmp_path_factory.getbasetemp().parent / "hypothesis-home")
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(autouse=True)
def no_machine(monkeypatch):
    """Answers about the machine are fixed, so an example behaves the same everywhere (and fast)."""
    monkeypatch.setattr(config_module, "cuda_available", lambda: False)
    monkeypatch.setattr(config_module, "_tracker_installed", lambda tracker: True)


@pytest.fixture
def examples():
    """`examples(n)`: hypothesis settings for n examples, 25 times as many in the long form."""
    def make(count: int = 200) -> settings:
        return settings(max_examples=count * (25 if long_form() else 1), deadline=None, database=None,
                        print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    return make


# --- writing TOML (independently of launcher.config.toml_value, which the round trip tests) -------------

def toml_string(text: str) -> str:
    # JSON escapes are TOML escapes; TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


class Raw(str):
    """TOML text written as is (deep nesting, which a recursive writer could not write)."""


def toml(value) -> str:
    if isinstance(value, Raw):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr: inf, -inf, 1e+16, 5e-324
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def document(sections: dict[str, dict], top: dict | None = None) -> str:
    lines = [f"{toml_key(k)} = {toml(v)}" for k, v in (top or {}).items()]
    for name, values in sections.items():
        lines.append(f"[{toml_key(name)}]")
        lines += [f"{toml_key(k)} = {toml(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


# --- strategies ---------------------------------------------------------------------------------------

# Text a UTF-8 file can hold (no lone surrogates), and of that what a path can hold (no NUL).
UNICODE = st.characters(exclude_categories=("Cs",))
PATH_CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


def long_text(alphabet=UNICODE, max_size: int = 20_000) -> st.SearchStrategy[str]:
    """Strings of 1k to `max_size` characters, built without asking hypothesis for that many draws."""
    return st.builds(lambda piece, n: (piece * n)[:n], st.text(alphabet, min_size=1, max_size=8),
                     st.integers(1000, max_size))


ODD_NUMBERS = [0, -1, 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**23,
               10**400, -(10**400), 1e13, 1e308, 5e-324, -0.0, math.inf, -math.inf, math.nan, 0.5, 1.0, 10.0]
numbers = st.one_of(st.integers(), st.floats(), st.sampled_from(ODD_NUMBERS),
                    st.integers(-(10**4000), 10**4000))
scalars = st.one_of(numbers, st.booleans(), st.text(UNICODE, max_size=30), long_text(), st.dates(), st.times(),
                    st.datetimes())
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(UNICODE, max_size=10), inner, max_size=4), max_leaves=12)
# Deep nesting, which tomllib reads through recursion.
deep = st.builds(lambda depth, table, leaf: Raw(("{a = " if table else "[") * depth + toml(leaf)
                                                + ("}" if table else "]") * depth),
                 st.integers(10, 3000), st.booleans(), scalars)
SECTION_NAMES = st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(UNICODE, max_size=12))


def field_types(cls: type) -> dict[str, tuple[dataclasses.Field, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


FIELDS = {name: field_types(cls) for name, cls in SECTIONS.items()}


def table_class(tp) -> type | None:
    """The dataclass of a list-of-tables key (`[[data.sources]]`), else None."""
    args = typing.get_args(tp)
    return args[0] if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]) else None


def in_range(f: dataclasses.Field, tp) -> st.SearchStrategy:
    """Values of a field that its type and range allow (cross-field rules aside)."""
    meta = f.metadata
    if tp is int:
        low = meta["ge"] if meta.get("ge") is not None else meta["gt"] + 1
        high = meta["le"] if meta.get("le") is not None else meta["lt"] - 1
        return st.one_of(st.integers(low, high), st.sampled_from([low, high]))
    if tp is float or tp == list[float]:
        low = meta["ge"] if meta.get("ge") is not None else meta["gt"]
        high = meta["le"] if meta.get("le") is not None else meta["lt"]
        floats = st.floats(low, high, exclude_min=meta.get("gt") is not None, exclude_max=meta.get("lt") is not None)
        ints = st.integers(math.ceil(low), math.floor(high)).filter(
            lambda v: (meta.get("gt") is None or v > meta["gt"]) and (meta.get("lt") is None or v < meta["lt"]))
        one = st.one_of(floats, ints)
        return st.lists(one, min_size=2, max_size=2) if tp == list[float] else one
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if f.name == "report_to":
        return st.lists(st.sampled_from(TRACKERS), max_size=3)
    if f.name == "target_modules":
        return st.one_of(st.just("all-linear"), st.lists(st.text(UNICODE, max_size=20), max_size=3))
    if tp is str:
        # Paths: anything but NUL (which no file system takes); the rest: any text.
        text = st.text(PATH_CHARACTERS, max_size=40)
        # Long ones too, short enough that a job of them stays under the 1 MiB a job file may have.
        return st.one_of(text, long_text(PATH_CHARACTERS, 5_000)) if f.name not in (
            "model_path", "dataset_path", "output_dir") else text.filter(bool)
    if tp == list[str]:
        return st.lists(st.text(UNICODE, max_size=30), max_size=4)
    if tp == dict[str, str]:
        return st.dictionaries(st.text(UNICODE, max_size=12), st.text(UNICODE, max_size=20), max_size=3)
    if table_class(tp):
        # Tables have rules of their own (each names its data, weights on all or none, no `dataset_path`
        # beside them); valid jobs leave them out, hostile ones fill them with anything (`table_lists`).
        return st.just([])
    raise AssertionError(f"no strategy for {f.name}: {tp}")


# Built once: making strategies inside a draw is what would make these tests slow.
IN_RANGE = {(section, key): in_range(*spec) for section, fields in FIELDS.items() for key, spec in fields.items()}
KEY_SETS = {section: st.sets(st.sampled_from(sorted(fields))) for section, fields in FIELDS.items()}
ANY_KEY = st.sampled_from([(section, key) for section in FIELDS for key in sorted(FIELDS[section])])


@st.composite
def valid_jobs(draw) -> dict[str, dict]:
    """A job every value of which is in range and every cross-field rule of which holds."""
    job = {}
    for section in FIELDS:
        job[section] = {key: draw(IN_RANGE[section, key]) for key in sorted(draw(KEY_SETS[section]))}
    for dotted in config_module.REQUIRED:
        section, key = dotted.split(".")
        if not job[section].get(key):
            job[section][key] = draw(IN_RANGE[section, key])
    h, lora = job["hyperparams"], job["lora"]
    if job["model"].get("load_in_4bit") or job["output"].get("merge_lora"):
        lora["enabled"] = True
    if isinstance(lora.get("target_modules"), str):
        lora["target_modules"] = "all-linear"
    if h.get("eval_steps", 0) > 0 and not job["data"].get("validation_path"):
        job["monitoring"]["validation_split"] = 0.5
    if h.get("max_steps", -1) <= 0 and h.get("num_epochs", 1) <= 0:
        h["num_epochs"] = 1
    data = job["data"]
    if data.get("streaming"):  # a stream has no length, and no fixed set of examples to hold out
        if h.get("max_steps", -1) <= 0:
            h["max_steps"] = 1
        if not (data.get("validation_path") or data.get("validation_split_name")):
            job["monitoring"].pop("validation_split", None)
            h.pop("eval_steps", None)
    return {name: values for name, values in job.items() if values}


WRONG_VALUES = st.one_of(anything, numbers, deep)


def table_lists(cls: type) -> st.SearchStrategy[list[dict]]:
    """Lists of tables of `cls`'s keys (and unknown ones), each value in range or anything at all."""
    fields = field_types(cls)
    values = {key: st.one_of(in_range(*spec), WRONG_VALUES) for key, spec in fields.items()}
    table = st.fixed_dictionaries({}, optional={**values, "unknown_key": anything})
    return st.lists(table, max_size=3)


TABLE_LISTS = {(section, key): table_lists(table_class(tp)) for section, fields in FIELDS.items()
               for key, (_, tp) in fields.items() if table_class(tp)}


@st.composite
def hostile_jobs(draw) -> tuple[str, bool]:
    """(TOML text, check_environment) of a job that may be wrong in any number of ways."""
    job = draw(valid_jobs())
    for _ in range(draw(st.integers(0, 4))):
        section, key = draw(ANY_KEY)
        job.setdefault(section, {})[key] = draw(st.one_of(WRONG_VALUES, IN_RANGE[section, key]))
    for (section, key), tables in TABLE_LISTS.items():  # [[data.sources]]
        if draw(st.integers(0, 3)) == 0:
            job.setdefault(section, {})[key] = draw(tables)
            if draw(st.booleans()):
                job[section].pop("dataset_path", None)
    if draw(st.booleans()):  # unknown keys, sections and tables
        for _ in range(draw(st.integers(1, 3))):
            section = draw(SECTION_NAMES)
            job.setdefault(section, {})[draw(st.text(UNICODE, max_size=12))] = draw(anything)
    if draw(st.integers(0, 9)) == 0:  # a required key missing
        dotted = draw(st.sampled_from(config_module.REQUIRED))
        job.get(dotted.split(".")[0], {}).pop(dotted.split(".")[1], None)
    top = {}
    if draw(st.integers(0, 4)) == 0:  # keys before the first section
        top = draw(st.dictionaries(st.text(UNICODE, max_size=10), anything, max_size=2))
        top = {k: v for k, v in top.items() if k not in job}  # a key twice is a TOML error tested elsewhere
    text = document(job, top)
    if draw(st.integers(0, 4)) == 0:
        text = "\ufeff" + text
    return text, draw(st.booleans())


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def check_loaded(config: JobConfig) -> None:
    """An accepted job holds only values its keys allow."""
    for section, fields in FIELDS.items():
        check_numbers(getattr(config, section), fields)
        for key, (_, tp) in fields.items():
            for table in getattr(getattr(config, section), key) if table_class(tp) else []:
                check_numbers(table, field_types(table_class(tp)))


def check_numbers(table, fields: dict[str, tuple[dataclasses.Field, typing.Any]]) -> None:
    """Every number of one table (a section, or one of `[[data.sources]]`) is finite and in its range."""
    for key, (f, tp) in fields.items():
        value = getattr(table, key)
        where = (type(table).__name__, key, value)
        for number in (value if tp == list[float] else [value] if tp in (int, float) else []):
            assert type(number) is (int if tp is int else float), where
            assert math.isfinite(number), where
            meta = f.metadata
            assert meta.get("ge") is None or number >= meta["ge"], where
            assert meta.get("gt") is None or number > meta["gt"], where
            assert meta.get("le") is None or number <= meta["le"], where
            assert meta.get("lt") is None or number < meta["lt"], where


def load_or_refuse(path: Path, **kwargs) -> JobConfig | None:
    """`load_config`, which may refuse (ConfigError, with a message that names the file) but nothing else."""
    try:
        config = load_config(path, **kwargs)
    except ConfigError as error:
        message = str(error)
        assert message.startswith(f"{path}"), message[:300]
        assert len(message) < 50_000, "a refusal lists at most 50 problems, each cut short"
        return None
    check_loaded(config)
    return config


# --- the properties -------------------------------------------------------------------------------------

def test_every_valid_job_loads_and_round_trips(tmp_path, examples):
    @examples()
    @given(valid_jobs())
    def check(job):
        with tempfile.TemporaryDirectory(dir=tmp_path) as first, tempfile.TemporaryDirectory(dir=tmp_path) as second:
            path = Path(first) / "job.toml"
            path.write_text(document(job), encoding="utf-8")
            config = load_config(path, check_environment=False)
            check_loaded(config)
            again_path = Path(second) / "job.toml"
            again_path.write_text(config.to_toml(), encoding="utf-8")
            assert load_config(again_path, check_environment=False) == config
            assert snapshot(Path(first)) == {"job.toml"}

    check()


@contextlib.contextmanager
def job_folder(tmp_path: Path, text: str):
    """A fresh folder holding `text` as job.toml (any code points, lone surrogates too) and a
    one-record train.jsonl; yields the folder and the job's path."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        folder = Path(folder)
        (folder / "train.jsonl").write_text('{"text": "hi"}\n')
        path = folder / "job.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        yield folder, path


def test_any_job_document_loads_or_is_refused_with_a_config_error(tmp_path, examples):
    @examples()
    @given(hostile_jobs())
    def check(case):
        text, check_environment = case
        with job_folder(tmp_path, text) as (folder, path):
            before = snapshot(folder)
            load_or_refuse(path, check_environment=check_environment)
            # Nothing created: neither the output folder (relative paths land in this folder) nor a cache.
            assert snapshot(folder) == before, "loading a job wrote into its folder"

    check()


def mutations(text: str) -> st.SearchStrategy[bytes]:
    """Bytes near a valid job: cut, spliced, re-encoded, or prefixed with a byte-order mark."""
    data = text.encode()

    def splice(at: int, cut: int, insert: bytes) -> bytes:
        at = at % (len(data) + 1)
        return data[:at] + insert + data[at + cut:]

    return st.one_of(
        st.builds(splice, st.integers(0, len(data)), st.integers(0, 20), st.binary(max_size=20)),
        st.builds(lambda n: data[:n], st.integers(0, len(data))),
        st.sampled_from([b"\xef\xbb\xbf" + data, text.encode("utf-16"), text.encode("utf-32"), data * 3,
                         data.replace(b"\n", b"\r\n"), data.replace(b"\n", b"\r"), b"\x00" + data]),
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


VALID_TEXT = document({"model": {"model_path": "Qwen/Qwen3-0.6B"}, "data": {"dataset_path": "train.jsonl"},
                       "output": {"output_dir": "out"}, "hyperparams": {"batch_size": 2, "learning_rate": 1e-4}})


def test_any_bytes_as_a_job_file_load_or_are_refused_with_a_config_error(tmp_path, examples):
    @examples()
    @given(mutations(VALID_TEXT), st.booleans())
    def check(data, check_environment):
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            path = Path(folder) / "job.toml"
            path.write_bytes(data)
            (Path(folder) / "train.jsonl").write_text('{"text": "hi"}\n')
            load_or_refuse(path, check_environment=check_environment)
            assert not (Path(folder) / "out").exists()

    check()


def test_any_set_override_loads_or_is_refused_with_a_config_error(tmp_path, examples):
    keys = st.one_of(st.sampled_from([f"{s}.{k}" for s in FIELDS for k in FIELDS[s]]), st.text(UNICODE, max_size=30))
    raw_values = st.one_of(numbers.map(toml), st.text(UNICODE, max_size=50), anything.map(toml), deep.map(toml),
                           st.just("1" * 5000), st.just("[" * 3000))

    @examples()
    @given(st.lists(st.tuples(keys, raw_values).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(UNICODE, max_size=40),
                    max_size=4))
    def check(items):
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            path = Path(folder) / "job.toml"
            path.write_text(VALID_TEXT, encoding="utf-8")
            (Path(folder) / "train.jsonl").write_text('{"text": "hi"}\n')
            try:
                overrides = dict(parse_override(item) for item in items)
            except ConfigError:
                return
            load_or_refuse(path, overrides=overrides)

    check()


def yaml_documents() -> st.SearchStrategy[bytes]:
    """Accelerate config files: YAML of arbitrary structure around the keys Accelerate and the job check read."""
    import yaml

    keys = st.sampled_from(["distributed_type", "mixed_precision", "num_processes", "num_machines", "machine_rank",
                            "main_process_port", "deepspeed_config", "fsdp_config", "compute_environment",
                            "dynamo_config", "other"])
    ds_keys = st.sampled_from(["gradient_accumulation_steps", "gradient_clipping", "zero_stage", "other"])
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(UNICODE, max_size=20),
                       st.sampled_from(["auto", "no", "fp16", "bf16", "FSDP", "DEEPSPEED", "MULTI_CPU", "MULTI_GPU"]))
    json_like = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(UNICODE, max_size=8), inner, max_size=3), max_leaves=8)
    deepspeed = st.one_of(json_like, st.dictionaries(ds_keys, json_like, max_size=3))
    mapping = st.dictionaries(keys, json_like, max_size=5).flatmap(
        lambda d: deepspeed.map(lambda ds: {**d, "deepspeed_config": ds}) if "deepspeed_config" in d else st.just(d))
    dumped = st.one_of(mapping, json_like).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode())
    return st.one_of(dumped, st.binary(max_size=100), st.text(UNICODE, max_size=100).map(str.encode),
                     st.integers(10, 200).map(lambda n: b"a: " + b"[" * n + b"]" * n))


def test_any_accelerate_config_loads_or_is_refused_with_a_config_error(tmp_path, examples):
    @examples()
    @given(yaml_documents(), st.booleans())
    def check(yaml_data, bf16):
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            folder = Path(folder)
            (folder / "accel.yaml").write_bytes(yaml_data)
            (folder / "train.jsonl").write_text('{"text": "hi"}\n')
            path = folder / "job.toml"
            path.write_text(document({
                "model": {"model_path": "Qwen/Qwen3-0.6B"}, "data": {"dataset_path": "train.jsonl"},
                "output": {"output_dir": "out"}, "launch": {"accelerate_config": "accel.yaml"},
                "hyperparams": {"fp_precision": "bf16" if bf16 else "fp32"}}), encoding="utf-8")
            load_or_refuse(path)

    check()


# The cases of issue #14, first, then whatever hypothesis makes.
ISSUE_CASES = [
    ("hyperparams", "seed", 2**32), ("launch", "timeout_minutes", 10**13), ("launch", "timeout_minutes", 1e13),
    ("hyperparams", "batch_size", 99999999999999999999999), ("hyperparams", "learning_rate", 10**400),
    ("hyperparams", "learning_rate", math.nan), ("hyperparams", "num_epochs", math.inf),
    ("hyperparams", "gradient_accumulation", 2**64), ("data", "max_length", 2**40),
]


def run_cli(args: list[str]) -> tuple[int, str]:
    from launcher.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("section,key,value", ISSUE_CASES, ids=[f"{s}.{k}={v!r:.20}" for s, k, v in ISSUE_CASES])
def test_the_issue_cases_exit_2_naming_the_key(tmp_path, monkeypatch, section, key, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "job.toml"
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    job = {"model": {"model_path": "no-such-model"}, "data": {"dataset_path": "train.jsonl"},
           "output": {"output_dir": "out"}}
    job.setdefault(section, {})[key] = value
    path.write_text(document(job), encoding="utf-8")
    code, text = run_cli(["validate", str(path)])
    assert code == 2, text[-2000:]
    assert f"{section}.{key}" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_the_cli_answers_0_or_2_never_a_traceback_and_creates_no_output_folder(tmp_path, monkeypatch, examples):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    @examples(100)
    @given(hostile_jobs())
    @example(("\ufeff[model]\nmodel_path = \"x\"\n", True))
    @example(("", True))
    @example(("[launch]\ntimeout_minutes = 10000000000000\n", True))
    def check(case):
        text, _ = case
        # The model must not load (seconds each): pin model_path to a folder that does not exist.
        text = re.sub(r"(?m)^model_path = .*$", 'model_path = "no-such-model"', text)
        text = re.sub(r"(?m)^tokenizer_path = .*$", "", text)
        with job_folder(tmp_path, text) as (folder, path):
            before = snapshot(folder)
            code, output = run_cli(["validate", str(path)])
            assert code in (0, 2), output[-3000:]
            assert "Traceback" not in output, output[-3000:]
            assert snapshot(folder) == before, "a refused job wrote into its folder"

    check()
