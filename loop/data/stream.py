"""Preparing data in bounded memory: records stream through Arrow files on disk, never a whole data set
in Python lists.

    examples = tokenize_files(source, source.files, ...)   # chunks of records -> datasets.map -> an Arrow file
    mixed = mix_and_split(sources, examples, ..., out)      # hold-out, weights and num_samples -> train/validation
    packed = pack_file(mixed.train, lengths, max_length, out_file)   # best-fit decreasing, a chunk of bins at a time

1. Reading: records come from `loop.data.sources` one at a time and are turned into payloads by the
   profile (`prepare.record_payload`); every `CHUNK_BYTES` of payloads is one chunk.
2. Tokenizing: each chunk goes through `prepare.tokenize_records` (`datasets.map(num_proc=...)`) and
   `prepare.keep_usable`; the kept rows are appended to the source's Arrow file and the chunk is
   dropped. What was dropped and why is counted into one `Records` per file.
3. Mixing and splitting read those files batch by batch and write the training and validation rows.
4. Packing writes a chunk of bins at a time, reading each of their examples from the training file
   with `pread` (not a memory map, whose resident pages would grow with the file), so resident
   memory stays at about one chunk, however large the file.

Peak memory is therefore about a chunk of records and tokens plus a few numbers per example
(lengths, trained tokens), not the size of the data; `bench/data_scale.py` measures it.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import loop.data.prepare as prepare
from loop.data.prepare import Records
from loop.data.render import IGNORE_INDEX, DataError
from loop.data.report import MAX_PROBLEMS
from loop.data.sources import DataFiles, Source, mix_counts, repeats, source_entry

logger = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20
"""Payload bytes tokenized at a time: the unit of peak memory while tokenizing."""
WRITE_ROWS = 8192
"""Rows per Arrow record batch written."""
PACK_TOKENS = 2 << 20
"""Tokens gathered per chunk of packed bins: the unit of peak memory while packing."""


def features(packed: bool):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    return datasets.Features({"input_ids": ids, "labels": ids, **({"position_ids": ids} if packed else {})})


class ArrowFile:
    """Rows appended to an Arrow stream file (what `datasets.Dataset.from_file` reads)."""

    def __init__(self, path: Path, packed: bool = False):
        from datasets.arrow_writer import ArrowWriter

        self.path = path
        self.num_rows = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = ArrowWriter(path=str(path), features=features(packed), writer_batch_size=WRITE_ROWS)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table)
            self.num_rows += table.num_rows

    def close(self) -> Path:
        self._writer.finalize()
        return self.path


def read_batches(path: Path):
    """The record batches of an Arrow stream file, one at a time, read (not mapped) into memory."""
    with pa.OSFile(str(path)) as handle:
        yield from pa.ipc.open_stream(handle)


def dataset(path: Path | None):
    """A memory-mapped `datasets.Dataset` of an Arrow stream file (nothing is read yet)."""
    import datasets

    return datasets.Dataset.from_file(str(path)) if path is not None else None


# --- 1 and 2. reading and tokenizing, a chunk at a time -------------------------------------------

@dataclass
class Examples:
    """The kept examples of one data file: an Arrow file of `input_ids` and `labels`, with counts."""
    path: Path
    records: Records
    """Read, dropped and why, special-token text, ... (no payloads)."""
    num_truncated: int = 0
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Tokens per example."""
    trained: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Tokens that carry loss, per example."""
    record_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """The record each example comes from (shard and line): a record may give several examples."""

    @property
    def num_rows(self) -> int:
        return len(self.lengths)


def tokenize_files(source: Source, files: DataFiles, tokenizer, settings, *, num_proc: int, on_bad_record: str,
                   out: Path, fingerprint: str, progress: bool = True) -> Examples:
    """Read, render and tokenize one source's training (or validation) data into `out`; a bad record
    raises `DataError` naming its file and line (or shard and row) under `on_bad_record = "error"`.

    `progress`: a bar over the file's bytes or rows, unless `datasets`' progress bars are disabled.
    """
    from datasets.utils import are_progress_bars_disabled

    settings = dataclasses.replace(settings, train_on=source.train_on,
                                   max_chars=text_limit(tokenizer, settings.max_length))
    total = _records(files, 0)
    writer = ArrowFile(out)
    lengths: list[np.ndarray] = []
    trained: list[np.ndarray] = []
    record_ids: list[np.ndarray] = []
    num_truncated = 0
    num_chunks = 0

    def flush(chunk, shard: int) -> None:
        nonlocal num_truncated, num_chunks
        if chunk.lines:
            tokenized = prepare.tokenize_records(chunk, tokenizer, settings, num_proc,
                                                 f"{fingerprint}-{num_chunks}")
            kept, truncated = prepare.keep_usable(tokenized, chunk, on_bad_record, columns=("input_ids", "labels", "line"))
            num_truncated += truncated
            num_chunks += 1
            for table in kept.with_format("arrow").iter(batch_size=WRITE_ROWS):
                line = table.column("line").to_numpy().astype(np.int64)
                table = table.drop_columns(["line"])
                writer.write(table)
                row_lengths, row_trained = _counts(table)
                lengths.append(row_lengths)
                trained.append(row_trained)
                record_ids.append((np.int64(shard) << 40) | line)
        _merge(total, chunk)

    with _progress_bar(files, progress and not are_progress_bars_disabled()) as bar, _quiet_datasets():
        for shard in range(files.num_shards()):
            chunk, chunk_bytes = _records(files, shard), 0
            for position, item in files.records(shard):
                index = total.num_read + chunk.num_read
                chunk.num_read += 1
                bar.update(len(item) if isinstance(item, bytes) else 1)
                payload = read_payload(item, position, position, index, source, files, chunk, on_bad_record)
                if payload is None:
                    continue
                chunk.lines.append(position)
                chunk.payloads.append(payload)
                chunk_bytes += len(payload)
                if chunk_bytes >= CHUNK_BYTES:
                    flush(chunk, shard)
                    chunk, chunk_bytes = _records(files, shard), 0
            flush(chunk, shard)
    writer.close()
    return Examples(path=out, records=total, num_truncated=num_truncated,
                    lengths=np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
                    trained=np.concatenate(trained) if trained else np.zeros(0, dtype=np.int64),
                    record_ids=np.concatenate(record_ids) if record_ids else np.zeros(0, dtype=np.int64))


def read_payload(item: bytes | dict | None, position: int, line: int, index: int, source: Source, files: DataFiles,
                 records: Records, on_bad_record: str) -> str | None:
    """The payload of one record as read from `files` (a JSONL line, or a row), or None when it is bad and
    `on_bad_record = "skip"` (counted into `records` under `line`, its key there); else `DataError` naming
    `records.where(line)`. `position`: its line number (a byte-order mark is read only on line 1);
    `index`: its number in the source, which the profile is given."""
    try:
        if item is None:
            raise prepare._BadRecord("too_large", f"the line is longer than {prepare._size(prepare.MAX_LINE_BYTES)}")
        record = prepare.parse_line(item, position) if isinstance(item, bytes) else item
        return prepare.record_payload(files.map_columns(record), index, source.profile, source.system_prompt)
    except prepare._BadRecord as bad:
        message = prepare.printable(bad.message)
        if on_bad_record == "error":
            raise DataError(f"{records.where(line)}: {message}. {prepare._SKIP_HINT}") from None
        records.drop(line, bad.reason, message)
        return None


def text_limit(tokenizer, max_length: int) -> int:
    """Characters of one text that can matter for `max_length` tokens: each token covers at most as many
    characters as the vocabulary's longest entry, so this many (twice over, with room for the word the
    cut falls in) hold every token that truncation keeps."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return 2 * max_length * max(longest, 1) + 4096


