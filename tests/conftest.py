"""Shared fixtures: a tiny model built once per session, and job files written on demand.

    def test_something(make_job, tmp_path):
        config = make_job(tmp_path, records=[{"messages": [...]}], **{"hyperparams.max_steps": 3})

    def test_tokens(tiny_tokenizer):            # a fresh tokenizer per test (safe to modify)
        ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from launcher.config import toml_value


def chat_records(count: int = 16) -> list[dict[str, Any]]:
    """`count` small, varied chat records (some multi-turn, some with a system prompt)."""
    topics = ["the capital of France", "reversing a list in Python", "gradient descent", "a haiku about autumn",
              "good morning in Spanish", "the plot of a heist film", "photosynthesis", "SQL GROUP BY"]
    records = []
    for i in range(count):
        topic = topics[i % len(topics)]
        messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"Tell me about {topic}."},
                     {"role": "assistant", "content": f"Here is a short answer about {topic}." + " Sure." * (i % 5)}]
        if i % 4 == 1:
            messages += [{"role": "user", "content": "Thank you! Could you clarify?"},
                         {"role": "assistant", "content": f"You're welcome. In one sentence: {topic}."}]
        records.append({"messages": messages})
    return records


def write_jsonl(path: str | Path, records: list[Any]) -> Path:
    """One JSON value per line; a `str` item is written as is (for invalid lines in tests)."""
    path = Path(path)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path




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

    Writes `folder/job.toml` (the tiny model, `folder/train.jsonl` from `records` or `chat_records()`,
    output in `folder/out`, data cache in `folder/cache`) with the dotted keys as TOML values, then
    loads it with `launcher.load_config`. The file stands alone, so it also works for subprocesses.
    """
    from launcher.config import load_config

    def make(folder: str | Path, records: list[Any] | None = None, validation_records: list[Any] | None = None,
             **overrides: Any):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "train.jsonl", chat_records() if records is None else records)
        values: dict[str, Any] = {
            "model.model_path": str(tiny_model_dir),
            "data.dataset_path": "train.jsonl",
            "data.cache_dir": "cache",
            "output.output_dir": "out",
        }
        if validation_records is not None:
            write_jsonl(folder / "validation.jsonl", validation_records)
            values["data.validation_path"] = "validation.jsonl"
        values.update(overrides)
        sections: dict[str, list[str]] = {}
        for dotted, value in values.items():
            section, key = dotted.split(".", 1)
            sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
        text = "\n".join(f"[{name}]\n" + "\n".join(lines) + "\n" for name, lines in sections.items())
        (folder / "job.toml").write_text(text, encoding="utf-8")
        return load_config(folder / "job.toml")

    return make
