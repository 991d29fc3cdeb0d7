"""Where the records come from: the job's sources, their formats, and what each contributed.

    sources = plan_sources(config, search_paths=[job_folder])   # ConfigError naming a bad source
    files = sources[0].files
    for shard in range(files.num_shards()):
        for position, item in files.records(shard):   # a JSONL line (bytes), or a row (dict)
            ...
    report = mix_report(data_report, entries)                   # `DataReport` plus one entry per source

A job has one source (`data.dataset_path`, rendered with `[profile]`) or several (`[[data.sources]]`,
each with its own profile, system prompt, `train_on`, and a `weight` or `num_samples`), plus
validation data per source or overall (`data.validation_path`). A data path is, by `source_kind`:

| kind | what | a bad record is named by |
| --- | --- | --- |
| `jsonl` | a JSON Lines file, or a folder or glob of them (any file that is not one of the others) | file and line |
| `json` | a `.json` file holding an array of records or `{"data": [...]}` (read whole) | file and row |
| `parquet` | a `.parquet` file, or a folder or glob of shards (read in batches) | shard and row |
| `arrow` | an Arrow file, or a folder written by `datasets.save_to_disk` (`Dataset` or `DatasetDict`) | path, split and row |
| `hub` | a dataset-hub id `owner/name`, read with `datasets.load_dataset` (offline from its cache) | id, split and row |

Rows are counted from 0, as `datasets` indexes them; lines from 1, as editors number them.
`column_map` (`{field = "column"}`) gives the profile a field under another column's name; a
columnar source that lacks a mapped column is refused before anything is read.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, DataConfig, JobConfig, SourceConfig
from loop.data.render import DataError
from loop.data.report import DataReport
from profiles import Profile, fill_system_prompt, get_profile

logger = logging.getLogger(__name__)

KINDS = ("jsonl", "json", "parquet", "arrow", "hub")
BATCH_ROWS = 1024
"""Rows read at a time from a columnar source: the memory a reader holds is this many records."""
_SAVED_DATASET_FILES = ("dataset_info.json", "dataset_dict.json", "state.json")


# --- one set of data files ---------------------------------------------------------------------

@dataclass
class DataFiles:
    """The training or the validation data of one source, however it is stored."""
    path: str
    """As configured (resolved): a file, folder, glob or hub id."""
    key: str
    """The job key that names it, for messages: `data.dataset_path`, `data.sources[2].path`, ..."""
    kind: str = ""
    shards: list[str] = field(default_factory=list)
    """The files, in reading order (none for `hub` and saved folders)."""
    split: str = ""
    subset: str = ""
    revision: str = ""
    column_map: dict[str, str] = field(default_factory=dict)
    _dataset: Any = field(default=None, repr=False, compare=False)

    @property
    def is_plain_jsonl(self) -> bool:
        """One JSONL file read as it always was: what a job before several sources had."""
        return self.kind == "jsonl" and len(self.shards) == 1 and self.shards[0] == self.path \
            and not self.column_map

    def where(self, shard: int, position: int) -> str:
        """A record's place for messages: `file:line`, `shard row N`, `id [split] row N`."""
        if self.kind == "jsonl":
            return f"{self.shards[shard]}:{position}"
        if self.shards:
            return f"{self.shards[shard]} row {position}"
        return f"{self.path} [{self.split}] row {position}"

    def shard_name(self, shard: int) -> str:
        return self.shards[shard] if self.shards else f"{self.path} [{self.split}]"

    def num_shards(self) -> int:
        return max(1, len(self.shards))

    # --- reading ---
    def records(self, shard: int) -> Iterator[tuple[int, bytes | dict | None]]:
        """`(position, item)` per record of one shard: a JSONL line as bytes (None: a line too long to
        read) or a row as a dict (its values as `pyarrow` gives them), columns mapped."""
        for position, item, _ in self.records_from(shard):
            yield position, item

    def records_from(self, shard: int, start: int = 0, offset: int = 0
                     ) -> Iterator[tuple[int, bytes | dict | None, tuple[int, int]]]:
        """`records(shard)` from a place, each with the place just after it: `(position, item, (start,
        offset))`. For JSON Lines `start` is the number of the last line read and `offset` the byte
        after it (the file is read on from there); for rows `start` is the first row (whole row groups
        and batches before it are skipped without being converted) and `offset` is 0."""
        if self.kind == "jsonl":
            yield from _jsonl_lines(self.shards[shard], start, offset)
        elif self.kind == "json":
            records = _json_records(self.shards[shard], self.key)
            for row in range(start, len(records)):
                yield row, self.map_columns(records[row]), (row + 1, 0)
        elif self.kind == "parquet":
            yield from self._rows(_parquet_batches(self.shards[shard], self.key, start), start)
        else:
            yield from self._rows(self._arrow_batches(shard, start), start)

    def _rows(self, batches, start: int = 0) -> Iterator[tuple[int, dict, tuple[int, int]]]:
        row = start
        for batch in batches:
            for record in batch.to_pylist():
                yield row, self.map_columns(record), (row + 1, 0)
                row += 1

    def map_columns(self, record):
        """The record with each mapped field copied from its column (a missing column leaves it unset,
        which the profile reports for that record)."""
        if not self.column_map or not isinstance(record, dict):
            return record
        mapped = dict(record)
        for name, column in self.column_map.items():
            if column in record:
                mapped[name] = record[column]
        return mapped

    def _arrow_batches(self, shard: int, start: int = 0):
        if self.shards:  # a bare Arrow file
            yield from _skip_rows(_arrow_file_batches(self.shards[shard], self.key), start)
            return
        dataset = self.dataset()
        if start >= len(dataset) > 0:
            return
        if start:
            dataset = dataset.select(range(start, len(dataset)))  # contiguous: a slice, nothing copied
        try:
            yield from dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
        except Exception as error:  # a damaged Arrow file in the folder or the hub cache
            raise DataError(f"{self.key}: cannot read {self.path} [{self.split}]: {type(error).__name__}: "
                            f"{error}") from None

    def dataset(self):
        """The `datasets.Dataset` of a saved folder or hub id (loaded once; memory-mapped)."""
        if self._dataset is None:
            self._dataset = _load_saved(self) if self.kind == "arrow" else _load_hub(self)
        return self._dataset

    def num_rows(self) -> int | None:
        """Records, when the format says without reading them (None for JSON Lines)."""
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(shard).metadata.num_rows for shard in self.shards)
        if self.kind in ("arrow", "hub") and not self.shards:
            return len(self.dataset())
        return None

    def num_bytes(self) -> int:
        return sum(_size(shard) for shard in self.shards)

    def check(self) -> None:
        """Refuse now, naming the source, what cannot be read: a shard that is not Parquet or Arrow, an
        unknown split, a mapped column that is not there."""
        columns: list[str] | None = None
        if self.kind == "parquet":
            for shard in self.shards:
                schema = _parquet_schema(shard, self.key)
                missing = [c for c in self.column_map.values() if c not in schema.names]
                if missing:
                    raise _missing_columns(self, shard, missing, schema.names)
            return
        if self.kind == "arrow" and self.shards:
            columns = _arrow_file_schema(self.shards[0], self.key).names
        elif self.kind in ("arrow", "hub"):
            columns = list(self.dataset().column_names)
        if columns is not None:
            missing = [c for c in self.column_map.values() if c not in columns]
            if missing:
                raise _missing_columns(self, self.shards[0] if self.shards else self.path, missing, columns)

    def digest(self) -> str:
        """`where:size:content hash` (content, so a copied or touched file still hits the cache)."""
        from loop.data.cache import file_digest

        if self.is_plain_jsonl:
            return file_digest(self.path)  # exactly as before several sources, so old runs still resume
        files = self.shards or _dataset_files(self.dataset())  # loading settles which split is read
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps([self.kind, self.split, self.subset, self.revision, self.column_map]).encode())
        size = 0
        for path in files:
            digest.update(f"\n{Path(path).name}\n".encode())
            size += _size(path)
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return f"{self.path}:{size}:{digest.hexdigest()}"