@dataclass
class _ShardRecords(Records):
    """`Records` of one shard, whose messages name a record as its format does (`DataFiles.where`)."""
    files: DataFiles | None = None
    shard: int = 0

    def where(self, line: int) -> str:
        return self.files.where(self.shard, line)


def _records(files: DataFiles, shard: int) -> _ShardRecords:
    return _ShardRecords(path=files.shard_name(shard), files=files, shard=shard)


def _merge(total: Records, part: Records) -> None:
    """Add a chunk's counts to the file's (every field of `Records` but its payloads)."""
    for f in dataclasses.fields(Records):
        if f.name in ("path", "lines", "payloads"):
            continue
        mine, theirs = getattr(total, f.name), getattr(part, f.name)
        if isinstance(mine, Counter):
            mine.update(theirs)
        elif isinstance(mine, list):
            mine.extend(theirs[:max(0, MAX_PROBLEMS - len(mine))])
        elif isinstance(mine, str):
            if not mine:
                setattr(total, f.name, theirs)
        elif isinstance(mine, (int, float)) and not isinstance(mine, bool):
            setattr(total, f.name, mine + theirs)


def _counts(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, trained tokens) per row of a table of `input_ids` and `labels`."""
    labels = table.column("labels").combine_chunks()
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks()).to_numpy(
        zero_copy_only=False).astype(np.int64)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    trained = np.bincount(parents[values != IGNORE_INDEX], minlength=table.num_rows).astype(np.int64)
    return lengths, trained


@contextmanager
def _progress_bar(files: DataFiles, show: bool):
    from tqdm.auto import tqdm

    size = files.num_bytes() if files.kind == "jsonl" else files.num_rows()
    unit = "B" if files.kind == "jsonl" else " records"
    bar = tqdm(total=size, unit=unit, unit_scale=True, desc=f"Preparing {Path(files.path).name or files.path}",
               disable=not show, mininterval=1.0)
    try:
        yield bar
    finally:
        bar.close()


@contextmanager
def _quiet_datasets():
    """No progress bar per chunk from `datasets.map`: ours counts the whole file."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def require_examples(examples: Examples, files: DataFiles) -> None:
    """`DataError` naming the data when nothing of it is left to train or validate on."""
    if examples.num_rows:
        return
    records = examples.records
    why = ", ".join(f"{count} {reason}" for reason, count in records.dropped.items()) or "the data has no records"
    problems = "".join(f"\n  {p}" for p in records.problems[:5])
    where = files.path if files.key in ("data.dataset_path", "data.validation_path") else f"{files.key}: {files.path}"
    raise DataError(f"{where}: no usable examples ({records.num_read} records read; {why}).{problems}")


