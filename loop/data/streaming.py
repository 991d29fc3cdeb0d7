"""Streaming (`data.streaming = true`): training data read, rendered, tokenized and packed while training,
for data larger than memory or disk. Nothing is cached; memory holds one buffer of records.

    data = build_stream(config, tokenizer)                  # sources checked, validation data read
    loader = build_stream_loader(data, config, tokenizer, rank=0, world_size=1, device="cpu")
    for window in loader.windows(accumulation): ...         # lists of micro-batches, forever
    state = loader.state_dict(num_batches)                  # JSON: progress.json of every checkpoint
    loader.load_state_dict(state)                           # the next batch is the one after that state

The stream is a sequence of *blocks*. Block b is the next `data.stream_buffer` records of the mix:
with weights, each record's source is drawn by `(seed, b)` in proportion to the weights; without,
the sources are read one after another. Each source is re-opened when it ends (the stream has no
epochs, so `hyperparams.max_steps` says when to stop). A block's records are rendered and tokenized
by the cached path's own code (`prepare.record_payload`, `prepare.tokenize_records`,
`prepare.keep_usable`), packed with its best-fit decreasing (`prepare.pack_table`) when
`data.packing`, and shuffled by `(seed, b)` when `data.shuffle`. Batches of `batch_size` rows run on
across blocks; process r of W keeps every W-th batch from the r-th, as Accelerate shards a map-style
loader, so W processes see the batches of one process with W times the batch.

Resume: the state is each source's place (pass, shard, line and byte offset, or row) at the start and
end of the current block, and how many of its rows were taken. A resumed stream opens each source at
the block's start (seeking, or skipping row groups), reads and tokenizes that one block again, and
skips the rows taken: at most `stream_buffer` records are read twice, whatever the step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import loop.data.prepare as prepare
from launcher.config import JobConfig
from loop.data.batches import Collator, sends_sequence_boundaries
from loop.data.cache import fingerprint, tokenizer_digest
from loop.data.prepare import Records, Settings
from loop.data.render import DataError
from loop.data.report import MAX_PROBLEMS
from loop.data.sources import DataFiles, Source, mix_template, plan_sources
from loop.data.stream import Examples, _quiet_datasets, read_payload, require_examples, text_limit

logger = logging.getLogger(__name__)

_PROBE_RECORDS = 16
"""Records read at a time while looking for a source's first usable example."""


# --- one source, read forever --------------------------------------------------------------------

class SourceReader:
    """The records of one source's files, pass after pass, from a place that is saved as JSON."""

    def __init__(self, files: DataFiles):
        self.files = files
        self.num_pass = 0
        self.shard = 0
        self.start = 0
        """JSON Lines: the number of the last line read; rows: the next row."""
        self.offset = 0
        """JSON Lines: the byte after the last line read."""
        self.index = 0
        """Records read in this pass: the number the profile is given."""
        self._items = None

    def next(self) -> tuple[int, int, bytes | dict | None, int] | None:
        """(shard, position, item, index) of the next record, or None once at the end of every pass."""
        while True:
            if self._items is None:
                if self.shard >= self.files.num_shards():
                    self.num_pass, self.shard, self.start, self.offset, self.index = self.num_pass + 1, 0, 0, 0, 0
                    return None
                self._items = self.files.records_from(self.shard, self.start, self.offset)
            record = next(self._items, None)
            if record is None:
                self._items = None
                self.shard, self.start, self.offset = self.shard + 1, 0, 0
                continue
            position, item, (self.start, self.offset) = record
            self.index += 1
            return self.shard, position, item, self.index - 1

    def state_dict(self) -> dict:
        return {"pass": self.num_pass, "shard": self.shard, "start": self.start, "offset": self.offset,
                "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.num_pass, self.shard, self.start, self.offset, self.index = (
            _count(state, name) for name in ("pass", "shard", "start", "offset", "index"))
        self._items = None


def _count(state: dict, name: str) -> int:
    value = state.get(name) if isinstance(state, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"stream state: {name} is {value!r}, not a count")
    return value


# --- the mix of the training sources -------------------------------------------------------------

@dataclass
class _Read:
    """One record read for a block."""
    source: int
    shard: int
    position: int
    item: bytes | dict | None
    index: int