def data_files(path: str, key: str, *, split: str = "", subset: str = "", revision: str = "",
               column_map: dict[str, str] | None = None) -> DataFiles:
    """`DataFiles` for a configured path, its kind and shards found; `DataError` naming `key` if none."""
    files = DataFiles(path=path, key=key, split=split, subset=subset, revision=revision,
                      column_map=dict(column_map or {}))
    files.kind, files.shards = source_kind(path, key)
    if files.kind in ("jsonl", "json", "parquet") or (files.kind == "arrow" and files.shards):
        ignored = [name for name, value in (("split", split), ("subset", subset), ("revision", revision)) if value]
        if ignored:
            logger.warning("%s: %s ignored: %s is a %s source, not a hub dataset or saved DatasetDict", key,
                           ", ".join(ignored), path, files.kind)
            files.split = files.subset = files.revision = ""
    return files


def source_kind(path: str, key: str = "data.dataset_path") -> tuple[str, list[str]]:
    """(kind, shards) of a data path (see the module docstring)."""
    p = Path(path)
    if any(c in path for c in "*?["):
        shards = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not shards:
            raise DataError(f"{key}: no file matches {path}")
        return _kind_of_shards(shards, path, key), shards
    if p.is_dir():
        if any((p / name).is_file() for name in _SAVED_DATASET_FILES):
            return "arrow", []
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not _is_hidden(f.relative_to(p)))
        # Parquet or Arrow shards first: a dataset repository also holds JSON metadata files.
        for suffixes in ((".parquet",), (".arrow",), (".jsonl", ".ndjson", ".json")):
            shards = [f for f in files if Path(f).suffix.lower() in suffixes]
            if shards:
                break
        if not shards:
            raise DataError(f"{key}: {path} is a folder without data files (expected Parquet or JSONL shards, "
                            "or a folder written by datasets' save_to_disk)")
        return _kind_of_shards(shards, path, key), shards
    if p.is_file():
        return _kind_of_file(path), [path]
    if not p.is_absolute() and "/" in path:
        return "hub", []
    raise DataError(f"{key}: file not found: {path}")


