"""Shared fixtures: a tiny model built once per session, and job files written on demand.

    def test_something(make_job, tmp_path):
        config = make_job(tmp_path, records=[{"messages": [...]}], **{"hyperparams.max_steps": 3})

    def test_tokens(tiny_tokenizer):            # a fresh tokenizer per test (safe to modify)
        ...

Plain helpers (job files, chat records, launcher processes) are in tests/helpers.py.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from helpers import LONG_FORM_ENV, STATS_ENV, chat_records, write_job, write_jsonl, write_stats  # noqa: F401


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help=f"the long forms: 40 kill trials, thousands of property examples (or {LONG_FORM_ENV}=1)")


def pytest_configure(config):
    # Through the environment, so that module-level settings and subprocesses see it too.
    if config.getoption("--long"):
        os.environ[LONG_FORM_ENV] = "1"
    if os.environ.get(STATS_ENV):
        _count_property_examples()


PROPERTY_EXAMPLES: Counter = Counter()
"""Hypothesis test cases run, by outcome, when scripts/reliability_figures.py asks for statistics."""


def _count_property_examples() -> None:
    # Hypothesis reports each test case it runs to observability callbacks; coverage is not wanted.
    from hypothesis.internal import observability

    observability.OBSERVABILITY_COLLECT_COVERAGE = False

    def count(observation, thread_id):
        if observation.type == "test_case":
            PROPERTY_EXAMPLES[observation.status] += 1

    observability.add_observability_callback(count, all_threads=True)


def pytest_sessionfinish(session):
    if os.environ.get(STATS_ENV):
        write_stats("property_examples", dict(PROPERTY_EXAMPLES))


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
