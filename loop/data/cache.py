"""The tokenized-data cache: a fingerprint of everything that shapes the rows, and atomic writes.

    folder = cache_root(config.data.cache_dir) / fingerprint(parts)
    cached = load_cached(folder)          # (train, validation, report), or None: missing or damaged
    with Staging(folder) as staging:      # a temporary sibling folder, prepared into in place
        write_dataset_folder(staging.path / "train", arrow_file, packed)
        staging.commit(report)            # renamed into place: whole, or not at all

A folder holds `train/` and `validation/` as `datasets.save_to_disk` lays them out (written once,
straight from the preparation's Arrow files, never copied), `report.json`, and `files.json`, the
size and checksum of every other file; a folder whose files no longer match is removed on load, with
a warning, and prepared again. Several processes, or machines sharing the folder, may prepare the
same fingerprint at once: each writes its own temporary folder and the first rename wins.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from loop.data.prepare import open_data_file
from loop.data.sources import MixReport

logger = logging.getLogger(__name__)

CACHE_ENV = "TRAINER_ENGINE_CACHE"
DEFAULT_CACHE = Path("~/.cache/trainer-engine/data")


def cache_root(cache_dir: str) -> Path:
    """`data.cache_dir`, else $TRAINER_ENGINE_CACHE, else ~/.cache/trainer-engine/data."""
    return Path(os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def file_digest(path: str | Path) -> str:
    """Path, size and content hash of a data file (content, so a copied or touched file still hits)."""
    digest = hashlib.blake2b(digest_size=16)
    with open_data_file(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"{Path(path).resolve()}:{os.path.getsize(path)}:{digest.hexdigest()}"


def tokenizer_digest(tokenizer, template: str | None) -> str:
    """What decides how text becomes tokens: vocabulary, merges, special tokens and the template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocabulary, json.dumps(tokenizer.special_tokens_map, sort_keys=True,
                                                              default=str), template or ""]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def code_digest() -> str:
    """Our own preparation code, so a change to it never serves stale data."""
    import profiles

    files = sorted(Path(__file__).parent.glob("*.py")) + sorted(Path(profiles.__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def load_cached(folder: Path):
    """(train, validation, report) from a cache folder, or None if it is missing or damaged.

    Every file is checked against the sizes and checksums written with it, so a truncated or
    overwritten file is found here, not as garbage or a crash in the middle of training; a damaged
    folder is removed (with a warning) so that it is prepared and written again.
    """
    import datasets

    if not (folder / "report.json").is_file():
        return None
    try:
        _verify(folder)
        report = MixReport.from_dict(json.loads((folder / "report.json").read_text()))
        train = datasets.load_from_disk(str(folder / "train"))
        validation = datasets.load_from_disk(str(folder / "validation")) \
            if (folder / "validation").is_dir() else None
    except Exception as error:  # whatever a damaged file makes json, Arrow or datasets raise
        logger.warning("the data cache %s is damaged (%s: %s); preparing the data again", folder,
                       type(error).__name__, error)
        _discard(folder)
        return None
    return train, validation, report


MANIFEST = "files.json"
"""In a cache folder: the size and checksum of every other file, written last."""


def _manifest(folder: Path) -> dict[str, list]:
    return {path.relative_to(folder).as_posix(): [path.stat().st_size, _checksum(path)]
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _checksum(path: Path) -> str:
    import xxhash  # a dependency of datasets; several GB/s, so checking a large cache takes seconds

    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(folder: Path) -> None:
    """Raise `ValueError` naming the first file that is missing or differs from the manifest."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST}: an interrupted or foreign write") from None
    for name, (size, checksum) in expected.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if path.stat().st_size != size:
            raise ValueError(f"{name} has {path.stat().st_size} bytes, {size} when written")
        if _checksum(path) != checksum:
            raise ValueError(f"{name} is not what was written (checksum differs)")


def _discard(folder: Path) -> None:
    """Move a damaged cache folder out of the way (atomically), then delete it."""
    doomed = folder.parent / f".{folder.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, doomed)
    except OSError:
        return  # another process moved it already, or the folder is read-only: preparing still works
    shutil.rmtree(doomed, ignore_errors=True)


class Staging:
    """A temporary sibling of the cache folder that the data is prepared into, then renamed into place.

    When the cache folder cannot be written (read-only, no space), a temporary folder elsewhere takes
    its place for this process (removed at exit) and `commit` says so with a warning.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.is_cache = True
        try:
            self.path.mkdir(parents=True)
        except OSError as error:
            logger.warning("cannot write the data cache under %s (%s); set data.cache_dir to a writable folder "
                           "to skip tokenizing next time", folder.parent, error)
            self.path = Path(tempfile.mkdtemp(prefix="trainer-engine-data-"))
            self.is_cache = False
            atexit.register(shutil.rmtree, self.path, ignore_errors=True)

    @property
    def work(self) -> Path:
        """For the preparation's own files, removed before the commit."""
        return self.path / "work"

    def commit(self, report) -> Path:
        """Write the report and the manifest, rename into place; the folder the data is now in."""
        shutil.rmtree(self.work, ignore_errors=True)
        (self.path / "report.json").write_text(json.dumps(report.to_dict()))
        if not self.is_cache:
            return self.path
        try:
            # The manifest last, covering every file: `load_cached` finds any that changed since.
            (self.path / MANIFEST).write_text(json.dumps(_manifest(self.path)))
            os.rename(self.path, self.folder)
        except OSError as error:
            if (self.folder / "report.json").is_file():  # another process (or machine) renamed first
                shutil.rmtree(self.path, ignore_errors=True)
                return self.folder
            logger.warning("cannot write the data cache %s (%s); set data.cache_dir to a writable folder to skip "
                           "tokenizing next time", self.folder, error)
            atexit.register(shutil.rmtree, self.path, ignore_errors=True)
            return self.path
        return self.folder

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None and self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def write_dataset_folder(folder: Path, arrow_file: Path, packed: bool, fingerprint_: str) -> Path:
    """Make `folder` what `datasets.save_to_disk` writes, around `arrow_file` (moved in, not copied);
    `fingerprint_` becomes the dataset's `_fingerprint`."""
    import datasets

    from loop.data.stream import features

    folder.mkdir(parents=True, exist_ok=True)
    name = "data-00000-of-00001.arrow"
    os.replace(arrow_file, folder / name)
    state = {"_data_files": [{"filename": name}], "_fingerprint": fingerprint_, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    datasets.DatasetInfo(features=features(packed)).write_to_directory(str(folder))
    return folder