class Mix:
    """Which source each record of a block comes from, and the readers' places."""

    def __init__(self, sources: list[Source], seed: int):
        self.sources = sources
        self.seed = seed
        self.readers = [SourceReader(s.files) for s in sources]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.weights = weights / weights.sum() if weights.sum() > 0 else None
        self.current = 0
        """Without weights: the source being read."""

    def read(self, block: int, num_records: int) -> list[_Read]:
        picks = (np.random.default_rng([self.seed, block, 0]).choice(len(self.sources), size=num_records,
                                                                     p=self.weights).tolist()
                 if self.weights is not None else None)
        out = []
        for slot in range(num_records):
            number = picks[slot] if picks is not None else self.current
            record = self.readers[number].next()
            if record is None:  # the end of a pass: read it again, or (without weights) the next source
                if picks is None:
                    number = self.current = (self.current + 1) % len(self.sources)
                record = self.readers[number].next()
                if record is None:
                    source = self.sources[number]
                    raise DataError(f"{source.key}: {source.files.path} holds no records")
            out.append(_Read(number, *record))
        return out

    def state_dict(self) -> dict:
        return {"current": self.current, "sources": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state: dict) -> None:
        places = state.get("sources") if isinstance(state, dict) else None
        if not isinstance(places, list) or len(places) != len(self.readers):
            raise ValueError(f"stream state: expected the places of {len(self.readers)} source(s), got {places!r}")
        self.current = _count(state, "current")
        for reader, place in zip(self.readers, places):
            reader.load_state_dict(place)


# --- records -> token rows ----------------------------------------------------------------------

@dataclass
class _SlotRecords(Records):
    """`Records` of one source in a block; `lines` are slots of the block, named by `places`."""
    places: dict[int, str] = dataclasses.field(default_factory=dict)
    num_logged: int = 0
    """Of `problems`, those already logged."""

    def where(self, line: int) -> str:
        return self.places[line]


class Tokenizer:
    """Records of several sources -> a table of `slot`, `input_ids`, `labels`, in slot order (a record
    the template splits gives several rows), through the cached path's rendering and checks."""

    def __init__(self, config: JobConfig, tokenizer, sources: list[Source]):
        data = config.data
        self.tokenizer = tokenizer
        self.sources = sources
        self.num_proc = data.num_proc
        self.on_bad_record = data.on_bad_record
        base = Settings(train_on="", max_length=data.max_length, too_long=data.too_long,
                        unstable_turns=config.profile.unstable_turns,
                        max_chars=text_limit(tokenizer, data.max_length))
        self.settings = [dataclasses.replace(base, train_on=s.train_on) for s in sources]
        self._num_logged = 0

    def __call__(self, reads: list[_Read], sources: list[Source] | None = None, files: list[DataFiles] | None = None,
                 records: dict[int, _SlotRecords] | None = None) -> pa.Table:
        """`files[i]` is what source i's records were read from (its training data by default); `records`
        receives each source's counts (fresh ones by default)."""
        sources = sources or self.sources
        files = files or [s.files for s in sources]
        records = {} if records is None else records
        for slot, read in enumerate(reads):
            chunk = records.setdefault(read.source, _SlotRecords(path=files[read.source].path))
            chunk.places[slot] = files[read.source].where(read.shard, read.position)
            chunk.num_read += 1
            payload = read_payload(read.item, read.position, slot, read.index, sources[read.source],
                                   files[read.source], chunk, self.on_bad_record)
            if payload is not None:
                chunk.lines.append(slot)
                chunk.payloads.append(payload)
        tables = []
        with _quiet_datasets():
            for number, chunk in records.items():
                if chunk.lines:
                    tokenized = prepare.tokenize_records(chunk, self.tokenizer, self.settings[number], self.num_proc,
                                                         f"stream-{number}")
                    kept, _ = prepare.keep_usable(tokenized, chunk, self.on_bad_record,
                                                  columns=("line", "input_ids", "labels"))
                    tables.append(kept.with_format("arrow")[:])
                chunk.lines, chunk.payloads = [], []
                self._log_skipped(chunk)
        if not tables:
            return _empty_rows()
        table = pa.concat_tables(tables).rename_columns(["slot", "input_ids", "labels"])
        return table.take(pc.sort_indices(table, sort_keys=[("slot", "ascending")]))  # stable: parts stay in order

    def _log_skipped(self, chunk: _SlotRecords) -> None:
        """A warning for each of the first `MAX_PROBLEMS` records dropped or skipped (the stream has no report)."""
        for problem in chunk.problems[chunk.num_logged:]:
            if self._num_logged < MAX_PROBLEMS:
                logger.warning("data: dropped %s", problem)
                self._num_logged += 1
        chunk.num_logged = len(chunk.problems)