def _kind_of_file(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".arrow":
        return "arrow"
    if suffix == ".json" and not _is_json_lines(path):
        return "json"
    return "jsonl"  # any other file is JSON Lines, as it always was


def _kind_of_shards(shards: list[str], path: str, key: str) -> str:
    kinds = {_kind_of_file(shard) for shard in shards}
    if len(kinds) > 1:
        raise DataError(f"{key}: {path} holds files of several formats ({', '.join(sorted(kinds))}); "
                        "point it at one kind of shard, e.g. a glob like data/*.parquet")
    return kinds.pop()


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _is_json_lines(path: str) -> bool:
    """A `.json` file that is JSON Lines after all (many are named so): its first line is a whole
    JSON object and more follows, or it is one object that is not `{"data": [...]}`."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"["):
            return False
        handle.seek(0)
        first = handle.readline(64 << 20)
        try:
            record = json.loads(first.decode("utf-8-sig"))
        except (ValueError, RecursionError):
            return False  # an object over several lines: one JSON document
        rest = handle.read(1 << 16).strip()
    if rest:
        return True
    return not (isinstance(record, dict) and set(record) == {"data"} and isinstance(record["data"], list))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --- readers -----------------------------------------------------------------------------------

def _jsonl_lines(path: str, start: int = 0, offset: int = 0) -> Iterator[tuple[int, bytes | None, tuple[int, int]]]:
    """Non-blank lines after line `start`, which ends at byte `offset`: (number, bytes, (number, end byte))."""
    from loop.data.prepare import _lines, open_data_file

    with open_data_file(path) as handle:
        handle.seek(offset)
        for line_number, raw in _lines(handle):
            if raw is None or raw.strip():
                yield start + line_number, raw, (start + line_number, handle.tell())


def _json_records(path: str, key: str) -> list:
    """The records of a JSON array file (or `{"data": [...]}`); read whole, so it is refused naming
    the file if it cannot be read at all."""
    from loop.data.prepare import open_data_file

    with open_data_file(path) as handle:
        try:
            document = json.loads(handle.read().decode("utf-8-sig"))
        except UnicodeDecodeError as error:
            raise DataError(f"{key}: {path} is not UTF-8 text ({error})") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{key}: {path}: invalid JSON: {error.msg} at line {error.lineno} column "
                            f"{error.colno}") from None
        except RecursionError:
            raise DataError(f"{key}: {path}: JSON nested too deeply to read; flatten the records") from None
        except ValueError as error:  # an integer of more than 4300 digits
            raise DataError(f"{key}: {path}: unreadable JSON: {error}") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        return document["data"]
    if isinstance(document, list):
        return document
    raise DataError(f'{key}: {path} holds a JSON {type(document).__name__}; expected an array of records, '
                    '{"data": [...]}, or JSON Lines (one record per line)')


def _parquet_schema(shard: str, key: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(shard).schema_arrow
    except Exception as error:  # not Parquet, truncated, unreadable: pyarrow raises several kinds
        raise DataError(f"{key}: cannot read the Parquet shard {shard}: {type(error).__name__}: {error}") from None


def _parquet_batches(shard: str, key: str, start: int = 0):
    """Batches of rows from row `start` on; the row groups before it are not read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(shard)
        groups, skipped = list(range(parquet.num_row_groups)), 0
        while groups and skipped + parquet.metadata.row_group(groups[0]).num_rows <= start:
            skipped += parquet.metadata.row_group(groups.pop(0)).num_rows
        if groups:
            yield from _skip_rows(parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups), start - skipped)
    except (OSError, ValueError, ArithmeticError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{key}: cannot read the Parquet shard {shard}: {type(error).__name__}: {error}") from None


def _skip_rows(batches, num_rows: int):
    """`batches` without their first `num_rows` rows (whole batches skipped unread, the next one sliced)."""
    for batch in batches:
        if num_rows >= batch.num_rows:
            num_rows -= batch.num_rows
            continue
        yield batch.slice(num_rows) if num_rows else batch
        num_rows = 0


def _open_arrow(shard: str):
    import pyarrow as pa

    source = pa.OSFile(shard)
    try:
        return pa.ipc.open_stream(source)  # what datasets writes
    except pa.ArrowInvalid:
        source = pa.OSFile(shard)
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.schema


def _arrow_file_schema(shard: str, key: str):
    try:
        opened = _open_arrow(shard)
    except Exception as error:
        raise DataError(f"{key}: cannot read the Arrow file {shard}: {type(error).__name__}: {error}") from None
    return opened[1] if isinstance(opened, tuple) else opened.schema


def _arrow_file_batches(shard: str, key: str):
    try:
        opened = _open_arrow(shard)
        yield from (opened[0] if isinstance(opened, tuple) else opened)
    except (OSError, ValueError) as error:
        raise DataError(f"{key}: cannot read the Arrow file {shard}: {type(error).__name__}: {error}") from None


def _pick_split(splits: list[str], wanted: str, key: str, where: str, defaults: tuple[str, ...]) -> str:
    if wanted:
        if wanted in splits:
            return wanted
        raise DataError(f"{key}: {where} has no split {wanted!r}; its splits: {', '.join(splits)}")
    for name in defaults:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"{key}: {where} has several splits ({', '.join(splits)}); choose one with "
                    f"{_split_key(key)}")


