"""JSONL file -> tokenized, split, packed datasets, cached by fingerprint.

Used through `loop.data.build_datasets`; the steps, in order:

1. `read_records`: parse each line, apply the profile, check the messages. A bad line stops the
   job (`data.on_bad_record = "error"`) with its file and line, or is counted (`"skip"`).
2. `tokenize_records`: render through the chat template with `datasets.Dataset.map(batched=True,
   num_proc=data.num_proc)`; truncate or drop long examples, drop those with nothing to train.
3. `split_validation`: `data.validation_path`, else `monitoring.validation_split` by seed.
4. `pack`: best-fit-decreasing packing with `position_ids` restarting at 0 per example.
The result is cached by `loop.data.cache` under `data.cache_dir/<fingerprint>/`, so the next run
with the same data, tokenizer and settings loads it instead.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from launcher.config import ConfigError
from loop.data.render import IGNORE_INDEX, DataError, Renderer, TemplateError, render_text, special_token_pattern
from loop.data.report import MAX_PROBLEMS, DataReport
from profiles import Profile, RecordError, check_messages

logger = logging.getLogger(__name__)

_SKIP_HINT = 'Fix the record, or set data.on_bad_record = "skip" to skip bad records (they are counted).'


# --- 1. reading --------------------------------------------------------------------------------

@dataclass
class Records:
    """The usable records of one file, as JSON payloads for the tokenizing step."""
    path: str
    lines: list[int] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)
    num_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    num_special_text: int = 0
    """Kept records whose text holds a special token's text (see `DataReport.num_special_text`)."""
    special_text_example: str = ""

    def drop(self, line: int, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{self.path}:{line}: {message}")


def open_data_file(path: str | Path):
    """The data file opened for reading, or a `DataError` (exit 2) saying why it cannot be read."""
    try:
        return open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read the data file ({error.strerror or error}); check that "
                        "data.dataset_path / data.validation_path name a readable JSONL file") from None


def read_records(path: str | Path, profile: Profile, system_prompt: str, on_bad_record: str) -> Records:
    """Parse a JSONL file and apply the profile; bad lines raise `DataError` or are counted.

    Every way a line can be unusable (not UTF-8, invalid or unreadable JSON, not an object, a
    record the profile rejects, text that is not valid Unicode, a line over `MAX_LINE_BYTES`) is a
    bad record of that line, never an exception of another kind.
    """
    records = Records(path=str(path))
    with open_data_file(path) as handle:
        for line_number, raw in _lines(handle):
            if raw is not None and not raw.strip():
                continue
            index = records.num_read
            records.num_read += 1
            try:
                if raw is None:
                    raise _BadRecord("too_large", f"the line is longer than {MAX_LINE_BYTES >> 20} MiB")
                payload = _transform(raw, line_number, index, profile, system_prompt)
            except _BadRecord as bad:
                message = printable(bad.message)
                if on_bad_record == "error":
                    raise DataError(f"{path}:{line_number}: {message}. {_SKIP_HINT}") from None
                records.drop(line_number, bad.reason, message)
                continue
            records.lines.append(line_number)
            records.payloads.append(payload)
    return records


MAX_LINE_BYTES = 64 << 20
"""Longest line read: far more text than any example's `max_length` holds, so a longer one is a
broken file (e.g. no newlines), refused without holding it in memory."""


def _lines(handle):
    """`(line number, bytes)` per line of a binary file; `None` for a line over `MAX_LINE_BYTES`."""
    line_number = 0
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        line_number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded pieces
                raw = handle.readline(1 << 20)
            raw = None
        yield line_number, raw