def _empty_rows() -> pa.Table:
    ids = pa.list_(pa.int32())
    return pa.table({"slot": pa.array([], pa.int64()), "input_ids": pa.array([], ids), "labels": pa.array([], ids)})


# --- blocks of rows -----------------------------------------------------------------------------

class Block:
    """The rows of one block, in the order they are taken, read from flat Arrow buffers (a row is a
    view, not a Python list)."""

    def __init__(self, table: pa.Table, order: np.ndarray):
        self.columns = {}
        for name in table.column_names:
            column = table.column(name).combine_chunks()
            # A writable copy: torch refuses to wrap Arrow's read-only buffers without a warning.
            self.columns[name] = (column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=False).copy())
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def row(self, number: int) -> dict[str, np.ndarray]:
        k = int(self.order[number])
        return {name: values[offsets[k]:offsets[k + 1]] for name, (offsets, values) in self.columns.items()}


class RowStream:
    """Training rows, block after block; its state says where the next row comes from."""

    def __init__(self, config: JobConfig, tokenizer, sources: list[Source]):
        data = config.data
        self.mix = Mix(sources, config.hyperparams.seed)
        self.tokenize = Tokenizer(config, tokenizer, sources)
        self.buffer, self.packing, self.max_length = data.stream_buffer, data.packing, data.max_length
        self.shuffle, self.seed = data.shuffle, config.hyperparams.seed
        self.number = 0
        """The current block."""
        self.start = self.mix.state_dict()
        """The sources' places where the current block begins (and, once it is read, `end`)."""
        self.end: dict | None = None
        self.block: Block | None = None
        self.taken = 0
        """Rows of the current block already taken."""

    def next(self) -> dict[str, np.ndarray]:
        while self.block is None or self.taken == len(self.block):
            if self.block is not None:  # on to the next block, which starts where this one ended
                self.number, self.start, self.end, self.block, self.taken = self.number + 1, self.end, None, None, 0
            self._read_block()
        self.taken += 1
        return self.block.row(self.taken - 1)

    def _read_block(self) -> None:
        self.mix.load_state_dict(self.start)
        table = self.tokenize(self.mix.read(self.number, self.buffer)).select(["input_ids", "labels"])
        self.end = self.mix.state_dict()
        if self.packing and table.num_rows:
            table = prepare.pack_table(table, self.max_length)
        order = (np.random.default_rng([self.seed, self.number, 1]).permutation(table.num_rows) if self.shuffle
                 else np.arange(table.num_rows))
        self.block = Block(table, order)

    def state_dict(self) -> dict:
        return {"block": self.number, "taken": self.taken, "num_rows": len(self.block) if self.block else None,
                "start": self.start, "end": self.end}

    def load_state_dict(self, state: dict) -> None:
        self.number, self.taken = _count(state, "block"), _count(state, "taken")
        num_rows = state.get("num_rows")
        self.block = None
        self.mix.load_state_dict(state.get("start"))  # checks the shape of both places
        self.start = self.mix.state_dict()
        if num_rows is not None and self.taken == num_rows and state.get("end") is not None:
            # The block was used up: the next one starts where it ended, and nothing is read again.
            self.mix.load_state_dict(state["end"])
            self.number, self.start, self.taken = self.number + 1, self.mix.state_dict(), 0
        elif self.taken:
            self._read_block()
            if num_rows is not None and len(self.block) != num_rows:
                raise ValueError(f"block {self.number} of the stream now has {len(self.block)} rows, not the "
                                 f"{num_rows} it had when saved: the data changed")


# --- batches for this process -------------------------------------------------------------------

