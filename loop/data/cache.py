"""The tokenized-data cache: a fingerprint of everything that shapes the rows, and atomic save/load.

    folder = cache_root(config.data.cache_dir) / fingerprint(parts)
    cached = load_cached(folder)          # (train, validation, report) or None
    save_cache(folder, train, validation, report)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from loop.data.prepare import open_data_file
from loop.data.report import DataReport

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
    """(train, validation, report) from a cache folder, or None if it is missing or unreadable."""
    import datasets

    if not (folder / "report.json").is_file():
        return None
    try:
        report = DataReport.from_dict(json.loads((folder / "report.json").read_text()))
        train = datasets.load_from_disk(str(folder / "train"))
        validation = datasets.load_from_disk(str(folder / "validation")) \
            if (folder / "validation").is_dir() else None
    except (OSError, ValueError, FileNotFoundError) as error:
        logger.warning("ignoring unreadable data cache %s (%s); preparing again", folder, error)
        return None
    return train, validation, report


def save_cache(folder: Path, train, validation, report: DataReport) -> bool:
    """Write atomically: a temporary sibling folder renamed into place. False if it cannot be written."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    temporary = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    was_disabled = are_progress_bars_disabled()
    try:
        temporary.mkdir(parents=True)
        disable_progress_bars()  # saving takes a blink; its bars would only clutter `validate`
        train.save_to_disk(str(temporary / "train"))
        if validation is not None:
            validation.save_to_disk(str(temporary / "validation"))
        # report.json last: its presence marks a complete folder (rename is atomic anyway).
        (temporary / "report.json").write_text(json.dumps(report.to_dict()))
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / "report.json").is_file():  # not a concurrent writer: a real failure
                raise
        return True
    except OSError as error:
        logger.warning("cannot write the data cache under %s (%s); set data.cache_dir to a writable folder "
                       "to skip tokenizing next time", folder.parent, error)
        return False
    finally:
        if not was_disabled:
            enable_progress_bars()
        shutil.rmtree(temporary, ignore_errors=True)