# --- 3. mixing and splitting ---------------------------------------------------------------------

@dataclass
class Mixed:
    train: Path
    validation: Path | None
    lengths: np.ndarray
    """Tokens per training example, in the order written."""
    validation_lengths: np.ndarray
    entries: list[dict]
    """Per source, for `sources.MixReport`."""


def mix_and_split(sources: list[Source], train: list[Examples], own_validation: list[Examples | None], *,
                  split: float, max_samples: int, seed: int, train_out: Path, validation_out: Path) -> Mixed:
    """Training and validation rows from every source's examples.

    Validation: each source's own validation data and the overall one (`Source.is_validation`); with
    none of them anywhere, `split` of the training examples of all sources (min(max_samples, int(n *
    split)), chosen by seed, as `prepare.split_validation` chooses), each with the other examples of
    its record, so that no conversation is partly trained on and partly held out. Training: what is left of each
    source, taken `mix_counts` times in all (`repeats` says which examples, by seed), sources in order
    and each example's copies together (the sampler shuffles).
    """
    training = [i for i, s in enumerate(sources) if not s.is_validation]
    has_validation_data = any(v is not None for v in own_validation)
    held_out = _held_out([train[i].record_ids for i in training], 0.0 if has_validation_data else split,
                         max_samples, seed)
    remaining = [train[i].num_rows - int(mask.sum()) for i, mask in zip(training, held_out)]
    counts = mix_counts([sources[i] for i in training], remaining)
    train_file, validation_file = ArrowFile(train_out), ArrowFile(validation_out)
    lengths, validation_lengths, entries = [], [], []
    for i, mask, count, left in zip(training, held_out, counts, remaining):
        source, examples = sources[i], train[i]
        times = np.zeros(examples.num_rows, dtype=np.int64)
        times[~mask] = repeats(left, count, seed, i + 1)
        _write_selected(examples.path, times, train_file)
        _write_selected(examples.path, mask.astype(np.int64), validation_file)
        lengths.append(np.repeat(examples.lengths, times))
        validation_lengths.append(examples.lengths[mask])
        own = own_validation[i]
        if own is not None:
            _write_selected(own.path, np.ones(own.num_rows, dtype=np.int64), validation_file)
            validation_lengths.append(own.lengths)
        entries.append(_entry(source, examples, own, times, int(mask.sum())))
    for i, source in enumerate(sources):
        if source.is_validation:
            examples = train[i]
            _write_selected(examples.path, np.ones(examples.num_rows, dtype=np.int64), validation_file)
            validation_lengths.append(examples.lengths)
            entries.append(_entry(source, examples, None, np.zeros(examples.num_rows, dtype=np.int64),
                                  examples.num_rows))
    train_file.close()
    validation_file.close()
    if not validation_file.num_rows:
        validation_out.unlink()
    return Mixed(train=train_out, validation=validation_out if validation_file.num_rows else None,
                 lengths=np.concatenate(lengths),
                 validation_lengths=np.concatenate([np.zeros(0, dtype=np.int64), *validation_lengths]),
                 entries=entries)


