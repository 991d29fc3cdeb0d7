"""Shared fixtures: a tiny model built once per session, and job files written on demand.

    def test_something(make_job, tmp_path):
        config = make_job(tmp_path, records=[{"messages": [...]}], **{"hyperparams.max_steps": 3})

    def test_tokens(tiny_tokenizer):            # a fresh tokenizer per test (safe to modify)
        ...

Plain helpers (job files, chat records, launcher processes) are in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from helpers import chat_records, write_job, write_jsonl  # noqa: F401  (test_data.py imports the last from here)


@pytest.fixture(scope="session", autouse=True)
def _data_cache_outside_home(tmp_path_factory):
    """Tokenized-data caches of jobs without `data.cache_dir` go to a session folder, not ~/.cache.

    Set in os.environ (not monkeypatch) so that subprocesses a test starts inherit it.
    """
    previous = os.environ.get("TRAINER_ENGINE_CACHE")
    if previous is None:
        os.environ["TRAINER_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("trainer-engine-cache"))
    yield
    if previous is None:
        os.environ.pop("TRAINER_ENGINE_CACHE", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen3 with a byte-level BPE ChatML tokenizer (no generation markers), built once."""
    from launcher.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    """A freshly loaded tokenizer of the tiny model (tests may change its template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_job(tiny_model_dir):
    """`make_job(folder, records=None, validation_records=None, **{"section.key": value})` -> JobConfig.

    `helpers.write_job` for the tiny model (`records` default to `chat_records()`), loaded with
    `launcher.load_config`. The file stands alone, so it also works for subprocesses.
    """
    from launcher.config import load_config

    def make(folder: str | Path, records: list[Any] | None = None, validation_records: list[Any] | None = None,
             **overrides: Any):
        job = write_job(folder, tiny_model_dir, chat_records() if records is None else records,
                        validation_records=validation_records, **overrides)
        return load_config(job)

    return make
