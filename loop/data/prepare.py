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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from loop.data.render import IGNORE_INDEX, DataError, Renderer, TemplateError, render_text
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
    """Parse a JSONL file and apply the profile; bad lines raise `DataError` or are counted."""
    records = Records(path=str(path))
    with open_data_file(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            index = records.num_read
            records.num_read += 1
            try:
                payload = _transform(raw, line_number, index, profile, system_prompt)
            except _BadRecord as bad:
                if on_bad_record == "error":
                    raise DataError(f"{path}:{line_number}: {bad.message}. {_SKIP_HINT}") from None
                records.drop(line_number, bad.reason, bad.message)
                continue
            records.lines.append(line_number)
            records.payloads.append(payload)
    return records


class _BadRecord(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _transform(raw: bytes, line_number: int, index: int, profile: Profile, system_prompt: str) -> str:
    try:
        # utf-8-sig: a byte-order mark on the first line is not part of the JSON.
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8").rstrip("\r\n")
        record = json.loads(text)
    except UnicodeDecodeError as error:
        raise _BadRecord("invalid_json", f"not UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise _BadRecord("invalid_json", f"invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        raise _BadRecord("invalid_record", f"expected a JSON object, got {type(record).__name__}")
    try:
        example = profile.transform_example(record, index, system_prompt)
        if not isinstance(example, dict) or not ("messages" in example or "text" in example):
            raise RecordError(f"the profile returned {type(example).__name__}, expected "
                              '{"messages": [...]} or {"text": "..."}')
        if "messages" in example:
            check_messages(example["messages"], profile.roles)
            return json.dumps({"messages": example["messages"]}, ensure_ascii=False)
        if not isinstance(example["text"], str):
            raise RecordError(f"`text` must be a string, got {type(example['text']).__name__}")
        return json.dumps({"text": example["text"]}, ensure_ascii=False)
    except RecordError as error:
        raise _BadRecord("invalid_record", str(error)) from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        # A user profile that trips over an unexpected record: the record is what is reported.
        raise _BadRecord("invalid_record", f"the profile raised {type(error).__name__}: {error}") from None


# --- 2. tokenizing -----------------------------------------------------------------------------

@dataclass
class Settings:
    """What decides the tokens of an example; passed to the worker processes."""
    train_on: str
    max_length: int
    too_long: str


def tokenize_records(records: Records, tokenizer, settings: Settings, num_proc: int, fingerprint: str):
    """A `datasets.Dataset` with `input_ids`, `labels`, `line`, `status` ("" = kept), `truncated`."""
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
    payloads = [json.loads(p) for p in batch["payload"]]
    chats = [p["messages"] for p in payloads if "messages" in p]
    rendered = iter(Renderer(tokenizer, settings.train_on).render_conversations(chats) if chats else [])
    out: dict[str, list] = {"line": batch["line"], "input_ids": [], "labels": [], "status": [], "truncated": []}
    for payload in payloads:
        try:
            result = render_text(tokenizer, payload["text"]) if "text" in payload else next(rendered)
        except Exception as error:  # a tokenizer that refuses this text: a problem of the record
            result = RecordError(f"cannot tokenize the text: {type(error).__name__}: {error}")
        ids, labels, status, truncated = _fit(result, settings)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["truncated"].append(truncated)
    return out


def _fit(result, settings: Settings) -> tuple[list[int], list[int], str, bool]:
    """Apply max_length and the no-trained-tokens rule: (ids, labels, status, truncated)."""
    if isinstance(result, TemplateError):
        return [], [], f"template:{result}", False
    if isinstance(result, Exception):
        return [], [], f"invalid_record:{result}", False
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
    """The kept rows of `tokenized` (input_ids, labels only); drops are counted into `records`."""
    if tokenized is None:
        return None, 0
    # Whole columns through Arrow: `dataset[column]` would convert row by row.
    table = tokenized.select_columns(["status", "line", "truncated"]).with_format("arrow")[:]
    statuses = table.column("status").to_pylist()
    kept = [row for row, status in enumerate(statuses) if not status]
    lines = table.column("line").to_pylist() if len(kept) < len(statuses) else []
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