def _held_out(record_ids: list[np.ndarray], fraction: float, max_samples: int, seed: int) -> list[np.ndarray]:
    """Per source, which examples are held out for validation: those `prepare.split_validation` would
    choose, and the other examples of their records (a reply trained in an example of its own,
    `profile.unstable_turns = "split"`, stays with its conversation)."""
    sizes = [len(ids) for ids in record_ids]
    total = sum(sizes)
    num_validation = min(max_samples, int(total * fraction))
    if num_validation == 0 and fraction > 0:
        logger.warning("monitoring.validation_split = %s of %d examples holds out none; no validation",
                       fraction, total)
    chosen = np.zeros(total, dtype=bool)
    if num_validation:
        chosen[random.Random(seed).sample(range(total), num_validation)] = True
    masks = np.split(chosen, np.cumsum(sizes)[:-1]) if sizes else []
    return [np.isin(ids, ids[mask]) for ids, mask in zip(record_ids, masks)]


def _write_selected(path: Path, times: np.ndarray, out: ArrowFile) -> None:
    """Append each row of the file at `path` `times[row]` times to `out`, a batch at a time."""
    if not times.any():
        return
    start = 0
    for batch in read_batches(path):
        these = times[start:start + batch.num_rows]
        start += batch.num_rows
        if these.any():
            rows = np.repeat(np.arange(batch.num_rows), these)
            out.write(pa.Table.from_batches([batch.take(pa.array(rows))]))


def _entry(source: Source, examples: Examples, own: Examples | None, times: np.ndarray, num_held_out: int) -> dict:
    dropped: Counter = Counter(examples.records.dropped)
    if own is not None:
        dropped.update(own.records.dropped)
    return source_entry(
        source, num_read=examples.records.num_read + (own.records.num_read if own else 0),
        num_kept=examples.num_rows + (own.num_rows if own else 0), dropped=dropped,
        num_truncated=examples.num_truncated + (own.num_truncated if own else 0),
        num_train_examples=int(times.sum()), num_validation_examples=num_held_out + (own.num_rows if own else 0),
        num_tokens=int((examples.lengths * times).sum()), num_trained_tokens=int((examples.trained * times).sum()))


# --- 4. packing ----------------------------------------------------------------------------------

