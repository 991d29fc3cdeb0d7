"""JSONL file -> tokenized, split, packed datasets, cached by fingerprint.

Used through `loop.data.build_datasets`; the steps, in order:

1. `read_records`: parse each line, apply the profile, check the messages. A bad line stops the
   job (`data.on_bad_record = "error"`) with its file and line, or is counted (`"skip"`), whatever
   is wrong with it (see `read_records`).
2. `tokenize_records`: render through the chat template with `datasets.Dataset.map(batched=True,
   num_proc=data.num_proc)`; truncate or drop long examples, drop those with nothing to train. A
   record the template or tokenizer fails on is a bad line too; text that holds a special token's
   text (a literal "<|im_end|>") is counted for the report.
3. `split_validation`: `data.validation_path`, else `monitoring.validation_split` by seed.
4. `pack`: best-fit-decreasing packing with `position_ids` restarting at 0 per example.
The result is cached by `loop.data.cache` under `data.cache_dir/<fingerprint>/`, so the next run
with the same data, tokenizer and settings loads it instead.

`build_datasets` runs these steps a chunk of records at a time through `loop.data.stream` (any
source format of `loop.data.sources`: `parse_line` and `record_payload` are step 1 for one record);
`read_records`, `split_validation` and `pack` are their whole-file, in-memory forms.
"""

from __future__ import annotations