def _split_key(key: str) -> str:
    return key.rsplit(".", 1)[0] + (".validation_split_name" if "validation" in key else ".split")


def _load_saved(files: DataFiles):
    import datasets

    try:
        loaded = datasets.load_from_disk(files.path)
    except Exception as error:  # a damaged or foreign folder: datasets raises several kinds
        raise DataError(f"{files.key}: cannot load {files.path} with datasets.load_from_disk: "
                        f"{type(error).__name__}: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        defaults = ("validation", "test") if "validation" in files.key else ("train",)
        files.split = _pick_split(list(loaded), files.split, files.key, files.path, defaults)
        return loaded[files.split]
    if files.split:
        logger.warning("%s: split %r ignored: %s holds one dataset, not a DatasetDict", files.key, files.split,
                       files.path)
    files.split = "all"
    return loaded


def _load_hub(files: DataFiles):
    """A hub dataset through `datasets.load_dataset`: from its local cache when offline."""
    import datasets

    what = f"{files.path}" + (f" (subset {files.subset!r})" if files.subset else "") \
        + (f" at revision {files.revision!r}" if files.revision else "")
    candidates = [files.split] if files.split else ["validation", "test"] if "validation" in files.key else ["train"]
    for split in candidates:
        files.split = split
        try:
            dataset = datasets.load_dataset(files.path, name=files.subset or None, split=files.split,
                                            revision=files.revision or None)
            break
        except ValueError as error:  # an unknown split: try the next name
            if files.split == candidates[-1] or "split" not in str(error).lower():
                raise _hub_error(files, what, error) from None
        except Exception as error:  # not found, offline without a cache, unknown subset: many kinds
            raise _hub_error(files, what, error) from None
    if isinstance(dataset, datasets.IterableDataset):  # pragma: no cover - load_dataset(streaming=False)
        raise DataError(f"{files.key}: {what} loads as a streaming dataset")
    return dataset


def _hub_error(files: DataFiles, what: str, error: Exception) -> DataError:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"{files.key}: cannot load the hub dataset {what}, split {files.split!r}: "
                     f"{type(error).__name__}: {message}. It is neither a local file or folder nor a dataset "
                     "that datasets.load_dataset can read (offline, only from its cache)")