def pack_file(path: Path, lengths: np.ndarray, max_length: int, out: Path) -> Path:
    """Best-fit-decreasing packing of the rows of `path` (an Arrow stream file of `input_ids` and
    `labels` whose row lengths are `lengths`) into `out`, as `prepare.pack` does in memory: the same
    bins in the same order, `position_ids` restarting at 0 per example."""
    bins = prepare.best_fit_decreasing(lengths, max_length)
    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
    bin_sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    del bins
    writer = ArrowFile(out, packed=True)
    with _FileRows(path) as rows:
        first_example = 0
        for bin_start, bin_end in _bin_chunks(lengths[order], bin_sizes):
            count = int(bin_sizes[bin_start:bin_end].sum())
            examples = order[first_example:first_example + count]
            first_example += count
            writer.write(_packed_table(rows, examples, lengths[examples], bin_sizes[bin_start:bin_end]))
    return writer.close()


def _bin_chunks(ordered_lengths: np.ndarray, bin_sizes: np.ndarray):
    """(first bin, end bin) of consecutive runs of bins holding about `PACK_TOKENS` tokens."""
    bin_tokens = np.add.reduceat(ordered_lengths, np.concatenate([[0], np.cumsum(bin_sizes)[:-1]])) \
        if len(bin_sizes) else np.zeros(0, dtype=np.int64)
    start, tokens = 0, 0
    for number, size in enumerate(bin_tokens.tolist()):
        tokens += size
        if tokens >= PACK_TOKENS:
            yield start, number + 1
            start, tokens = number + 1, 0
    if start < len(bin_sizes):
        yield start, len(bin_sizes)


def _packed_table(rows: _FileRows, examples: np.ndarray, lengths: np.ndarray, bin_sizes: np.ndarray) -> pa.Table:
    out_starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    within = np.arange(total, dtype=np.int64) - np.repeat(out_starts, lengths)
    ids, labels = rows.gather(examples, lengths)
    example_ends = np.cumsum(bin_sizes)
    bin_offsets = np.concatenate([[0], np.cumsum(lengths)[example_ends - 1]]).astype(np.int32)

    def column(values):
        return pa.ListArray.from_arrays(pa.array(bin_offsets), pa.array(values, type=pa.int32()))

    return pa.table({"input_ids": column(ids), "labels": column(labels), "position_ids": column(within)})


class _FileRows:
    """Random access to the token values of an Arrow stream file, read with `pread`, never mapped.

    Where each example's values lie in the file is found once through a memory map: Arrow aligns
    every buffer to 8 bytes, so a buffer's address in the map is its byte offset in the file. The
    values are then read example by example (two reads each, from the page cache). A memory map of
    the values would make resident memory grow with the file: the kernel maps large pieces of the
    page cache at each fault, and a chunk of bins touches examples all over the file.
    """

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY)
        ids_starts, labels_starts = [], []
        if path.stat().st_size:
            with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as whole:
                buffer = pa.py_buffer(whole)
                base = buffer.address
                for batch in pa.ipc.open_stream(pa.BufferReader(buffer)):
                    for name, starts in (("input_ids", ids_starts), ("labels", labels_starts)):
                        column = batch.column(name)
                        address = column.values.buffers()[1].address + 4 * column.values.offset
                        assert (address - base) % 4 == 0, "Arrow buffers are 8-byte aligned"
                        starts.append(address - base + 4 * column.offsets.to_numpy()[:-1].astype(np.int64))
                del batch, column, buffer  # nothing may point into the map when it closes
        self.ids_starts = np.concatenate(ids_starts) if ids_starts else np.zeros(0, dtype=np.int64)
        self.labels_starts = np.concatenate(labels_starts) if labels_starts else np.zeros(0, dtype=np.int64)

    def gather(self, examples: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The `input_ids` and `labels` values of `examples`, one after the other."""
        total = int(lengths.sum())
        ids, labels = np.empty(total, dtype=np.int32), np.empty(total, dtype=np.int32)
        ids_bytes, labels_bytes = memoryview(ids).cast("B"), memoryview(labels).cast("B")
        position = 0
        for example, length in zip(examples.tolist(), lengths.tolist()):
            end = position + 4 * length
            os.preadv(self._fd, [ids_bytes[position:end]], int(self.ids_starts[example]))
            os.preadv(self._fd, [labels_bytes[position:end]], int(self.labels_starts[example]))
            position = end
        return ids, labels

    def __enter__(self) -> _FileRows:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)