class StreamLoader:
    """Micro-batches of this process, forever: the stream's batches of `batch_size` rows, every
    `world_size`-th from the `rank`-th, collated and on `device`."""

    def __init__(self, rows: RowStream, collator: Collator, *, batch_size: int, rank: int, world_size: int, device):
        self.rows = rows
        self.collator = collator
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, device
        self.num_batches = 0
        """Micro-batches handed to this process so far."""
        self._before_window: tuple[int, dict] | None = None

    def windows(self, accumulation: int):
        """Lists of `accumulation` micro-batches, forever (the stream has no epochs)."""
        while True:
            # A window that is taken and then not trained (a stop before its step) must not count.
            self._before_window = (self.num_batches, self._state())
            yield [self._next_batch() for _ in range(accumulation)]

    def _next_batch(self) -> dict:
        mine = None
        for member in range(self.world_size):
            rows = [self.rows.next() for _ in range(self.batch_size)]
            if member == self.rank:
                mine = rows
        self.num_batches += 1
        batch = self.collator(mine)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def _state(self) -> dict:
        return {"num_batches": self.num_batches, "rows": self.rows.state_dict()}

    def state_dict(self, num_batches: int) -> dict:
        """The state after `num_batches` micro-batches of this process: all that were taken, or all
        but the last window taken."""
        if num_batches == self.num_batches:
            return self._state()
        assert self._before_window is not None and self._before_window[0] == num_batches, \
            f"the stream handed out {self.num_batches} batches, none saved at {num_batches}"
        return self._before_window[1]

    def load_state_dict(self, state: dict) -> None:
        """Continue after the state `state_dict` gave; `ValueError` if it does not fit this job's stream."""
        if not isinstance(state, dict):
            raise ValueError(f"stream state: expected a table, got {state!r}")
        self.rows.load_state_dict(state.get("rows"))
        self.num_batches = _count(state, "num_batches")
        self._before_window = None


# --- building -----------------------------------------------------------------------------------

@dataclass
class StreamedData:
    """What `build_stream` gives the loop: like `PreparedData`, with `stream` in place of the rows."""
    rows: RowStream
    validation: Any | None
    """`datasets.Dataset` of the validation examples (at most `monitoring.validation_max_samples`), or None."""
    report: StreamReport
    digest: str
    """The sources as configured and how they are rendered: what a checkpoint records (see `stream_digest`)."""
    train: None = None
    """Training rows are not held: they are read while training."""
    cache_path: None = None


@dataclass
class StreamReport:
    """What is known of streamed data before training: its sources, the validation examples and a sample."""
    sources: list[dict]
    num_validation_examples: int
    sample: dict = dataclasses.field(default_factory=dict)
    """The first example of the first source: `input_ids` and `labels`."""

    def to_dict(self) -> dict:
        return {"streaming": True, "sources": self.sources, "num_validation_examples": self.num_validation_examples}

    def format(self) -> str:
        lines = [f"streaming: {len(self.sources)} source(s) read, rendered and tokenized while training "
                 "(each gave a usable example; records dropped later are logged, the first "
                 f"{MAX_PROBLEMS} of them)"]
        for s in self.sources:
            lines.append(f"  {s['name']}: {s['kind']}, profile {s['profile']}"
                         + (f", weight {s['weight']:g}" if s["weight"] else ""))
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        return []

    def render_example(self, tokenizer, color: bool | None = False) -> str:
        from loop.data.report import mark_trained

        if not self.sample:
            return "(no example)"
        return mark_trained(tokenizer, self.sample["input_ids"], self.sample["labels"], color=color)


def build_stream(config: JobConfig, tokenizer) -> StreamedData:
    """The job's sources checked and each shown to hold a usable example (its first records are read),
    and the validation examples read; raises `DataError` (exit 2) naming the source or record."""
    from profiles import get_profile

    search_paths = [Path(config.source).parent] if config.source else []
    get_profile(config.profile.name, search_paths=search_paths)  # an unknown profile is refused first
    if config.data.group_by_length:
        logger.warning("data.group_by_length is ignored with data.streaming: rows are shuffled within "
                       "data.stream_buffer records")
    sources = plan_sources(config, search_paths)
    template = mix_template(sources, tokenizer, config)
    training = [s for s in sources if not s.is_validation]
    samples = [_first_example(config, tokenizer, source) for source in training]
    validation = _validation(config, tokenizer, sources)
    report = StreamReport(
        sources=[{"name": s.name, "path": s.files.path, "kind": s.files.kind, "profile": s.profile_name,
                  "weight": s.weight} for s in training],
        num_validation_examples=len(validation) if validation is not None else 0, sample=samples[0])
    return StreamedData(rows=RowStream(config, tokenizer, training), validation=validation, report=report,
                        digest=stream_digest(config, tokenizer, template, sources))