def _dataset_files(dataset) -> list[str]:
    return [entry["filename"] for entry in dataset.cache_files]


def _missing_columns(files: DataFiles, where: str, missing: list[str], columns: list[str]) -> DataError:
    fields = [name for name, column in files.column_map.items() if column in missing]
    return DataError(f"{files.key}: {where} has no column {', '.join(map(repr, missing))} (column_map sets "
                     f"{', '.join(fields)} from it); its columns: {', '.join(columns)}")


# --- the job's sources -------------------------------------------------------------------------

@dataclass
class Source:
    """One training source (or the overall validation data) with how its records are rendered."""
    name: str
    key: str
    """Its job key for messages: `data.dataset_path`, `data.sources[2]`, `data.validation_path`."""
    files: DataFiles
    validation: DataFiles | None
    """Its own validation data."""
    profile_name: str
    profile: Profile
    system_prompt: str
    """Filled in (`{date}` replaced)."""
    train_on: str
    weight: float = 0.0
    num_samples: int = 0
    is_validation: bool = False
    """The overall validation data (`data.validation_path`), not a training source."""

    def fingerprint_part(self) -> list:
        from profiles import profile_fingerprint

        return [self.name, self.profile_name, profile_fingerprint(self.profile), self.system_prompt,
                self.train_on, self.weight, self.num_samples, self.is_validation]


def plan_sources(config: JobConfig, search_paths: list[Path]) -> list[Source]:
    """The training sources of the job, then the overall validation data if any; each checked
    (kind, shards, splits, columns, profile), so a bad source is refused before anything is read."""
    data = config.data
    profile_config = config.profile
    tables = data.sources or [SourceConfig(path=data.dataset_path, split=data.split, subset=data.subset,
                                           revision=data.revision, column_map=data.column_map,
                                           validation_split_name=data.validation_split_name)]
    sources = []
    for number, table in enumerate(tables, start=1):
        key = f"data.sources[{number}]" if data.sources else "data"
        path_key = f"{key}.path" if data.sources else "data.dataset_path"
        files = data_files(table.path, path_key, split=table.split, subset=table.subset, revision=table.revision,
                           column_map=table.column_map)
        validation = _own_validation(table, files, key, data)
        profile_name = table.profile or profile_config.name
        try:
            profile = get_profile(profile_name, search_paths=search_paths)
        except ConfigError as error:
            raise ConfigError(f"{key}.profile: {error}" if table.profile else str(error)) from None
        sources.append(Source(
            name=table.name or _default_name(table.path), key=key if data.sources else "data.dataset_path",
            files=files, validation=validation, profile_name=profile_name, profile=profile,
            system_prompt=fill_system_prompt(table.system_prompt or profile_config.system_prompt),
            train_on=table.train_on or profile_config.train_on, weight=table.weight,
            num_samples=table.num_samples))
    if data.sources and data.validation_path:
        files = data_files(data.validation_path, "data.validation_path", split=data.validation_split_name,
                           subset=data.subset, revision=data.revision, column_map=data.column_map)
        sources.append(Source(
            name=_default_name(data.validation_path), key="data.validation_path", files=files, validation=None,
            profile_name=profile_config.name, profile=get_profile(profile_config.name, search_paths=search_paths),
            system_prompt=fill_system_prompt(profile_config.system_prompt), train_on=profile_config.train_on,
            is_validation=True))
    _unique_names(sources)
    for source in sources:
        for files in (source.files, source.validation):
            if files is not None:
                files.check()
    return sources