import heapq
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
from loop.data.render import (
    IGNORE_INDEX,
    DataError,
    Rendered,
    Renderer,
    TemplateError,
    render_text,
    special_token_pattern,
)
from loop.data.report import MAX_PROBLEMS, DataReport
from profiles import Profile, RecordError, check_messages, check_tools

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
    num_split: int = 0
    """Kept records whose replies were trained in examples of their own (see `DataReport.num_split`)."""
    num_split_examples: int = 0
    num_split_tokens: int = 0
    num_unsplit_tokens: int = 0
    num_dropped_content: int = 0
    """Kept records part of which the chat template drops (see `DataReport.num_dropped_content`)."""
    dropped_content_example: str = ""

    def drop(self, line: int, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{self.where(line)}: {message}")

    def where(self, line: int) -> str:
        """A record's place in messages (`loop.data.sources` names rows of other formats)."""
        return f"{self.path}:{line}"


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
                    raise _BadRecord("too_large", f"the line is longer than {_size(MAX_LINE_BYTES)}")
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


def _size(num_bytes: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            return f"{num_bytes / (1 << shift):g} {unit}"
    return f"{num_bytes} bytes"


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
    return record_payload(parse_line(raw, line_number), index, profile, system_prompt)


def parse_line(raw: bytes, line_number: int) -> Any:
    """The JSON value of one line; `_BadRecord` if it cannot be read."""
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
    return record


def record_payload(record: Any, index: int, profile: Profile, system_prompt: str) -> str:
    """A record (a line's JSON, or a row of another format) as the JSON payload the tokenizing step
    reads; `_BadRecord` if unusable."""
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
            if example.get("tools") is not None:
                payload["tools"] = check_tools(example["tools"])
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
    unstable_turns: str = "split"
    max_chars: int = 0
    """Characters of each text kept before tokenizing (0: all): far more than `max_length` tokens can
    hold, so a huge record is cut to what truncation keeps anyway without tokenizing all of it."""


def tokenize_records(records: Records, tokenizer, settings: Settings, num_proc: int, fingerprint: str):
    """A `datasets.Dataset` with `input_ids`, `labels`, `line`, `status` ("" = kept), `truncated` and
    `special_text` (where the record's text holds a special token's text, "" if nowhere); a record the
    template renders as several examples is several rows (`part` 0, 1, ...; see `loop.data.render`), each
    with the record's `split`, `unsplit_tokens` and `dropped` (what the template drops of it, "" if nothing)."""
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
        "part": datasets.Value("int32"),
        "split": datasets.Value("bool"),
        "unsplit_tokens": datasets.Value("int64"),
        "dropped": datasets.Value("string"),
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
    payloads = [_capped(_parse(p), settings.max_chars) for p in batch["payload"]]
    results = _render_payloads(payloads, tokenizer, settings)
    specials = special_token_pattern(tokenizer)
    out: dict[str, list] = {"line": [], "input_ids": [], "labels": [], "status": [], "truncated": [],
                            "special_text": [], "part": [], "split": [], "unsplit_tokens": [], "dropped": []}
    for line, payload, result in zip(batch["line"], payloads, results):
        rendered = result if isinstance(result, Rendered) else Rendered([result])
        # What is said of the record (special text, split, dropped) is on each of its rows; `keep_usable`
        # counts it once per record that keeps a row.
        special = "" if isinstance(result, Exception) else _special_text(payload, specials)
        for part, example in enumerate(rendered.examples):
            ids, labels, status, truncated = _fit(example, settings)
            out["line"].append(line)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["status"].append(status)
            out["truncated"].append(truncated)
            out["special_text"].append(special)
            out["part"].append(part)
            out["split"].append(rendered.is_split)
            out["unsplit_tokens"].append(rendered.num_unsplit_tokens)
            out["dropped"].append(rendered.dropped)
    return out


def _parse(payload: str) -> dict | Exception:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as error:  # a worker's stack is deeper than the reader's was
        return RecordError(f"cannot read the record back: {type(error).__name__}: {error}")


def _render_payloads(payloads: list[dict | Exception], tokenizer, settings: Settings) -> list:
    """A `Rendered` (or, for text, `(input_ids, labels)`) per payload, or the exception of that record."""
    try:
        chats = [p for p in payloads if isinstance(p, dict) and "messages" in p]
        renderer = Renderer(tokenizer, settings.train_on, settings.unstable_turns) if chats else None
        rendered = iter(renderer.render_conversations([p["messages"] for p in chats], [p.get("tools") for p in chats])
                        if chats else [])
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


def _capped(payload: dict | Exception, max_chars: int) -> dict | Exception:
    """`payload` with each text (`text`, or each message's `content`) cut to `max_chars` characters."""
    if not max_chars or not isinstance(payload, dict):
        return payload
    if isinstance(payload.get("text"), str) and len(payload["text"]) > max_chars:
        return {**payload, "text": payload["text"][:max_chars]}
    messages = payload.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and isinstance(m.get("content"), str)
                                          and len(m["content"]) > max_chars for m in messages):
        cut = [{**m, "content": m["content"][:max_chars]} if isinstance(m, dict) and isinstance(m.get("content"), str)
               else m for m in messages]
        return {**payload, "messages": cut}
    return payload


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


def keep_usable(tokenized, records: Records, on_bad_record: str, columns: tuple[str, ...] = ("input_ids", "labels")):
    """The kept rows of `tokenized` (`columns` only: input_ids and labels); drops and special-token text
    are counted into `records`."""
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
            raise TemplateError(f"{records.where(line)}: {message}")
        if reason == "invalid_record" and on_bad_record == "error":
            raise DataError(f"{records.where(line)}: {message}. {_SKIP_HINT}")
        records.drop(line, reason, message)
    # What is said of a record is on each of its rows: count it once, on the record's first kept row.
    seen: set[int] = set()
    first_kept = [row for row in kept if not (lines[row] in seen or seen.add(lines[row]))]
    count, example = _flagged(table.column("special_text").to_pylist(), first_kept, lines, records)
    records.num_special_text += count
    records.special_text_example = records.special_text_example or example
    _count_template_effects(tokenized, kept, first_kept, lines, records)
    truncated = table.column("truncated").to_pylist()
    num_truncated = sum(truncated[row] for row in kept)
    return tokenized.select(kept).select_columns(list(columns)), num_truncated


def _count_template_effects(tokenized, kept: list[int], first_kept: list[int], lines: list[int],
                            records: Records) -> None:
    """Count into `records` the kept records the template split into several examples, and those part
    of which it drops (`loop.data.render.Rendered`)."""
    table = tokenized.select_columns(["split", "unsplit_tokens", "dropped", "input_ids"]).with_format("arrow")[:]
    split = table.column("split").to_pylist()
    if any(split[row] for row in kept):
        lengths = np.diff(table.column("input_ids").combine_chunks().offsets.to_numpy())
        unsplit = table.column("unsplit_tokens").to_pylist()
        records.num_split += sum(split[row] for row in first_kept)
        records.num_split_examples += sum(split[row] for row in kept)
        records.num_split_tokens += int(sum(lengths[row] for row in kept if split[row]))
        records.num_unsplit_tokens += sum(unsplit[row] for row in first_kept if split[row])
    count, example = _flagged(table.column("dropped").to_pylist(), first_kept, lines, records)
    records.num_dropped_content += count
    records.dropped_content_example = records.dropped_content_example or example


def _flagged(values: list, first_kept: list[int], lines: list[int], records: Records) -> tuple[int, str]:
    """(how many records have a value on their first kept row, "where: value" of the first of them)."""
    flagged = [row for row in first_kept if values[row]]
    return len(flagged), f"{records.where(lines[flagged[0]])}: {values[flagged[0]]}" if flagged else ""


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

    return datasets.Dataset(InMemoryTable(pack_table(dataset.with_format("arrow")[:], max_length)))


def pack_table(table: pa.Table, max_length: int) -> pa.Table:
    """`pack` of an Arrow table of `input_ids` and `labels`: the packed table."""
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

    return pa.table({
        "input_ids": column(ids_column.values.to_numpy()[gather]),
        "labels": column(labels_column.values.to_numpy()[gather]),
        "position_ids": column(within),
    })


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the
    fullest bin it fits (ties by index, so the result depends only on the lengths). A million
    examples take seconds."""
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.lexsort((np.arange(len(sizes)), -sizes)).tolist()
    sizes = sizes.tolist()
    bins: list[list[int]] = []
    # The open bins by space left: `by_space[s]` is a heap of the numbers of the bins with s left (the
    # lowest number wins a tie), and bit s of `has_space` says it is not empty, so the tightest bin that
    # fits is the lowest set bit at or above the length: a shift, not a search.
    by_space: list[list[int] | None] = [None] * (capacity + 1)
    has_space = 0
    for i in order:
        length = sizes[i]
        above = has_space >> length
        if above:
            space = length + (above & -above).bit_length() - 1
            heap = by_space[space]
            number = heapq.heappop(heap)
            if not heap:
                has_space ^= 1 << space
            bins[number].append(i)
            left = space - length
        else:
            number = len(bins)
            bins.append([i])
            left = capacity - length
        if left >= 0:  # an example longer than the capacity has a bin of its own, closed
            heap = by_space[left]
            if heap is None:
                heap = by_space[left] = []
            if not heap:
                has_space |= 1 << left
            heapq.heappush(heap, number)
    return bins
