"""The data layer: tokenizer, prepared datasets and batches for the training loop.

    from loop.data import load_tokenizer, build_datasets, build_dataloader
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, main_process_first=accelerator.main_process_first)
    loader = build_dataloader(data.train, config, tokenizer, shuffle=True)
    print(data.report.format())

Each dataset row holds `input_ids` and `labels` (`IGNORE_INDEX` where no loss is taken) and, with
`data.packing`, `position_ids`. The pieces live in this package: `render` (messages to tokens and
labels), `prepare` (reading, tokenizing, splitting, packing), `cache` (fingerprint, save, load),
`batches` (collator and sampler), `report` (what was kept and dropped), `templates` (built-in chat
templates).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.config import ConfigError, JobConfig
from loop.data.batches import Collator, EpochSampler, build_dataloader, example_lengths
from loop.data.prepare import (
    Records,
    Settings,
    keep_usable,
    pack,
    read_records,
    split_validation,
    tokenize_records,
)
from loop.data.cache import cache_root, code_digest, file_digest, fingerprint, load_cached, save_cache, tokenizer_digest
from loop.data.render import (
    IGNORE_INDEX,
    TRAIN_ON,
    DataError,
    Renderer,
    TemplateError,
    chat_template_of,
    has_generation_markers,
    render_messages,
    render_text,
)
from loop.data.report import MAX_PROBLEMS, DataReport, mark_trained
from loop.data.templates import CHATML_GENERATION_TEMPLATE
from profiles import Profile, fill_system_prompt, get_profile, profile_fingerprint

__all__ = [
    "IGNORE_INDEX", "TRAIN_ON", "Collator", "DataError", "DataReport", "EpochSampler", "PreparedData", "Renderer",
    "TemplateError", "build_dataloader", "build_datasets", "chat_template_of", "example_lengths",
    "has_generation_markers", "load_tokenizer", "mark_trained", "render_messages", "render_text",
]

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Any
    """`datasets.Dataset` of training rows."""
    validation: Any | None
    """Validation rows, or None when there is no validation data."""
    report: DataReport
    cache_path: Path | None = None
    """The cache folder these datasets were saved to or loaded from (None if it could not be written)."""
    from_cache: bool = False
    """True when nothing was tokenized: the datasets came from the cache."""
    digest: str = ""
    """The content of the data and how it was rendered, without paths: what a checkpoint records."""


# --- tokenizer ---------------------------------------------------------------------------------

def load_tokenizer(config: JobConfig):
    """The job's tokenizer: `model.tokenizer_path` (else `model.model_path`), `data.chat_template`
    applied, and a pad token (the eos token when the tokenizer has none)."""
    from transformers import AutoTokenizer

    key = "model.tokenizer_path" if config.model.tokenizer_path else "model.model_path"
    path = config.model.tokenizer_path or config.model.model_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if not Path(path).exists():  # neither a local folder nor (reachably) a hub id
            from loop.model import _load_message

            raise ConfigError(_load_message(key, path, error)) from None
        raise ConfigError(f"{key}: cannot load a tokenizer from {path!r}: {error}") from None
    if config.data.chat_template:
        tokenizer.chat_template = read_chat_template(config.data.chat_template)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"{key}: the tokenizer in {path!r} has neither a pad token nor an eos token; "
                              "add a pad_token to its tokenizer_config.json")
        # Padding is masked out of attention and loss, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_chat_template(value: str) -> str:
    """`data.chat_template`: "chatml", or a Jinja file (the config resolves it against the job's folder).

    A `.json` file may hold `{"chat_template": "..."}`, as `chat_template.json` files do.
    """
    if value == "chatml":
        # ChatML with {% generation %} markers: renders exactly like plain ChatML, and gives the exact
        # assistant mask.
        return CHATML_GENERATION_TEMPLATE
    path = Path(value).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f'data.chat_template: expected "chatml" or a template file; cannot read {value!r} '
                          f"({error.strerror or error})") from None
    if path.suffix == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            text = None
        if not isinstance(text, str):
            raise ConfigError(f'data.chat_template: {path} is JSON without a "chat_template" string')
    if not text.strip():
        raise ConfigError(f"data.chat_template: {path} is empty")
    return text


def _job_folder(config: JobConfig) -> Path | None:
    return Path(config.source).parent if config.source else None


# --- datasets ----------------------------------------------------------------------------------

def build_datasets(config: JobConfig, tokenizer, main_process_first: Callable[[], Any] | None = None
                   ) -> PreparedData:
    """Tokenized training and validation data for `config`, from the cache when it is there.

    `main_process_first` (e.g. `accelerator.main_process_first`) makes the main process prepare and
    cache the data while the others wait, then load it. Raises `DataError` (a `ConfigError`) for
    bad data under `on_bad_record = "error"`, an unusable chat template, or nothing left to train on.
    """
    profile = get_profile(config.profile.name, search_paths=[p for p in [_job_folder(config)] if p])
    system_prompt = fill_system_prompt(config.profile.system_prompt)
    template = _check_profile_settings(config, tokenizer, profile)
    parts = _fingerprint_parts(config, tokenizer, profile, system_prompt, template)
    folder = cache_root(config.data.cache_dir) / fingerprint(parts)

    failure = None
    with main_process_first() if main_process_first else nullcontext():
        # An error must not skip the barrier at the end of `main_process_first`, or the other
        # processes would wait for the main one forever: leave the block, then raise.
        try:
            prepared = _load_or_prepare(config, tokenizer, profile, system_prompt, folder)
        except Exception as error:
            failure = error
    if failure is not None:
        raise failure
    for warning in prepared.report.warnings():
        logger.warning("data: %s", warning)
    # What a checkpoint records of its data: the same parts without our code's digest or the files'
    # paths, so upgrading the project or moving the data keeps a run resumable; new content does not.
    prepared.digest = fingerprint({**parts, "code": None, "train": _content(parts["train"]),
                                   "validation": _content(parts["validation"])})
    return prepared


def _content(file_digest_: str | None) -> str | None:
    return file_digest_.rsplit(":", 1)[-1] if file_digest_ else None


def _check_profile_settings(config: JobConfig, tokenizer, profile: Profile) -> str | None:
    """The chat template the profile needs (a clear error if missing); warns about ignored settings."""
    if not profile.uses_chat_template:
        for key, value in (("profile.system_prompt", config.profile.system_prompt),
                           ("data.chat_template", config.data.chat_template)):
            if value:
                logger.warning("%s is ignored: profile %r renders plain text without a chat template",
                               key, config.profile.name)
        if config.profile.train_on != "assistant":
            logger.warning("profile.train_on is ignored: profile %r trains every token", config.profile.name)
        return None
    return chat_template_of(tokenizer)


def _fingerprint_parts(config: JobConfig, tokenizer, profile: Profile, system_prompt: str, template: str | None
                       ) -> dict:
    """Everything that decides the prepared rows; the cache folder is named by its hash."""
    data, monitoring = config.data, config.monitoring
    is_split = not data.validation_path and monitoring.validation_split > 0
    return {
        "code": code_digest(),
        "train": file_digest(data.dataset_path),
        "validation": file_digest(data.validation_path) if data.validation_path else None,
        "tokenizer": tokenizer_digest(tokenizer, template),
        "profile": [config.profile.name, profile_fingerprint(profile), system_prompt, config.profile.train_on],
        "length": [data.max_length, data.too_long, data.packing],
        "on_bad_record": data.on_bad_record,
        "split": [monitoring.validation_split, monitoring.validation_max_samples, config.hyperparams.seed]
        if is_split else None,
    }


def _load_or_prepare(config: JobConfig, tokenizer, profile: Profile, system_prompt: str, folder: Path
                     ) -> PreparedData:
    cached = load_cached(folder)
    if cached is not None:
        logger.info("data: loaded from cache %s", folder)
        return PreparedData(*cached, cache_path=folder, from_cache=True)
    train, validation, report = _prepare(config, tokenizer, profile, system_prompt, folder.name)
    if save_cache(folder, train, validation, report):
        # Serve the memory-mapped copy, exactly what a later run loads.
        train, validation, report = load_cached(folder) or (train, validation, report)
        return PreparedData(train, validation, report, cache_path=folder)
    return PreparedData(train, validation, report)


def _prepare(config: JobConfig, tokenizer, profile: Profile, system_prompt: str, fingerprint_: str):
    data, monitoring = config.data, config.monitoring
    settings = Settings(train_on=config.profile.train_on, max_length=data.max_length, too_long=data.too_long)

    def tokenized(path: str, name: str):
        records = read_records(path, profile, system_prompt, data.on_bad_record)
        rows = tokenize_records(records, tokenizer, settings, data.num_proc, f"{fingerprint_}-{name}")
        kept, num_truncated = keep_usable(rows, records, data.on_bad_record)
        return records, kept, num_truncated

    train_records, train, num_truncated = tokenized(data.dataset_path, "train")
    all_records = [train_records]
    _require_examples(train, [train_records], data.dataset_path)
    if data.validation_path:
        validation_records, validation, validation_truncated = tokenized(data.validation_path, "validation")
        all_records.append(validation_records)
        num_truncated += validation_truncated
        _require_examples(validation, [validation_records], data.validation_path)
    else:
        train, validation = split_validation(train, monitoring.validation_split,
                                             monitoring.validation_max_samples, config.hyperparams.seed)

    report = _report(train, validation, all_records, num_truncated, config)
    if data.packing:
        train = pack(train, data.max_length)
        validation = pack(validation, data.max_length) if validation is not None else None
    report.num_train_sequences = len(train)
    return train, validation, report


def _require_examples(dataset, records: list[Records], path: str) -> None:
    if dataset is not None and len(dataset):
        return
    read = sum(r.num_read for r in records)
    dropped = {}
    for r in records:
        for reason, count in r.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    why = ", ".join(f"{count} {reason}" for reason, count in dropped.items()) or "the file has no records"
    problems = "".join(f"\n  {p}" for r in records for p in r.problems[:5])
    raise DataError(f"{path}: no usable examples ({read} records read; {why}).{problems}")


def _report(train, validation, records: list[Records], num_truncated: int, config: JobConfig) -> DataReport:
    import numpy as np

    dropped: dict[str, int] = {}
    for r in records:
        for reason, count in r.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    lengths = np.asarray(example_lengths(train))
    labels = train.with_format("arrow")[:].column("labels").combine_chunks().values.to_numpy()
    num_validation = len(validation) if validation is not None else 0
    return DataReport(
        num_read=sum(r.num_read for r in records),
        num_kept=len(train) + num_validation,
        dropped=dropped,
        num_truncated=num_truncated,
        num_train_examples=len(train),
        num_validation_examples=num_validation,
        num_train_sequences=len(train),
        num_tokens=int(lengths.sum()),
        num_trained_tokens=int((labels != IGNORE_INDEX).sum()),
        length_p50=int(np.percentile(lengths, 50, method="higher")),
        length_p95=int(np.percentile(lengths, 95, method="higher")),
        length_max=int(lengths.max()),
        max_length=config.data.max_length,
        packing=config.data.packing,
        problems=[p for r in records for p in r.problems][:MAX_PROBLEMS],
        num_special_text=sum(r.num_special_text for r in records),
        special_text_example=next((r.special_text_example for r in records if r.special_text_example), ""),
        sample={"input_ids": list(train[0]["input_ids"]), "labels": list(train[0]["labels"])},
    )