def printable(message: str, limit: int = 500) -> str:
    """`message` safe to print and store: control characters and lone surrogates escaped, at most
    `limit` characters (a record's value quoted in a message may be megabytes long)."""
    if len(message) > limit:
        message = f"{message[:limit]}... ({len(message)} characters)"
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _transform(raw: bytes, line_number: int, index: int, profile: Profile, system_prompt: str) -> str:
    """The record of one line as the JSON payload the tokenizing step reads; `_BadRecord` if unusable."""
    try:
        # utf-8-sig: a byte-order mark on the first line is not part of the JSON.
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").rstrip("\r\n")
        record = json.loads(text)
    except UnicodeDecodeError as error:
        raise _BadRecord("invalid_json", f"not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise _BadRecord("invalid_json", f"invalid JSON: {error.msg} at column {error.colno}") from None
    except RecursionError:
        raise _BadRecord("invalid_json", "JSON nested too deeply to read (about 1000 levels or more); "
                                         "flatten the record") from None
    except ValueError as error:
        if "integer string conversion" in str(error):  # Python reads integers of at most 4300 digits
            raise _BadRecord("invalid_json", "unreadable JSON: a number of more than 4300 digits; write it as "
                                             "a string or remove it") from None
        raise _BadRecord("invalid_json", f"unreadable JSON: {error}") from None
    if not isinstance(record, dict):
        raise _BadRecord("invalid_record", f"expected a JSON object, got {type(record).__name__}")
    try:
        example = profile.transform_example(record, index, system_prompt)
        if not isinstance(example, dict) or not ("messages" in example or "text" in example):
            raise RecordError(f"the profile returned {type(example).__name__}, expected "
                              '{"messages": [...]} or {"text": "..."}')
        if "messages" in example:
            check_messages(example["messages"], profile.roles)
            payload = {"messages": example["messages"]}
        elif isinstance(example["text"], str):
            payload = {"text": example["text"]}
        else:
            raise RecordError(f"`text` must be a string, got {type(example['text']).__name__}")
    except RecordError as error:
        raise _BadRecord("invalid_record", str(error)) from None
    except Exception as error:
        # A user profile that trips over an unexpected record: the record is what is reported.
        raise _BadRecord("invalid_record", f"the profile raised {type(error).__name__}: {error}") from None
    try:
        text = json.dumps(payload, ensure_ascii=False)
    except RecursionError:
        raise _BadRecord("invalid_record", "the messages are nested too deeply to store; flatten them") from None
    except (TypeError, ValueError) as error:  # a user profile that returned something JSON cannot hold
        raise _BadRecord("invalid_record", f"the profile returned a value JSON cannot hold: {error}") from None
    if not _is_utf8(text):
        # json.loads accepts an escape like "\ud800" without its pair; no tokenizer or Arrow file can hold it.
        raise _BadRecord("invalid_record", f"{_lone_surrogate(payload)} holds a lone UTF-16 surrogate (an escape "
                                           "like \\ud800 without its pair), which is not Unicode text; remove it "
                                           "or write the whole pair")
    return text


def _lone_surrogate(payload: dict) -> str:
    """Where the first string holding a lone surrogate is, e.g. `messages[1].content`."""
    stack: list[tuple[Any, str]] = [(payload, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str) and not _is_utf8(value):
            return where
        if isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if isinstance(key, str) and not _is_utf8(key):
                    return f"a key of {where or 'the record'}"
                stack.append((item, f"{where}.{key}" if where else str(key)))
        elif isinstance(value, list):
            stack += [(item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value)))]
    return "the record"


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- 2. tokenizing -----------------------------------------------------------------------------

@dataclass
class Settings:
    """What decides the tokens of an example; passed to the worker processes."""
    train_on: str
    max_length: int
    too_long: str


