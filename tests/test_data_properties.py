"""Property tests of the record reader: whatever a JSONL file holds, reading and tokenizing it either
succeeds (every record kept or counted) or is refused naming `file:line`, never another exception.

    pytest tests/test_data_properties.py -q                          # 200 files, and 30 `validate` runs
    pytest tests/test_data_properties.py -q --long                   # ten times as many (TRAINER_ENGINE_LONG=1)

Files mix valid chat, text and ShareGPT records with broken ones: wrong types, missing keys, lone
surrogates, emoji, control characters and NUL, special-token text, deep nesting, integers of
thousands of digits, long strings, lines over the reader's size limit, blank lines, invalid JSON,
byte-order marks and bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import loop.data.prepare as prepare
from launcher.config import ConfigError
from loop.data import IGNORE_INDEX
from loop.data.prepare import Settings, keep_usable, read_records, tokenize_records
from profiles import get_profile
from helpers import long_form

MAX_LINE_BYTES = 20_000
"""The reader's line limit during these tests (64 MiB in use), so that lines over it are cheap to make."""
SETTINGS = Settings(train_on="assistant", max_length=64, too_long="truncate")


def examples(default: int) -> int:
    return default * 10 if long_form() else default


# --- what a file may hold ----------------------------------------------------------------------

ODD_TEXT = ["<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "\x00", "\ufeff", "\u2028", "\r", "\x1b[2J",
            "\ud800", "\udfff", "\ud83d\ude00", "😀", "👩‍👩‍👧", "{{ messages }}", "{% generation %}", "\\", '"']
texts = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12),  # any code point, lone surrogates included
    st.lists(st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=4)), max_size=4).map("".join),
    st.builds(lambda n: "long " * n, st.integers(50, 1500)),  # past max_length, under MAX_LINE_BYTES
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
roles = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", "User"])
messages = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": texts}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.lists(json_values, max_size=2)}),
    st.dictionaries(st.sampled_from(["role", "content", "name", "weight"]), json_values, max_size=4),
    json_values,
)
chat_records = st.one_of(
    st.builds(lambda user, reply: {"messages": [{"role": "user", "content": user},
                                                {"role": "assistant", "content": reply}]}, texts, texts),
    st.fixed_dictionaries({"messages": st.lists(messages, max_size=4)}),
    st.fixed_dictionaries({"messages": json_values}),
)
sharegpt_records = st.fixed_dictionaries({"conversations": st.lists(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "martian"]) | json_values,
                           "value": texts | json_values}), max_size=3)})
records = st.one_of(chat_records, sharegpt_records, st.fixed_dictionaries({"text": texts | json_values}),
                    st.dictionaries(texts, json_values, max_size=3), json_values)


def _deep(depth: int, inner: str = "") -> str:
    return "[" * depth + inner + "]" * depth


def _as_line(record, ensure_ascii: bool) -> bytes:
    # Without ensure_ascii a lone surrogate is written as raw bytes (CESU): not UTF-8, as some tools do.
    return json.dumps(record, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


good_lines = st.builds(_as_line, records, st.booleans())
broken_lines = st.one_of(
    st.builds(lambda n: b'{"messages": [{"role": "user", "content": "Hi"}], "id": ' + b"9" * n + b"}",
              st.integers(4000, 6000)),
    st.builds(lambda n: _deep(n).encode(), st.sampled_from([5, 500, 900, 990, 1000, 3000, 100_000])),
    st.builds(lambda n: ('{"messages": [{"role": "user", "content": "Hi", "meta": ' + _deep(n) + '}, '
                         '{"role": "assistant", "content": "A"}]}').encode(),
              st.sampled_from([500, 900, 980, 990, 5000])),  # read, but maybe not read back deeper in the stack
    st.builds(lambda n: _as_line({"messages": [{"role": "user", "content": "x" * n},
                                               {"role": "assistant", "content": "y"}]}, True),
              st.integers(MAX_LINE_BYTES - 100, MAX_LINE_BYTES + 100)),
    st.builds(lambda line, cut: line[:cut], good_lines, st.integers(0, 40)),  # a torn line
    st.builds(lambda line: b"\xef\xbb\xbf" + line, good_lines),                # a byte-order mark
    st.binary(max_size=30).filter(lambda b: b"\n" not in b),
    st.sampled_from([b"", b"   ", b"\t", b"\x00", b"null", b"[]", b"{}", b'"\\ud800"', b"NaN", b"1e999", b"{,}",
                     b'{"messages": null}', b'{"messages": "hi"}']),
)
valid_records = {  # per profile, records it can use unless their text is unusable
    "chat": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": texts}), min_size=1, max_size=4).map(
        lambda conversation: {"messages": conversation}),
    "text": st.fixed_dictionaries({"text": texts}),
    "sharegpt": st.fixed_dictionaries({"conversations": st.tuples(texts, texts).map(
        lambda pair: [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}])}),
}