def _own_validation(table: SourceConfig, files: DataFiles, key: str, data: DataConfig) -> DataFiles | None:
    """A source's validation data: its `validation_path`, or another split of itself
    (`validation_split_name` alone). With one source, `data.validation_path` is that source's."""
    path = table.validation_path if data.sources else data.validation_path
    path_key = f"{key}.validation_path" if data.sources else "data.validation_path"
    if path:
        return data_files(path, path_key, split=table.validation_split_name, subset=table.subset,
                          revision=table.revision, column_map=table.column_map)
    if not table.validation_split_name:
        return None
    if files.kind not in ("arrow", "hub") or files.shards:
        raise DataError(f"{key}.validation_split_name: {files.path} is a {files.kind} source with no splits; "
                        f"set {path_key} to its validation data")
    return DataFiles(path=files.path, key=f"{key}.validation_split_name", kind=files.kind,
                     split=table.validation_split_name, subset=files.subset, revision=files.revision,
                     column_map=files.column_map)


def _default_name(path: str) -> str:
    name = Path(path.rstrip("/")).name if not any(c in path for c in "*?[") else path
    return name or path


def _unique_names(sources: list[Source]) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        seen[source.name] = seen.get(source.name, 0) + 1
    repeated = {name for name, count in seen.items() if count > 1}
    for number, source in enumerate(sources, start=1):
        if source.name in repeated:
            source.name = f"{source.name} #{number}"


def mix_template(sources: list[Source], tokenizer, config: JobConfig) -> str | None:
    """The chat template the sources need (`chat_template_of`'s error if one needs it and there is none);
    warns about the settings of a source whose profile renders plain text."""
    from loop.data.render import chat_template_of

    for source in sources:
        if not source.profile.uses_chat_template:
            if source.system_prompt:
                logger.warning("%s: the system prompt is ignored: profile %r renders plain text without a chat "
                               "template", source.key, source.profile_name)
            if source.train_on != "assistant":
                logger.warning("%s: train_on is ignored: profile %r trains every token", source.key,
                               source.profile_name)
    if any(source.profile.uses_chat_template for source in sources):
        return chat_template_of(tokenizer)
    if config.data.chat_template:
        logger.warning("data.chat_template is ignored: every source renders plain text without a chat template")
    return None


def source_digests(sources: list[Source], config: JobConfig) -> dict[str, Any]:
    """The fingerprint parts of the data itself: `train` and `validation` as they always were for one
    JSONL file; with other sources, every source's data, validation and settings, and the seed that
    mixes them."""
    if is_plain(sources):
        first = sources[0]
        return {"train": first.files.digest(),
                "validation": first.validation.digest() if first.validation is not None else None}
    return {"train": [s.files.digest() for s in sources],
            "validation": [s.validation.digest() if s.validation is not None else None for s in sources],
            "sources": [s.fingerprint_part() for s in sources], "mix_seed": config.hyperparams.seed}


def is_plain(sources: list[Source]) -> bool:
    """One JSONL file (and maybe a JSONL validation file) read as before several sources existed: its
    cache fingerprint and checkpoint digest stay what they were."""
    first = sources[0]
    return (len(sources) == 1 and first.key == "data.dataset_path" and first.files.is_plain_jsonl
            and (first.validation is None or first.validation.is_plain_jsonl))


# --- mixing ------------------------------------------------------------------------------------

def mix_counts(sources: list[Source], num_examples: list[int]) -> list[int]:
    """Training examples each source contributes, given the examples it has.

    `num_samples` is exact. Weights share the examples of the weighted sources among them in
    proportion (largest remainders, so the shares add up exactly). Otherwise each example once.
    """
    weighted = [i for i, s in enumerate(sources) if s.weight > 0]
    counts = [s.num_samples if s.num_samples else n for s, n in zip(sources, num_examples)]
    if weighted:
        total = sum(num_examples[i] for i in weighted)
        weight_sum = sum(sources[i].weight for i in weighted)
        exact = [total * sources[i].weight / weight_sum for i in weighted]
        floors = [int(x) for x in exact]
        by_remainder = sorted(range(len(weighted)), key=lambda j: (floors[j] - exact[j], j))
        for j in by_remainder[:total - sum(floors)]:
            floors[j] += 1
        for i, count in zip(weighted, floors):
            counts[i] = count
    return counts


