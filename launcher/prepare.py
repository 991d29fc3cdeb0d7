"""`python -m launcher prepare JOB.toml`: build the job's tokenized data cache ahead of training.

    python -m launcher prepare job.toml
    python -m launcher prepare job.toml --set data.num_proc=16

Reads, renders, tokenizes, mixes and packs every source exactly as `run` does (a progress bar per
source), then prints the data report and the cache folder. `run`, `validate` and `check` of the same
job then load the cache instead of tokenizing. With `data.cache_dir` on storage every machine mounts
at the same path, one `prepare` serves them all (see docs/data.md).
"""

from __future__ import annotations

from typing import Any

from launcher.config import ConfigError, load_config


def main_prepare(job_path: str, overrides: dict[str, Any]) -> int:
    """Prepare (or find) the cache of the job's data; 0, or `ConfigError` (exit 2) for a job, source or
    cache folder that cannot be used."""
    from loop.data import build_datasets, load_tokenizer

    config = load_config(job_path, overrides=overrides)
    if config.data.streaming:
        raise ConfigError("data.streaming: this job reads and tokenizes its data while training, so there is "
                          "nothing to prepare; run it, or set data.streaming = false to prepare a cache")
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    print(data.report.format())
    if data.cache_path is None:
        raise ConfigError("data.cache_dir: the prepared data could not be written to the cache (see the warning "
                          "above); set data.cache_dir to a writable folder")
    state = "already prepared: nothing was tokenized" if data.from_cache else "prepared now"
    print(f"\ncache: {data.cache_path} ({state})")
    return 0