@st.composite
def files(draw, profile=None):
    """`(profile, lines, newline, ends with a newline)`: valid lines for the profile, others, broken ones."""
    profile = profile or draw(st.sampled_from(["chat", "chat", "text", "sharegpt"]))
    valid = st.builds(_as_line, valid_records[profile], st.just(True))
    lines = draw(st.lists(valid, min_size=1, max_size=6)
                 | st.lists(st.one_of(valid, valid, good_lines, broken_lines), min_size=1, max_size=8))
    return profile, lines, draw(st.sampled_from([b"\n", b"\r\n"])), draw(st.booleans())


def _write(folder: Path, lines: list[bytes], newline: bytes, ends_with_newline: bool) -> Path:
    path = folder / "train.jsonl"
    path.write_bytes(newline.join(lines) + (newline if ends_with_newline else b""))
    return path


# --- reading and tokenizing ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _read(path: Path, profile: str, on_bad_record: str, tokenizer):
    """(records, kept rows or None), or the ConfigError the reader refused the file with."""
    try:
        records = read_records(path, get_profile(profile), "", on_bad_record)
        rows = tokenize_records(records, tokenizer, SETTINGS, num_proc=1, fingerprint="property")
        kept, _ = keep_usable(rows, records, on_bad_record)
    except ConfigError as error:
        return error
    return records, kept


def _refused_line(error: ConfigError, path: Path, num_lines: int) -> int:
    match = re.match(rf"{re.escape(str(path))}:(\d+): ", str(error))
    assert match, f"the refusal names no file:line: {error}"
    assert 'on_bad_record = "skip"' in str(error)
    line = int(match.group(1))
    assert 1 <= line <= num_lines
    return line


def _check_success(records, kept) -> list[tuple]:
    rows = [] if kept is None else [(tuple(r["input_ids"]), tuple(r["labels"])) for r in kept]
    assert len(rows) + sum(records.dropped.values()) == records.num_read
    assert records.num_special_text <= len(rows)
    for ids, labels in rows:
        assert 0 < len(ids) == len(labels) <= SETTINGS.max_length
        assert any(label != IGNORE_INDEX for label in labels)
    return rows


@settings(max_examples=examples(200), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(file=files())
def test_reading_any_file_keeps_counts_or_refuses_a_line(tokenizer, file):
    profile, lines, newline, ends_with_newline = file
    num_lines = len(lines)
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(prepare, "MAX_LINE_BYTES", MAX_LINE_BYTES):
        path = _write(Path(folder), lines, newline, ends_with_newline)
        skipped = _read(path, profile, "skip", tokenizer)
        strict = _read(path, profile, "error", tokenizer)

    # Under "skip" every record is kept or counted (a ConfigError here could only be the template's).
    if isinstance(skipped, ConfigError):
        _refused_line(skipped, path, num_lines)
        return
    records, kept = skipped
    skipped_rows = _check_success(records, kept)
    problem_lines = {int(problem[len(f"{path}:"):].split(":", 1)[0]) for problem in records.problems}

    # Under "error" the same file either passes with the same rows, or stops at a line "skip" counted.
    if isinstance(strict, ConfigError):
        assert _refused_line(strict, path, num_lines) in problem_lines
        assert set(records.dropped) & {"invalid_json", "invalid_record", "too_large"}
    else:
        assert _check_success(*strict) == skipped_rows
        assert set(strict[0].dropped) <= {"too_long", "no_trained_tokens"}
    event(f"error: {'refused' if isinstance(strict, ConfigError) else 'passed'}; "
          f"skip: {'kept some' if skipped_rows else 'kept none'}")
    for reason in records.dropped:
        event(f"dropped: {reason}")


# --- the command line ----------------------------------------------------------------------------

@settings(max_examples=examples(30), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])  # make_job and capfd hold no state
@given(file=files(profile="chat"), on_bad_record=st.sampled_from(["error", "skip"]))
def test_validate_exits_0_or_2_and_never_shows_a_traceback(make_job, capfd, file, on_bad_record):
    from launcher.cli import main

    _, lines, newline, ends_with_newline = file
    with tempfile.TemporaryDirectory() as folder:
        make_job(folder, records=[], **{"data.on_bad_record": on_bad_record, "data.max_length": 64})
        _write(Path(folder), lines, newline, ends_with_newline)
        capfd.readouterr()
        with mock.patch.object(prepare, "MAX_LINE_BYTES", MAX_LINE_BYTES):
            code = main(["validate", str(Path(folder) / "job.toml")])
        out, err = capfd.readouterr()
    event(f"validate exit code {code}")
    assert code in (0, 2), err[-2000:]
    assert "Traceback" not in out + err
    if code == 2:
        assert f"{Path(folder) / 'train.jsonl'}" in err