def build_stream_loader(data: StreamedData, config: JobConfig, tokenizer, *, rank: int, world_size: int,
                        device) -> StreamLoader:
    collator = Collator(tokenizer.pad_token_id, config.data.pad_to_multiple_of,
                        sequence_boundaries=sends_sequence_boundaries(config))
    return StreamLoader(data.rows, collator, batch_size=config.hyperparams.batch_size, rank=rank,
                        world_size=world_size, device=device)


def _first_example(config: JobConfig, tokenizer, source: Source) -> dict:
    """The source's first usable example (`input_ids`, `labels`); `DataError` naming the source when no
    record gives one (it is read until one does), so a stream can never spin over a source that gives nothing."""
    tokenize = Tokenizer(config, tokenizer, [source])
    reader, records = SourceReader(source.files), {}
    size = _PROBE_RECORDS
    while reader.num_pass == 0:
        reads = []
        while len(reads) < size and (record := reader.next()) is not None:
            reads.append(_Read(0, *record))
        table = tokenize(reads, records=records)
        if table.num_rows:
            return {name: table.column(name)[0].as_py() for name in ("input_ids", "labels")}
        size = config.data.stream_buffer
    require_examples(Examples(path=Path(), records=records.get(0) or Records(path=source.files.path)), source.files)


def _validation(config: JobConfig, tokenizer, sources: list[Source]):
    """The first `monitoring.validation_max_samples` examples of the validation data (each source's own, then
    the overall one), packed like the training rows; a `datasets.Dataset`, or None without validation data."""
    import datasets
    from datasets.table import InMemoryTable

    pairs = [(s, s.validation) for s in sources if s.validation is not None] + \
        [(s, s.files) for s in sources if s.is_validation]
    if not pairs:
        return None
    tables, num_left = [], config.monitoring.validation_max_samples
    for source, files in pairs:
        tokenize = Tokenizer(config, tokenizer, [source])
        reader, records, num_kept = SourceReader(files), {}, 0
        while reader.num_pass == 0 and num_left > 0:
            reads = []
            while len(reads) < config.data.stream_buffer and (record := reader.next()) is not None:
                reads.append(_Read(0, *record))
            table = tokenize(reads, files=[files], records=records).slice(0, num_left)
            tables.append(table.select(["input_ids", "labels"]))
            num_kept += table.num_rows
            num_left -= table.num_rows
        if not num_kept and num_left > 0:
            require_examples(Examples(path=Path(), records=records.get(0) or Records(path=files.path)), files)
    table = pa.concat_tables(tables)
    if config.data.packing:
        table = prepare.pack_table(table, config.data.max_length)
    return datasets.Dataset(InMemoryTable(table))


def stream_digest(config: JobConfig, tokenizer, template: str | None, sources: list[Source]) -> str:
    """What a checkpoint records of streamed data: each source's settings, profile code and files (names,
    sizes, rows: not their content, which would mean reading all of it on every start), the tokenizer
    and template, and the settings that shape the rows."""
    data = config.data

    def files_part(files: DataFiles | None) -> list | None:
        if files is None:
            return None
        shards = [[Path(shard).name, Path(shard).stat().st_size] for shard in files.shards]
        return [files.kind, files.split, files.subset, files.revision, files.column_map,
                shards or [files.path, files.num_rows()]]

    return fingerprint({
        "streaming": [s.fingerprint_part() + [files_part(s.files), files_part(s.validation)] for s in sources],
        "tokenizer": tokenizer_digest(tokenizer, template),
        "rows": [data.max_length, data.too_long, data.packing, data.shuffle, data.stream_buffer, data.on_bad_record,
                 config.profile.unstable_turns, config.hyperparams.seed],
    })


__all__ = ["Mix", "RowStream", "SourceReader", "StreamLoader", "StreamReport", "StreamedData", "build_stream",
           "build_stream_loader", "stream_digest"]