def repeats(num_examples: int, count: int, seed: int, source_number: int):
    """How often each of `num_examples` examples is taken to make `count`: every one count // n
    times, plus a seeded choice of count % n of them once more (none repeated in that choice)."""
    import numpy as np

    times, extra = divmod(count, num_examples) if num_examples else (0, 0)
    out = np.full(num_examples, times, dtype=np.int64)
    if extra:
        chosen = np.random.default_rng([seed, source_number]).choice(num_examples, size=extra, replace=False)
        out[chosen] += 1
    return out


# --- the report, per source --------------------------------------------------------------------

@dataclass
class MixReport(DataReport):
    """`DataReport` with what each source contributed."""
    sources: list[dict[str, Any]] = field(default_factory=list)
    """Per source: name, path, kind, profile, num_read, num_kept, dropped (by reason), num_truncated,
    num_train_examples (in the mix, repeats counted), num_validation_examples, num_tokens and
    num_trained_tokens (of its training examples in the mix), share and token_share of the mix."""

    def format(self) -> str:
        text = super().format()
        if len(self.sources) < 2 and not any(s.get("weight") or s.get("num_samples") for s in self.sources):
            return text
        lines = ["sources:",
                 f"  {'name':<24} {'read':>8} {'kept':>8} {'train':>8} {'valid.':>7} {'tokens':>10} "
                 f"{'trained':>10} {'share':>6} {'of tokens':>9}"]
        for s in self.sources:
            lines.append(f"  {s['name'][:24]:<24} {s['num_read']:>8} {s['num_kept']:>8} "
                         f"{s['num_train_examples']:>8} {s['num_validation_examples']:>7} {s['num_tokens']:>10} "
                         f"{s['num_trained_tokens']:>10} {s['share']:>6.1%} {s['token_share']:>9.1%}")
            if s["dropped"]:
                why = ", ".join(f"{count} {reason}" for reason, count in sorted(s["dropped"].items(),
                                                                                key=lambda item: -item[1]))
                lines.append(f"  {'':<24} dropped or skipped: {why}")
        return f"{text}\n" + "\n".join(lines)


def source_entry(source: Source, *, num_read: int, num_kept: int, dropped: dict[str, int], num_truncated: int,
                 num_train_examples: int, num_validation_examples: int, num_tokens: int,
                 num_trained_tokens: int) -> dict[str, Any]:
    """One source's line of `MixReport.sources` (shares are filled in once every source is known)."""
    return {"name": source.name, "path": source.files.path, "kind": source.files.kind,
            "split": source.files.split or None, "profile": source.profile_name, "train_on": source.train_on,
            "weight": source.weight, "num_samples": source.num_samples, "is_validation": source.is_validation,
            "num_read": num_read, "num_kept": num_kept,
            "dropped": {reason: count for reason, count in dropped.items() if count},
            "num_truncated": num_truncated, "num_train_examples": num_train_examples,
            "num_validation_examples": num_validation_examples, "num_tokens": num_tokens,
            "num_trained_tokens": num_trained_tokens, "share": 0.0, "token_share": 0.0}


def with_shares(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    examples = sum(e["num_train_examples"] for e in entries)
    tokens = sum(e["num_tokens"] for e in entries)
    for e in entries:
        e["share"] = e["num_train_examples"] / examples if examples else 0.0
        e["token_share"] = e["num_tokens"] / tokens if tokens else 0.0
    return entries


def mix_report(report: DataReport, entries: list[dict[str, Any]]) -> MixReport:
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    # Examples kept, each once: the training rows count an up-sampled example as often as it is taken.
    fields["num_kept"] = sum(e["num_kept"] for e in entries)
    return MixReport(**fields, sources=with_shares(entries))


__all__ = ["KINDS", "DataFiles", "MixReport", "Source", "data_files", "is_plain", "mix_counts",
           "mix_report", "plan_sources", "repeats", "source_entry", "source_kind"]
