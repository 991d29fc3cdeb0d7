"""The data layer: tokenizer, prepared datasets and batches for the training loop.

    from loop.data import load_tokenizer, build_datasets, build_dataloader
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer, main_process_first=accelerator.main_process_first)
    loader = build_dataloader(data.train, config, tokenizer, shuffle=True)
    print(data.report.format())

Each dataset row holds `input_ids` and `labels` (`IGNORE_INDEX` where no loss is taken) and, with
`data.packing`, `position_ids`. The pieces live in this package: `render` (messages to tokens and
labels), `prepare` (reading, tokenizing, splitting, packing), `sources` (the job's sources, their
formats, the mix and its report), `stream` (preparation a chunk at a time, in bounded memory),
`cache` (fingerprint, save, load), `batches` (collator and sampler), `report` (what was kept and
dropped), `templates` (built-in chat templates), `streaming` (`data.streaming`: no cache; records read,
tokenized and packed while training, resumable from any step).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.config import ConfigError, JobConfig
from loop.data.batches import Collator, EpochSampler, build_dataloader, count_trained_tokens, example_lengths
from loop.data.prepare import Records, Settings
from loop.data.cache import (
    Staging,
    cache_root,
    code_digest,
    fingerprint,
    load_cached,
    tokenizer_digest,
    write_dataset_folder,
)
from loop.data.sources import Source, mix_report, mix_template, plan_sources, source_digests
from loop.data.stream import dataset, mix_and_split, pack_file, require_examples, tokenize_files
from loop.data.render import (
    IGNORE_INDEX,
    TRAIN_ON,
    DataError,
    Rendered,
    Renderer,
    TemplateError,
    chat_template_of,
    has_generation_markers,
    render_conversation,
    render_messages,
    render_text,
)
from loop.data.report import MAX_PROBLEMS, DataReport, mark_trained
from loop.data.templates import CHATML_GENERATION_TEMPLATE
from profiles import Profile, fill_system_prompt, get_profile, profile_fingerprint

__all__ = [
    "IGNORE_INDEX", "TRAIN_ON", "Collator", "DataError", "DataReport", "EpochSampler", "PreparedData", "Rendered",
    "Renderer", "TemplateError", "build_dataloader", "build_datasets", "chat_template_of", "example_lengths",
    "has_generation_markers", "load_tokenizer", "mark_trained", "render_conversation", "render_messages",
    "render_text",
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
    search_paths = [p for p in [_job_folder(config)] if p]
    profile = get_profile(config.profile.name, search_paths=search_paths)
    system_prompt = fill_system_prompt(config.profile.system_prompt)
    sources = plan_sources(config, search_paths)  # every source checked before anything is read
    template = _check_profile_settings(config, tokenizer, profile) if not config.data.sources \
        else mix_template(sources, tokenizer, config)
    parts = _fingerprint_parts(config, tokenizer, profile, system_prompt, template, sources)
    folder = cache_root(config.data.cache_dir) / fingerprint(parts)

    failure = None
    with main_process_first() if main_process_first else nullcontext():
        # An error must not skip the barrier at the end of `main_process_first`, or the other
        # processes would wait for the main one forever: leave the block, then raise.
        try:
            prepared = _load_or_prepare(config, tokenizer, sources, folder)
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


def _content(file_digest_: str | list | None) -> str | list | None:
    if isinstance(file_digest_, list):  # several sources
        return [_content(d) for d in file_digest_]
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


def _fingerprint_parts(config: JobConfig, tokenizer, profile: Profile, system_prompt: str, template: str | None,
                       sources: list[Source]) -> dict:
    """Everything that decides the prepared rows; the cache folder is named by its hash."""
    data, monitoring = config.data, config.monitoring
    is_split = not data.validation_path and monitoring.validation_split > 0
    return {
        "code": code_digest(),
        # train and validation (one JSONL file each: as they always were), and with other sources, theirs.
        **source_digests(sources, config),
        "tokenizer": tokenizer_digest(tokenizer, template),
        # unstable_turns only when "refuse": the default leaves the digest of runs begun before it existed.
        "profile": [config.profile.name, profile_fingerprint(profile), system_prompt, config.profile.train_on]
        + (["refuse"] if config.profile.unstable_turns == "refuse" else []),
        "length": [data.max_length, data.too_long, data.packing],
        "on_bad_record": data.on_bad_record,
        "split": [monitoring.validation_split, monitoring.validation_max_samples, config.hyperparams.seed]
        if is_split else None,
    }


def _load_or_prepare(config: JobConfig, tokenizer, sources: list[Source], folder: Path) -> PreparedData:
    import datasets

    cached = load_cached(folder)
    if cached is not None:
        logger.info("data: loaded from cache %s", folder)
        return PreparedData(*cached, cache_path=folder, from_cache=True)
    with Staging(folder) as staging:
        report = _prepare(config, tokenizer, sources, staging.path, folder.name)
        path = staging.commit(report)
    if path == folder:
        # Checked and memory-mapped, exactly what a later run loads.
        cached = load_cached(folder)
        if cached is not None:
            return PreparedData(*cached, cache_path=folder)
    train = datasets.load_from_disk(str(path / "train"))
    validation = datasets.load_from_disk(str(path / "validation")) if (path / "validation").is_dir() else None
    return PreparedData(train, validation, report)


def _prepare(config: JobConfig, tokenizer, sources: list[Source], out: Path, fingerprint_: str):
    """Tokenize, hold out, mix and pack every source into `out/train` and `out/validation`, a chunk at a
    time (`loop.data.stream`); the report."""
    data, monitoring = config.data, config.monitoring
    settings = Settings(train_on=config.profile.train_on, max_length=data.max_length, too_long=data.too_long,
                        unstable_turns=config.profile.unstable_turns)
    work = out / "work"

    def tokenized(source: Source, files, name: str):
        examples = tokenize_files(source, files, tokenizer, settings, num_proc=data.num_proc,
                                  on_bad_record=data.on_bad_record, out=work / f"{name}.arrow",
                                  fingerprint=f"{fingerprint_}-{name}")
        require_examples(examples, files)
        return examples

    train = [tokenized(s, s.files, f"{i}-train") for i, s in enumerate(sources)]
    own = [tokenized(s, s.validation, f"{i}-validation") if s.validation else None for i, s in enumerate(sources)]
    mixed = mix_and_split(sources, train, own, split=monitoring.validation_split,
                          max_samples=monitoring.validation_max_samples, seed=config.hyperparams.seed,
                          train_out=work / "train.arrow", validation_out=work / "validation.arrow")
    examples = [*train, *(e for e in own if e is not None)]
    report = _report(dataset(mixed.train), dataset(mixed.validation), [e.records for e in examples],
                     sum(e.num_truncated for e in examples), config,
                     num_trained_tokens=sum(e["num_trained_tokens"] for e in mixed.entries))
    train_file, validation_file = mixed.train, mixed.validation
    if data.packing:
        train_file = pack_file(mixed.train, mixed.lengths, data.max_length, work / "train-packed.arrow")
        if validation_file is not None:
            validation_file = pack_file(mixed.validation, mixed.validation_lengths, data.max_length,
                                        work / "validation-packed.arrow")
    report = mix_report(report, mixed.entries)
    report.num_train_sequences = len(dataset(train_file))
    write_dataset_folder(out / "train", train_file, data.packing, f"{fingerprint_}-train")
    if validation_file is not None:
        write_dataset_folder(out / "validation", validation_file, data.packing, f"{fingerprint_}-validation")
    return report


def _report(train, validation, records: list[Records], num_truncated: int, config: JobConfig,
            num_trained_tokens: int | None = None) -> DataReport:
    """`num_trained_tokens` when known already: counting reads every label of `train`."""
    import numpy as np

    dropped: dict[str, int] = {}
    for r in records:
        for reason, count in r.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
    lengths = np.asarray(example_lengths(train))
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
        num_trained_tokens=count_trained_tokens(train) if num_trained_tokens is None else num_trained_tokens,
        length_p50=int(np.percentile(lengths, 50, method="higher")),
        length_p95=int(np.percentile(lengths, 95, method="higher")),
        length_max=int(lengths.max()),
        max_length=config.data.max_length,
        packing=config.data.packing,
        problems=[p for r in records for p in r.problems][:MAX_PROBLEMS],
        num_special_text=sum(r.num_special_text for r in records),
        special_text_example=next((r.special_text_example for r in records if r.special_text_example), ""),
        num_split=sum(r.num_split for r in records),
        num_split_examples=sum(r.num_split_examples for r in records),
        num_split_tokens=sum(r.num_split_tokens for r in records),
        num_unsplit_tokens=sum(r.num_unsplit_tokens for r in records),
        num_dropped_content=sum(r.num_dropped_content for r in records),
        dropped_content_example=next((r.dropped_content_example for r in records if r.dropped_content_example), ""),
        sample={"input_ids": list(train[0]["input_ids"]), "labels": list(train[0]["labels"])},
    )