def tokenize_records(records: Records, tokenizer, settings: Settings, num_proc: int, fingerprint: str):
    """A `datasets.Dataset` with `input_ids`, `labels`, `line`, `status` ("" = kept), `truncated` and
    `special_text` (where the record's text holds a special token's text, "" if nowhere)."""
    import datasets

    table = datasets.Dataset.from_dict({"line": records.lines, "payload": records.payloads})
    if len(table) == 0:
        return None
    features = datasets.Features({
        "line": datasets.Value("int64"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "status": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "special_text": datasets.Value("string"),
    })
    batch_size = 500
    # A process per batch at most: start-up costs more than a few hundred records take.
    num_proc = max(1, min(num_proc, -(-len(table) // batch_size)))
    if num_proc > 1:
        # The workers are forked; a tokenizer that already used its Rust thread pool would warn and
        # turn parallelism off in each of them. One thread per worker is what we want anyway.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return table.map(
        _tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings}, remove_columns=["payload"],
        features=features, new_fingerprint=fingerprint, desc=f"Tokenizing {Path(records.path).name}",
    )


def _tokenize_batch(batch: dict[str, list], tokenizer, settings: Settings) -> dict[str, list]:
    """The rows of a batch. A record that fails in any way becomes a row whose status says why, so
    one record never stops the map (nor one of its worker processes)."""
    payloads = [_parse(p) for p in batch["payload"]]
    results = _render_payloads(payloads, tokenizer, settings)
    specials = special_token_pattern(tokenizer)
    out: dict[str, list] = {"line": batch["line"], "input_ids": [], "labels": [], "status": [], "truncated": [],
                            "special_text": []}
    for payload, result in zip(payloads, results):
        ids, labels, status, truncated = _fit(result, settings)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["truncated"].append(truncated)
        out["special_text"].append("" if status else _special_text(payload, specials))
    return out


def _parse(payload: str) -> dict | Exception:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as error:  # a worker's stack is deeper than the reader's was
        return RecordError(f"cannot read the record back: {type(error).__name__}: {error}")


def _render_payloads(payloads: list[dict | Exception], tokenizer, settings: Settings) -> list:
    """`(input_ids, labels)` per payload, or the exception of that record."""
    try:
        chats = [p["messages"] for p in payloads if isinstance(p, dict) and "messages" in p]
        rendered = iter(Renderer(tokenizer, settings.train_on).render_conversations(chats) if chats else [])
        results = []
        for payload in payloads:
            if isinstance(payload, Exception):
                results.append(payload)
            elif "text" in payload:
                results.append(render_text(tokenizer, payload["text"]))
            else:
                results.append(next(rendered))
        return results
    except ConfigError:
        raise  # the template or a setting, not one record
    except Exception as error:  # e.g. the tokenizer refusing a text
        if len(payloads) == 1:
            return [RecordError(f"cannot tokenize this record: {type(error).__name__}: {error}")]
        # One record broke the batch: tokenize each alone to find it.
        return [result for payload in payloads for result in _render_payloads([payload], tokenizer, settings)]


def _special_text(payload: dict, pattern: re.Pattern | None) -> str:
    """Where the record's text holds a special token's text, e.g. "messages[1].content holds '<|im_end|>'"."""
    if pattern is None:
        return ""
    if "text" in payload:
        places = [("text", payload["text"])]
    else:
        places = [(f"messages[{i}].content", m.get("content")) for i, m in enumerate(payload["messages"])]
    for where, text in places:
        match = pattern.search(text) if isinstance(text, str) else None
        if match:
            return printable(f"{where} holds {match.group()!r}")
    return ""


def _fit(result, settings: Settings) -> tuple[list[int], list[int], str, bool]:
    """Apply max_length and the no-trained-tokens rule: (ids, labels, status, truncated)."""
    if isinstance(result, TemplateError):
        return [], [], f"template:{result}", False
    if isinstance(result, Exception):
        return [], [], f"invalid_record:{printable(str(result))}", False
    ids, labels = result
    truncated = len(ids) > settings.max_length
    if truncated:
        if settings.too_long == "drop":
            return [], [], f"too_long:{len(ids)} tokens, more than data.max_length = {settings.max_length}", False
        ids, labels = ids[:settings.max_length], labels[:settings.max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return [], [], f"no_trained_tokens:no tokens to train on (profile.train_on = \"{settings.train_on}\")" \
            + (" after truncation" if truncated else ""), False
    return ids, labels, "", truncated


def keep_usable(tokenized, records: Records, on_bad_record: str):
    """The kept rows of `tokenized` (input_ids, labels only); drops and special-token text are counted
    into `records`."""
    if tokenized is None:
        return None, 0
    # Whole columns through Arrow: `dataset[column]` would convert row by row.
    table = tokenized.select_columns(["status", "line", "truncated", "special_text"]).with_format("arrow")[:]
    statuses = table.column("status").to_pylist()
    kept = [row for row, status in enumerate(statuses) if not status]
    lines = table.column("line").to_pylist()
    for row, status in enumerate(statuses):
        if not status:
            continue
        reason, _, message = status.partition(":")
        line = lines[row]
        if reason == "template":
            raise TemplateError(f"{records.path}:{line}: {message}")
        if reason == "invalid_record" and on_bad_record == "error":
            raise DataError(f"{records.path}:{line}: {message}. {_SKIP_HINT}")
        records.drop(line, reason, message)
    special = table.column("special_text").to_pylist()
    with_special = [row for row in kept if special[row]]
    records.num_special_text += len(with_special)
    if with_special and not records.special_text_example:
        row = with_special[0]
        records.special_text_example = f"{records.path}:{lines[row]}: {special[row]}"
    truncated = table.column("truncated").to_pylist()
    num_truncated = sum(truncated[row] for row in kept)
    return tokenized.select(kept).select_columns(["input_ids", "labels"]), num_truncated


# --- 3. validation split -----------------------------------------------------------------------

def split_validation(dataset, fraction: float, max_samples: int, seed: int):
    """(train, validation or None): min(max_samples, int(n * fraction)) examples chosen by `seed`."""
    num_validation = min(max_samples, int(len(dataset) * fraction))
    if num_validation == 0:
        if fraction > 0:
            logger.warning("monitoring.validation_split = %s of %d examples holds out none; no validation",
                           fraction, len(dataset))
        return dataset, None
    chosen = set(random.Random(seed).sample(range(len(dataset)), num_validation))
    train_rows = [i for i in range(len(dataset)) if i not in chosen]
    return dataset.select(train_rows), dataset.select(sorted(chosen))


# --- 4. packing --------------------------------------------------------------------------------

def pack(dataset, max_length: int):
    """Best-fit-decreasing packing into rows of at most `max_length` tokens, with `position_ids`.

    Positions restart at 0 for each example: transformers reads that as packed sequences and
    masks attention across example boundaries (sdpa/eager) or runs varlen flash attention.
    """
    import datasets
    from datasets.table import InMemoryTable

    table = dataset.with_format("arrow")[:]
    ids_column = table.column("input_ids").combine_chunks()
    labels_column = table.column("labels").combine_chunks()
    offsets = ids_column.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    bins = best_fit_decreasing(lengths.tolist(), max_length)

    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    ordered_lengths = lengths[order]
    out_starts = np.cumsum(ordered_lengths) - ordered_lengths
    total = int(ordered_lengths.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(out_starts, ordered_lengths)
    gather = np.repeat(offsets[:-1][order], ordered_lengths) + within
    bin_offsets = np.concatenate([[0], np.cumsum([int(lengths[b].sum()) for b in bins])]).astype(np.int32)

    def column(values):
        return pa.ListArray.from_arrays(pa.array(bin_offsets), pa.array(values, type=pa.int32()))

    packed = pa.table({
        "input_ids": column(ids_column.values.to_numpy()[gather]),
        "labels": column(labels_column.values.to_numpy()[gather]),
        "position_ids": column(within),
    })
    return datasets.Dataset(InMemoryTable(packed))


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the
    fullest bin it fits (ties by index, so the result depends only on the lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (space left, bin number), kept sorted: bisect finds the tightest bin that fits.
    space: list[tuple[int, int]] = []
    for i in order:
        position = bisect.bisect_left(space, (lengths[i], -1))
        if position == len(space):
            bins.append([i])
            left, number = capacity - lengths[i], len(bins) - 1
        else:
            left, number = space.pop(position)
            bins[number].append(i)
            left -= lengths[i]
        bisect.insort(space, (left, number))
    return bins
