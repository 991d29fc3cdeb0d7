"""The job file: TOML in, typed and validated config objects out.

    from launcher import load_config
    config = load_config("job.toml", overrides={"hyperparams.max_steps": 20})

Every section is a dataclass with a one-line docstring under each field; those docstrings are the
job-file reference (`python -m launcher reference` prints it). Loading is strict: an unknown key, a
wrong type, a value out of range or two settings that contradict each other all end in one
`ConfigError` that lists every problem with its dotted key, file and line.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class Precision(NamedTuple):
    mixed_precision: str
    """Accelerate's name for it."""
    dtype: str
    """The torch dtype of compute (and of 4-bit layers' compute)."""


# The one table of `hyperparams.fp_precision` values.
PRECISIONS = {"bf16": Precision("bf16", "bfloat16"), "fp16": Precision("fp16", "float16"),
              "fp32": Precision("no", "float32")}


class ConfigError(ValueError):
    """A job that cannot run as written; the message says what to change."""


# Upper bounds far above any real job yet low enough that every library below us can hold the value
# (numpy seeds, timedelta, int64 tensors): a typo such as `learning_rate = 2e5` or a stray digit is
# refused with the key and its range instead of failing somewhere inside the training.
MAX_STEPS = 10**9
"""Optimizer steps, intervals in steps, and counts of examples."""
MAX_TOKENS = 2**22
"""Tokens per sequence."""


def _range(*, ge=None, gt=None, le=None, lt=None) -> dict:
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


def _f(default, **bounds):
    """A field with a numeric range (`ge`/`gt` below, `le`/`lt` above), checked on load and shown in the
    reference. Every number gets both bounds; for a list of numbers the range applies to each item."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_range(**bounds))
    return field(default=default, metadata=_range(**bounds))


@dataclass
class ModelConfig:
    model_path: str = ""
    """Local folder with a Hugging Face causal LM (or a hub id when the hub is reachable). Required."""
    tokenizer_path: str = ""
    """Folder of the tokenizer; empty uses `model_path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the weights are loaded in; `auto` is float32 for training under autocast."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "auto"
    """Attention kernel; `auto`: sdpa where supported (once per packed example), else eager; flash needs CUDA and flash-attn."""
    load_in_4bit: bool = False
    """Load the base model in 4-bit NF4 through bitsandbytes (QLoRA; needs `[lora] enabled = true`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory at the cost of time."""
    compile: bool = False
    """`torch.compile` each decoder layer (compiled once on the first steps, then faster)."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code shipped with the checkpoint to run. Off unless you trust it."""


@dataclass
class SourceConfig:
    path: str = ""
    """Data of this source, in any form `data.dataset_path` takes. Required."""
    name: str = ""
    """Name in the data report; empty uses the file or folder name."""
    split: str = ""
    """Split of a hub dataset or saved `DatasetDict`; empty: `train`, or the only split."""
    subset: str = ""
    """Configuration (subset) of a hub dataset; empty: its default."""
    revision: str = ""
    """Branch, tag or commit of a hub dataset; empty: the newest in the local cache or on the hub."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Profile fields read from other columns, e.g. `{instruction = "question", output = "answer"}`."""
    validation_path: str = ""
    """This source's own validation data (any form `path` takes), rendered like the source."""
    validation_split_name: str = ""
    """Validation split of `validation_path`, or without it of this hub dataset or saved `DatasetDict` itself; empty: `validation`, `test` or the only one."""
    profile: str = ""
    """Record format of this source (see `[profile] name`); empty uses `[profile] name`."""
    system_prompt: str = ""
    """System prompt of this source's records; empty uses `[profile] system_prompt`."""
    train_on: Literal["", "assistant", "last_assistant", "all"] = ""
    """Which tokens carry loss in this source; empty uses `[profile] train_on`."""
    weight: float = _f(0.0, ge=0, le=1_000_000)
    """Share of the training mix relative to the other sources' weights (sampled by seed); 0 (unset) takes each example once."""
    num_samples: int = _f(0, ge=0, le=MAX_STEPS)
    """Exactly this many training examples from the source, down- or up-sampled by seed; 0 (unset) takes each once."""


@dataclass
class DataConfig:
    dataset_path: str = ""
    """Training data: JSONL, JSON, Parquet (file, folder or glob of shards), a `save_to_disk` folder, or a hub id `owner/name`. Required unless `sources` is given."""
    validation_path: str = ""
    """Optional validation data in the same forms; when empty, `monitoring.validation_split` carves one out."""
    split: str = ""
    """Split of a hub dataset or saved `DatasetDict` at `dataset_path`; empty: `train`, or the only split."""
    subset: str = ""
    """Configuration (subset) of a hub dataset; empty: its default."""
    revision: str = ""
    """Branch, tag or commit of a hub dataset; empty: the newest in the local cache or on the hub."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Profile fields read from other columns, e.g. `{instruction = "question", output = "answer"}`."""
    validation_split_name: str = ""
    """Validation split of `validation_path`, or without it of this hub dataset or saved `DatasetDict` itself; empty: `validation`, `test` or the only one."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several training sources, one `[[data.sources]]` table each (keys below); leave `dataset_path` empty then."""
    max_length: int = _f(2048, ge=8, le=MAX_TOKENS)
    """Maximum tokens per example (per packed sequence with packing)."""
    packing: bool = False
    """Pack several examples into each sequence, with no attention across example boundaries."""
    shuffle: bool = True
    """Shuffle training examples each epoch (deterministic by seed); false keeps file order."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A malformed record: `error` stops with its line number, `skip` counts and reports it."""
    too_long: Literal["truncate", "drop"] = "truncate"
    """An example longer than `max_length`: `truncate` keeps what fits, `drop` removes it."""
    chat_template: str = ""
    """Override the tokenizer's chat template: `chatml`, or a path to a Jinja template file."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); shuffled within the epoch."""
    pad_to_multiple_of: int = _f(0, ge=0, le=2**16)
    """Pad each batch to a multiple of this many tokens (8 helps tensor cores); 0 pads to the longest."""
    num_proc: int = _f(1, ge=1, le=1024)
    """Processes used to tokenize the data set."""
    cache_dir: str = ""
    """Where tokenized data is cached; empty uses `~/.cache/trainer-engine/data`."""
    streaming: bool = False
    """Read, tokenize and pack the training data while training, in bounded memory and with no cache; needs `hyperparams.max_steps` > 0."""
    stream_buffer: int = _f(1000, ge=1, le=2**20)
    """With `streaming`: records read, tokenized, packed and shuffled together; a resume re-reads at most this many."""


@dataclass
class ProfileConfig:
    name: str = "chat"
    """Record format: chat | alpaca | sharegpt | completion | text, or `pkg.module:Class`."""
    system_prompt: str = ""
    """System prompt inserted where a record has none; `{date}` is filled in. Empty keeps the data's own."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn, only the last one, or every token."""
    unstable_turns: Literal["split", "refuse"] = "split"
    """A reply the template renders differently once later turns follow: train it in an example of its own, or refuse."""


@dataclass
class HyperparamsConfig:
    batch_size: int = _f(1, ge=1, le=2**20)
    """Examples per process per micro-step."""
    gradient_accumulation: int = _f(1, ge=1, le=2**20)
    """Micro-steps per optimizer step."""
    learning_rate: float = _f(2e-5, gt=0, le=10)
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = _f(0, ge=0, le=MAX_STEPS)
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""
    num_epochs: float = _f(1.0, ge=0, le=10_000)
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = _f(-1, ge=-1, le=MAX_STEPS)
    """Optimizer steps to run; > 0 overrides `num_epochs`, -1 uses `num_epochs`."""
    max_grad_norm: float = _f(1.0, ge=0, le=1_000_000)
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    weight_decay: float = _f(0.0, ge=0, le=10)
    """AdamW weight decay, not applied to biases and norm weights."""
    adam_betas: list[float] = _f([0.9, 0.999], ge=0, lt=1)
    """AdamW betas, two numbers in [0, 1)."""
    adam_epsilon: float = _f(1e-8, gt=0, le=1)
    """AdamW epsilon."""
    fp_precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision of forward and backward; fp16 needs a CUDA GPU."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"] = "adamw"
    """adamw (fused AdamW), adamw_8bit / paged_adamw_8bit (bitsandbytes, 8-bit states) or adafactor (factored states)."""
    loss: Literal["auto", "fused", "logits"] = "auto"
    """fused computes the loss from the hidden states without the full logits; auto uses it where exact."""
    seed: int = _f(42, ge=0, le=2**32 - 1)
    """Seed for weights of new layers, shuffling, dropout and the validation split."""
    save_steps: int = _f(500, ge=0, le=MAX_STEPS)
    """Optimizer steps between resumable checkpoints; 0 saves only the final model."""
    save_total_limit: int = _f(3, ge=1, le=1_000_000)
    """Step checkpoints kept; the oldest complete ones are removed."""
    eval_steps: int = _f(0, ge=0, le=MAX_STEPS)
    """Optimizer steps between evaluations; 0 evaluates only at the end (when there is validation data)."""


@dataclass
class OutputConfig:
    output_dir: str = ""
    """Folder of this run: checkpoints, final model, status, metrics. Required."""
    resume: str = "auto"
    """`auto` continues from the newest complete checkpoint, `never` starts fresh, or a checkpoint path."""
    overwrite: bool = False
    """Allow a fresh run (`resume = "never"`) to replace checkpoints an earlier run left in `output_dir`."""
    resume_changes: Literal["refuse", "allow"] = "refuse"
    """On resume, `refuse` names each changed setting; `allow` applies new optimizer, schedule, length and interval settings from the resumed step."""
    merge_lora: bool = False
    """With LoRA, also write `final/merged`, the adapter merged into the base weights."""


@dataclass
class MonitoringConfig:
    validation_split: float = _f(0.0, ge=0, lt=1)
    """Fraction of the training data held out for validation when `data.validation_path` is empty."""
    validation_max_samples: int = _f(500, ge=1, le=MAX_STEPS)
    """Cap on the held-out validation examples: min(cap, int(n * split))."""
    preview_steps: int = _f(0, ge=0, le=MAX_STEPS)
    """Optimizer steps between sample generations; 0 disables them."""
    preview_prompts: list[str] = _f([])
    """User prompts for sample generations; empty uses the first validation prompts."""
    preview_num_prompts: int = _f(2, ge=1, le=1024)
    """How many validation prompts to sample when `preview_prompts` is empty."""
    preview_max_new_tokens: int = _f(64, ge=1, le=2**16)
    """Tokens generated per sample (greedy)."""


@dataclass
class EnvironmentConfig:
    logging_steps: int = _f(10, ge=1, le=MAX_STEPS)
    """Optimizer steps between metric records and log lines."""
    report_to: list[str] = _f([])
    """Experiment trackers through Accelerate: tensorboard, wandb, mlflow, ..."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Python logging level of the main process."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = _f(16, ge=1, le=2**16)
    """LoRA rank."""
    alpha: float = _f(32.0, gt=0, le=1_000_000)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = _f(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names."""
    modules_to_save: list[str] = _f([])
    """Modules trained in full and saved with the adapter (e.g. `lm_head` after adding tokens)."""


@dataclass
class LaunchConfig:
    num_processes: int = _f(1, ge=1, le=1024)
    """Processes (usually GPUs) on this machine; > 1 makes `run` start `accelerate launch`."""
    accelerate_config: str = ""
    """An Accelerate config file (see `accelerate_configs/`) used when `run` launches."""
    timeout_minutes: int = _f(30, ge=1, le=7 * 24 * 60)
    """Timeout of collective operations; a rank that waits longer fails the job."""
    main_process_port: int = _f(0, ge=0, le=65535)
    """Port of the rendezvous; 0 picks a free one."""
    preflight_seconds: int = _f(120, ge=0, le=24 * 60 * 60)
    """Seconds each process waits at start-up for all the others, then fails naming the missing ones; 0 skips it."""
    backend: Literal["accelerate", "ray"] = "accelerate"
    """What starts several processes: `accelerate` (accelerate launch) or `ray` (Ray Train workers; the `ray` extra)."""


@dataclass
class LockedConfig:
    base_model: str = ""
    """Expected `model_path` (or its folder name); empty skips the check."""
    model_architecture: str = ""
    """Expected model class, e.g. `Qwen3ForCausalLM`; empty skips the check."""
    max_context_length: int = _f(0, ge=0, le=2**30)
    """Upper bound for `data.max_length`; 0 skips the check."""
    vocab_size: int = _f(0, ge=0, le=2**24)
    """Expected vocabulary size of model and tokenizer; 0 skips the check."""


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """How records become chat messages and which tokens are trained."""
    hyperparams: HyperparamsConfig = field(default_factory=HyperparamsConfig)
    """Optimisation."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run writes."""
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    """Validation and sample generations."""
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    """Logging and trackers."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapters."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Processes and the Accelerate launch config."""
    locked: LockedConfig = field(default_factory=LockedConfig)
    """Guard against continuing an output folder with a different model."""

    source: str = field(default="", compare=False, repr=False)
    # The job file this config came from (not a TOML key).

    # --- derived values ---------------------------------------------------------------------
    def global_batch_size(self, num_processes: int) -> int:
        """Examples per optimizer step over all processes."""
        h = self.hyperparams
        return h.batch_size * h.gradient_accumulation * num_processes

    def total_steps(self, num_train_batches_per_process: int) -> int:
        """Optimizer steps the run will take, from `max_steps` or `num_epochs`."""
        h = self.hyperparams
        if h.max_steps > 0:
            return h.max_steps
        steps_per_epoch = math.ceil(num_train_batches_per_process / h.gradient_accumulation)
        # Rounded first so float noise cannot add a step (100 * 0.07 is 7.000000000000001).
        return max(1, math.ceil(round(steps_per_epoch * h.num_epochs, 9)))

    def num_optimizer_steps(self, num_train_rows: int, num_processes: int) -> int:
        """Optimizer steps for this many training rows (examples, or packs) on this many processes.

        The data loader makes ceil(rows / batch_size) batches and Accelerate gives each process
        ceil(batches / processes) of them (repeating a few at the end so every process takes the
        same number of steps).
        """
        num_batches = math.ceil(num_train_rows / self.hyperparams.batch_size)
        return self.total_steps(math.ceil(num_batches / num_processes))

    def runs_sdpa_per_example(self) -> bool:
        """Packed rows under `auto` run SDPA once per example (loop/attention.py), except with a model
        folder's own code (`model.trust_remote_code`), whose forward may not take the boundaries."""
        m = self.model
        return self.data.packing and m.attn_implementation == "auto" and not m.trust_remote_code

    @property
    def output_path(self) -> Path:
        return Path(self.output.output_dir)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections()}

    def to_toml(self) -> str:
        """The resolved config as TOML; `load_config` of it gives an equal config."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            # The values themselves, not `to_dict`'s copies: a source is written with the keys it sets.
            lines += [f"{key} = {toml_value(getattr(getattr(self, section), key))}" for key in values]
            lines.append("")
        return "\n".join(lines)


REQUIRED = ("model.model_path", "data.dataset_path", "output.output_dir")
PATH_KEYS = (
    "model.model_path", "model.tokenizer_path", "data.dataset_path", "data.validation_path",
    "data.cache_dir", "data.chat_template", "output.output_dir", "output.resume", "launch.accelerate_config",
)
# Values of path keys that are names, not paths.
PATH_KEY_NAMES = {"data.chat_template": ("chatml",), "output.resume": ("auto", "never")}


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(JobConfig) if f.name != "source"]


def _section_class(name: str) -> type:
    return {f.name: f.default_factory for f in _sections()}[name]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # The annotations are strings (`from __future__ import annotations`); evaluating them compiles code.
    return typing.get_type_hints(cls)


def _section_keys(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_section_class(name))]


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = after.value.value.strip()
    return docs


def toml_value(value: Any) -> str:
    """One value written as TOML (what `to_toml` uses; tests and benchmarks write job files with it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML forbids a bare DEL
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        keys = [k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_value(k) for k in map(str, value)]
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in zip(keys, value.values())) + "}"
    if dataclasses.is_dataclass(value):  # a `[[data.sources]]` table: the keys it sets, so an unset weight stays unset
        defaults = type(value)()
        return toml_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                           if getattr(value, f.name) != getattr(defaults, f.name)})
    raise TypeError(f"cannot write {value!r} as TOML")


# --- locating keys in the file, for messages ---------------------------------------------------

def _key_lines(text: str) -> dict[str, int]:
    """Map `section` and `section.key` to their line numbers in a simple TOML file."""
    lines: dict[str, int] = {}
    counts: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]", stripped)
        if header and not stripped.startswith("[["):
            section = header.group(1).strip("\"' ")
            lines.setdefault(section, number)
            continue
        table = re.match(r"^\[\[\s*([A-Za-z0-9_.\-]+?)\s*\]\]", stripped)
        if table:  # `[[data.sources]]`: its keys are `data.sources[n].key`, n counted from 1
            name = table.group(1)
            counts[name] = counts.get(name, 0) + 1
            section = f"{name}[{counts[name]}]"
            lines.setdefault(name, number)
            lines.setdefault(section, number)
            continue
        key = re.match(r"^([A-Za-z0-9_\-\"']+)\s*=", stripped)
        if key:
            name = key.group(1).strip("\"'")
            lines.setdefault(f"{section}.{name}" if section else name, number)
    return lines


def _suggest(name: str, valid: list[str], noun: str = "keys") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"valid {noun}: " + ", ".join(f"`{v}`" for v in valid)


# --- type and range checks ---------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers", bool: "booleans"}[item]
    if origin is dict:
        return "a table of strings, e.g. {instruction = \"question\"}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`); ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is dict:  # only dict[str, str] (column_map)
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values()), value
    if origin is Literal:
        return value in typing.get_args(tp) and isinstance(value, str), value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for option in typing.get_args(tp):
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False, value
        try:
            return True, float(value)
        except OverflowError:  # an int beyond any float: kept as is for the range check to refuse
            return True, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(value: Any, meta: Any) -> str | None:
    """What is wrong with `value` (a number, or a list of numbers) for the field's range, or None."""
    if not meta:
        return None
    items = value if isinstance(value, list) else [value]
    numbers = [v for v in items if _is_number(v)]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        return "must be a finite number"
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    # Comparisons of int and float are exact in Python, even for ints far beyond any float.
    if any((ge is not None and v < ge) or (gt is not None and v <= gt) or
           (le is not None and v > le) or (lt is not None and v >= lt) for v in numbers):
        return f"{'each item ' if isinstance(value, list) else ''}must be {range_text(meta)}"
    return None


def range_text(meta: Any) -> str:
    """A field's range as the messages and the reference say it, e.g. `>= 1 and <= 1_048_576`."""
    parts = [(op, meta.get(key)) for op, key in ((">=", "ge"), (">", "gt"), ("<=", "le"), ("<", "lt"))]
    return " and ".join(f"{op} {_number_text(bound)}" for op, bound in parts if bound is not None)


def _number_text(number: int | float) -> str:
    # Digit groups as TOML and Python write them, so a bound can be pasted into the job file.
    return f"{number:_}" if isinstance(number, int) and abs(number) >= 10_000 else repr(number)


# --- loading -----------------------------------------------------------------------------------

def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value` from the command line; the value is read as a TOML value, else a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set hyperparams.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    return key.strip(), parse_value(raw.strip())


def parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # TOMLDecodeError, an int of over 4300 digits, deep nesting
        return raw


MAX_JOB_FILE_BYTES = 1 << 20
"""A job file is a few KB of TOML; anything above this is the wrong file, not a job."""


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                check_environment: bool = True) -> JobConfig:
    """Read, override, type-check, resolve paths and validate a job file.

    `overrides` maps dotted keys to values (already parsed; use `parse_override` for strings from
    the command line). Raises `ConfigError` listing every problem found.
    """
    path = Path(path)
    text = read_job_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}. Check quoting, brackets and `key = value` syntax.") from None
    except ValueError as error:  # Python refuses ints of more than 4300 digits
        raise ConfigError(f"{path}: invalid TOML: a number is too long to read ({error})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply to read") from None
    return config_from_dict(raw, overrides=overrides, source=path, key_lines=_key_lines(text),
                            check_environment=check_environment)


def read_job_text(path: Path) -> str:
    """The job file as text: UTF-8, an optional byte-order mark dropped; refused if it is not that."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_JOB_FILE_BYTES + 1)  # bounded: the path may be /dev/zero or a huge file
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read the job file: it is a folder; give the path of a .toml "
                          "file") from None
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the job file ({error})") from None
    if len(data) > MAX_JOB_FILE_BYTES:
        raise ConfigError(f"{path}: cannot read the job file: it is larger than {MAX_JOB_FILE_BYTES >> 20} MiB, "
                          "and a job file is a few KB of TOML; is this the right file?")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: cannot read the job file: it is saved as UTF-16; save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")  # editors on Windows may write a byte-order mark; TOML forbids it
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: cannot read the job file: line {line} is not UTF-8 (byte "
                          f"0x{data[error.start]:02x}); save the file as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{path}: the job file is empty; a job needs at least "
                          + ", ".join(f"[{k.split('.')[0]}] {k.split('.')[1]}" for k in REQUIRED))
    return text


def config_from_dict(raw: dict[str, Any], *, overrides: dict[str, Any] | None = None,
                     source: str | os.PathLike | None = None, key_lines: dict[str, int] | None = None,
                     check_environment: bool = True) -> JobConfig:
    source_path = Path(source) if source else None
    key_lines = key_lines or {}
    problems: list[str] = []

    def where(key: str) -> str:
        if source_path is None:
            return key
        # A key, else its table (`data.sources[2]`), else its section.
        line = key_lines.get(key) or key_lines.get(key.rsplit(".", 1)[0]) or key_lines.get(key.split(".")[0])
        return f"{source_path}:{line}: {_name(key)}" if line else f"{source_path}: {_name(key)}"

    section_names = [f.name for f in _sections()]
    values: dict[str, dict[str, Any]] = {}
    for section, content in raw.items():
        if section not in section_names:
            problems.append(f"{where(section)}: unknown section [{_name(section)}]; "
                            f"{_suggest(section, section_names, 'sections')}")
            continue
        if not isinstance(content, dict):
            problems.append(f"{where(section)}: expected a [{section}] table, got {_show(content)}")
            continue
        values[section] = dict(content)

    origin: dict[str, str] = {}
    for dotted, value in (overrides or {}).items():
        section, _, key = str(dotted).partition(".")
        if section in section_names and not key:
            example = f"{section}.{_section_keys(section)[0]}=..."
            problems.append(f"--set {_name(dotted)}: expected SECTION.KEY=VALUE, e.g. --set {example}")
            continue
        if section not in section_names:
            problems.append(f"--set {_name(dotted)}: unknown section `{_name(section)}`; "
                            f"{_suggest(section, section_names, 'sections')}")
            continue
        values.setdefault(section, {})[key] = value
        origin[dotted] = "--set "

    sections: dict[str, Any] = {}
    failed: set[str] = set()  # keys already reported; later rules must not report them again
    for name in section_names:
        cls = _section_class(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = _type_hints(cls)
        given = values.get(name, {})
        accepted = {}
        for key, value in given.items():
            dotted = f"{name}.{key}"
            label = f"{origin[dotted]}{_name(dotted)}" if dotted in origin else where(dotted)
            if key not in fields:
                problems.append(f"{label}: unknown key `{_name(key)}` in [{name}]; {_suggest(key, list(fields))}")
                continue
            if hints[key] == list[SourceConfig]:
                sources = _source_tables(value, dotted, label, origin.get(dotted), where, problems, failed)
                if sources is None:
                    failed.add(dotted)
                else:
                    accepted[key] = sources
                continue
            ok, converted = _coerce(value, hints[key])
            if not ok:
                problems.append(f"{label}: expected {_type_name(hints[key])}, got {_show(value)}")
                failed.add(dotted)
                continue
            bad_range = _check_range(converted, fields[key].metadata)
            if bad_range:
                problems.append(f"{label}: {bad_range}, got {_show(value)}")
                failed.add(dotted)
                continue
            if dotted in PATH_KEYS and "\0" in converted:  # no file system takes it; Path would raise
                problems.append(f"{label}: a path cannot contain a NUL character (\\u0000), got {_show(value)}")
                failed.add(dotted)
                continue
            accepted[key] = converted
        sections[name] = cls(**accepted)

    config = JobConfig(**sections, source=str(source_path or ""))
    # Keys that failed above keep their defaults here, so every remaining problem is found too.
    _resolve_paths(config, source_path.parent if source_path else Path.cwd())
    problems += _cross_field_problems(config, where, check_environment, failed)
    if problems:
        header = f"{source_path}: " if source_path else ""
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more (fix these first)")
        raise ConfigError(f"{header}the job has {count}:\n" + "\n".join(f"  - {p}" for p in shown))
    return config


def _source_tables(value: Any, dotted: str, label: str, set_prefix: str | None, where, problems: list[str],
                   failed: set[str]) -> list[SourceConfig] | None:
    """`[[data.sources]]` tables as `SourceConfig`s, every key checked like a section's; None if not tables."""
    if not isinstance(value, list) or not all(isinstance(table, dict) for table in value):
        problems.append(f"{label}: expected [[{dotted}]] tables (or a list of inline tables), got {_show(value)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(SourceConfig)}
    hints = _type_hints(SourceConfig)
    sources = []
    for number, table in enumerate(value, start=1):
        accepted = {}
        for key, item in table.items():
            inner = f"{dotted}[{number}].{key}"
            at = f"{set_prefix}{_name(inner)}" if set_prefix else where(inner)
            if key not in fields:
                problems.append(f"{at}: unknown key `{_name(key)}` in [[{dotted}]]; {_suggest(key, list(fields))}")
                continue
            ok, converted = _coerce(item, hints[key])
            problem = None if ok else f"expected {_type_name(hints[key])}, got {_show(item)}"
            bad_range = None if problem else _check_range(converted, fields[key].metadata)
            problem = problem or (f"{bad_range}, got {_show(item)}" if bad_range else None)
            if not problem and key in ("path", "validation_path") and "\0" in converted:
                problem = f"a path cannot contain a NUL character (\\u0000), got {_show(item)}"
            if not problem and key == "weight" and converted == 0:
                problem = ("weight = 0 takes nothing from this source; remove the source, or leave weight out "
                           "to take each of its examples once")
            if problem:
                problems.append(f"{at}: {problem}")
                failed.add(inner)
                continue
            accepted[key] = converted
        sources.append(SourceConfig(**accepted))
    return sources


MAX_PROBLEMS_SHOWN = 50
"""A file of garbage may have thousands of problems; the message lists this many."""
MAX_SHOWN_CHARS = 80


def _show(value: Any) -> str:
    """A value as a message shows it: JSON-like, on one line, and at most about 80 characters."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = None
    if not isinstance(value, (list, dict)) or _count_values(value, limit=100) < 100:
        try:
            text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, bool)) else repr(value)
        except (ValueError, TypeError, RecursionError):  # not JSON (a date in a list)
            pass
    if text is None:  # large, or not JSON
        text = f"a {type(value).__name__} of {len(value)} items" if isinstance(value, (list, dict)) \
            else f"a {type(value).__name__}"
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS - 5] + "[...]"


def _count_values(value: Any, *, limit: int) -> int:
    """How many values `value` holds, counted up to `limit`: a YAML file can nest one list in itself
    through aliases until it stands for billions of values, which JSON would write out in full."""
    count, stack = 0, [value]
    while stack and count < limit:
        item = stack.pop()
        count += 1
        if isinstance(item, (list, dict)):
            stack.extend(itertools.islice(item.values() if isinstance(item, dict) else item, limit))
    return count


def _name(key: str) -> str:
    """A key or section name as a message shows it (a quoted TOML key may hold anything)."""
    if re.fullmatch(r"[\w.\-]{1,60}(\[\d{1,6}\][\w.\-]{0,60})?", key):  # also data.sources[2].weight
        return key
    return _show(key)


def _resolve_paths(config: JobConfig, base: Path) -> None:
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        obj = getattr(config, section)
        value = getattr(obj, key)
        if not value or value in PATH_KEY_NAMES.get(dotted, ()):
            continue
        expanded = Path(os.path.expanduser(value))
        if dotted in ("model.model_path", "model.tokenizer_path") and not expanded.is_absolute() \
                and not _exists(base / expanded) and _looks_like_hub_id(value):
            continue  # a hub id such as "Qwen/Qwen3-0.6B"; loading says whether it can be reached
        if dotted in ("data.dataset_path", "data.validation_path") and _is_dataset_id(value, base):
            continue  # a hub dataset such as "HuggingFaceH4/ultrachat_200k"; preparing says whether it can be read
        if dotted == "launch.accelerate_config" and not expanded.is_absolute() and not _exists(base / expanded):
            shipped = Path(__file__).resolve().parent.parent / "accelerate_configs"
            for candidate in (shipped / value, shipped / f"{value}.yaml"):
                if _exists(candidate):
                    expanded = candidate
                    break
        setattr(obj, key, str(expanded if expanded.is_absolute() else _resolved(base / expanded)))
    for source in config.data.sources:
        for key in ("path", "validation_path"):
            value = getattr(source, key)
            if value and not _is_dataset_id(value, base):
                expanded = Path(os.path.expanduser(value))
                setattr(source, key, str(expanded if expanded.is_absolute() else _resolved(base / expanded)))


DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow")
"""Files a data path may name (any other file is read as JSONL); a folder or glob holds such files."""


def _has_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


def _is_dataset_id(value: str, base: Path) -> bool:
    """`owner/name` of a hub dataset: no local file or folder of that name, no glob, no data-file suffix."""
    expanded = Path(os.path.expanduser(value))
    return (not expanded.is_absolute() and not _exists(base / expanded) and _looks_like_hub_id(value)
            and not _has_glob(value) and expanded.suffix.lower() not in DATA_SUFFIXES)


def _data_problem(value: str) -> str | None:
    """Why a resolved data path names no data (None when it does, or is a hub id left to preparing)."""
    if _is_file(value) or (not Path(value).is_absolute() and _looks_like_hub_id(value)):
        return None
    if _has_glob(value):
        import glob

        return None if any(_is_file(p) for p in glob.iglob(value, recursive=True)) else \
            f"no file matches {value}"
    if _is_dir(value):
        folder = Path(value)
        if any(_exists(folder / name) for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            return None
        if any(p.suffix.lower() in DATA_SUFFIXES for p in folder.rglob("*")):
            return None
        return (f"file not found: {value} is a folder without data files (expected Parquet or JSONL shards, "
                "or a folder written by datasets' save_to_disk)")
    return f"file not found: {value}"


# The file system's answers about a path the user wrote; a name too long, a folder we may not
# enter or a symlink loop is an answer too (the file is not there), never an exception.
def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _is_file(path: str | Path) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path: str | Path) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (Python < 3.13)
        return Path(os.path.abspath(path))


def _looks_like_hub_id(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", value)) and not value.startswith(".")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def _cross_field_problems(config: JobConfig, where, check_environment: bool, failed: set[str]) -> list[str]:
    """Rules that involve more than one key or the machine; all are reported together."""
    problems = []
    for dotted in REQUIRED:
        section, key = dotted.split(".")
        if dotted == "data.dataset_path" and (config.data.sources or "data.sources" in failed):
            continue  # the sources are the training data (or were refused already)
        if dotted not in failed and not getattr(getattr(config, section), key):
            problems.append(f"{where(dotted)}: required; set it in [{section}]")
    h, data, lora = config.hyperparams, config.data, config.lora
    problems += _source_problems(config, where, check_environment, failed)
    if h.max_steps <= 0 and h.num_epochs <= 0:
        problems.append(f"{where('hyperparams.num_epochs')}: with max_steps = -1, num_epochs must be > 0")
    if len(h.adam_betas) != 2:  # each item's range is the field's own
        problems.append(f"{where('hyperparams.adam_betas')}: expected two numbers in [0, 1), got {h.adam_betas}")
    if h.fp_precision == "fp16" and check_environment and not cuda_available():
        problems.append(f"{where('hyperparams.fp_precision')}: fp16 needs a CUDA GPU (on CPU it silently "
                        "trains in fp32); use \"bf16\" or \"fp32\"")
    if config.model.load_in_4bit and not lora.enabled:
        problems.append(f"{where('model.load_in_4bit')}: a 4-bit base cannot be trained in full; "
                        "set [lora] enabled = true (QLoRA)")
    if config.output.merge_lora and not lora.enabled:
        problems.append(f"{where('output.merge_lora')}: only applies with [lora] enabled = true")
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        problems.append(f"{where('lora.target_modules')}: expected \"all-linear\" or a list of module names, "
                        f"got {_show(lora.target_modules)}")
    problems += _streaming_problems(config, where)
    has_validation = bool(data.validation_path or data.validation_split_name) or config.monitoring.validation_split > 0 \
        or any(s.validation_path or s.validation_split_name for s in data.sources)
    if h.eval_steps > 0 and not has_validation:
        problems.append(f"{where('hyperparams.eval_steps')}: evaluation needs validation data; set "
                        "data.validation_path or monitoring.validation_split > 0")
    resume = config.output.resume
    if resume not in ("auto", "never") and check_environment and not _is_dir(resume):
        problems.append(f"{where('output.resume')}: expected \"auto\", \"never\" or a checkpoint folder; "
                        f"{_show(resume)} is none of these")
    for dotted in ("data.dataset_path", "data.validation_path"):
        value = getattr(data, dotted.split(".")[1])
        problem = _data_problem(value) if value and check_environment else None
        if problem:
            problems.append(f"{where(dotted)}: {problem}")
    if config.launch.accelerate_config and check_environment and not _is_file(config.launch.accelerate_config):
        problems.append(f"{where('launch.accelerate_config')}: file not found: {config.launch.accelerate_config}")
    if data.chat_template and data.chat_template != "chatml" and check_environment \
            and not _is_file(data.chat_template):
        problems.append(f"{where('data.chat_template')}: expected \"chatml\" or a template file; "
                        f"file not found: {data.chat_template}")
    if config.launch.accelerate_config and check_environment and _is_file(config.launch.accelerate_config):
        problems += _accelerate_config_problems(config, where)
    allowed_trackers = {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                        "swanlab", "trackio"}
    for tracker in config.environment.report_to:
        if tracker not in allowed_trackers:
            problems.append(f"{where('environment.report_to')}: unknown tracker {tracker!r}; "
                            f"{_suggest(tracker, sorted(allowed_trackers))}")
        elif check_environment and not _tracker_installed(tracker):
            problems.append(f"{where('environment.report_to')}: the {tracker!r} tracker is not installed; "
                            f"pip install {TRACKER_PACKAGES.get(tracker, tracker)} or remove it from report_to")
    return problems


def _source_problems(config: JobConfig, where, check_environment: bool, failed: set[str]) -> list[str]:
    """`[[data.sources]]`: each names its data, and the mix is defined (weights on all or none)."""
    data = config.data
    if not data.sources:
        return []
    problems = []
    if data.dataset_path:
        problems.append(f"{where('data.dataset_path')}: set either data.dataset_path or [[data.sources]], not both "
                        "(a source with path = the same data does what dataset_path did)")
    if data.split or data.subset or data.revision or data.column_map:
        problems.append(f"{where('data.split')}: data.split, subset, revision and column_map apply to "
                        "data.dataset_path; with [[data.sources]] set them in each source")
    weighted = [number for number, s in enumerate(data.sources, start=1) if s.weight > 0]
    for number, source in enumerate(data.sources, start=1):
        def at(key: str) -> str:
            return where(f"data.sources[{number}].{key}")

        if not source.path and f"data.sources[{number}].path" not in failed:
            problems.append(f"{at('path')}: required; every [[data.sources]] table names its data")
        for key in ("path", "validation_path"):
            value = getattr(source, key)
            problem = _data_problem(value) if value and check_environment else None
            if problem:
                problems.append(f"{at(key)}: {problem}")
        if source.weight > 0 and source.num_samples > 0:
            problems.append(f"{at('num_samples')}: set weight or num_samples, not both")
        elif weighted and source.weight == 0 and source.num_samples == 0:
            problems.append(f"{at('weight')}: sources {', '.join(map(str, weighted))} have a weight and this one "
                            "has none, so its share of the mix is undefined; give it a weight (or num_samples)")
    return problems


def _streaming_problems(config: JobConfig, where) -> list[str]:
    """`data.streaming`: the stream has no length, no fixed set to hold out and no fixed mix size."""
    data = config.data
    if not data.streaming:
        return []
    problems = []
    if config.hyperparams.max_steps <= 0:
        problems.append(f"{where('hyperparams.max_steps')}: data.streaming = true reads data of unknown length, "
                        "so num_epochs cannot say when to stop; set max_steps > 0")
    if config.monitoring.validation_split > 0 and not (data.validation_path or data.validation_split_name or any(
            s.validation_path or s.validation_split_name for s in data.sources)):
        problems.append(f"{where('monitoring.validation_split')}: a stream has no fixed set of examples to hold out; "
                        "set data.validation_path (or a source's validation_path) instead")
    for number, source in enumerate(data.sources, start=1):
        if source.num_samples > 0:
            problems.append(f"{where(f'data.sources[{number}].num_samples')}: a stream has no fixed size to take "
                            "exactly num_samples of; give the sources weights instead")
    return problems


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}


def _tracker_installed(tracker: str) -> bool:
    import importlib.util

    modules = ("tensorboard", "tensorboardX") if tracker == "tensorboard" else (tracker,)
    return any(importlib.util.find_spec(module) is not None for module in modules)


# What Accelerate reads from its config file as an integer, a name or a table (None: the key may be
# empty). A value of another type passes `launch` on to Accelerate, which then fails inside
# `accelerate launch` (exit 1) instead of the job being refused here (exit 2).
ACCELERATE_KEY_TYPES: dict[str, tuple[type, str, bool]] = {
    "num_processes": (int, "an integer", False), "num_machines": (int, "an integer", False),
    "machine_rank": (int, "an integer", False), "main_process_port": (int, "an integer", True),
    "distributed_type": (str, "a string such as MULTI_GPU", False),
    "mixed_precision": (str, 'a string such as "no" (quoted: YAML reads a bare no as false)', False),
    "compute_environment": (str, "a string such as LOCAL_MACHINE", False),
    **{key: (dict, "a mapping of settings", True) for key in (
        "deepspeed_config", "fsdp_config", "megatron_lm_config", "dynamo_config", "fp8_config",
        "parallelism_config", "mpirun_config")},
}


def _accelerate_config_problems(config: JobConfig, where) -> list[str]:
    """The Accelerate file must be a readable Accelerate config that does not contradict the job: batch,
    accumulation, clipping and precision are the job's. Every value is checked before it is used."""
    import yaml

    path, h = config.launch.accelerate_config, config.hyperparams
    label = where("launch.accelerate_config")
    try:
        launch_file, lines = _read_yaml(Path(path))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as error:  # ValueError: not UTF-8, too large
        return [f"{label}: cannot read {path} as YAML ({type(error).__name__}: {str(error)[:300]})"]
    if launch_file is None:
        launch_file = {}
    if not isinstance(launch_file, dict):
        return [f"{label}: {path} is not an Accelerate config (expected a YAML mapping of settings, got "
                f"{_yaml_type(launch_file)})"]

    def at(key: str) -> str:
        line = lines.get(key)
        return f"{label}: {path}:{line}: {key}" if line else f"{label}: {path}: {key}"

    problems = []
    for key, (tp, expected, may_be_empty) in ACCELERATE_KEY_TYPES.items():
        if key not in launch_file or (launch_file[key] is None and may_be_empty):
            continue
        value = launch_file[key]
        if not isinstance(value, tp) or isinstance(value, bool):
            problems.append(f"{at(key)}: expected {expected}, got {_show(value)}")
    if problems:
        return problems  # the rules below read these values

    precision = PRECISIONS[h.fp_precision].mixed_precision
    if launch_file.get("mixed_precision", "no") not in ("no", precision):
        problems.append(f"{label}: {path} sets mixed_precision: {launch_file['mixed_precision']} but the job's "
                        f"hyperparams.fp_precision is {h.fp_precision!r}; set mixed_precision: \"no\" in the file "
                        "and choose the precision in the job")
    deepspeed = launch_file.get("deepspeed_config") or {}
    job_values = {"gradient_accumulation_steps": (h.gradient_accumulation, "hyperparams.gradient_accumulation"),
                  "gradient_clipping": (h.max_grad_norm, "hyperparams.max_grad_norm")}
    for key, (value, job_key) in job_values.items():
        given = deepspeed.get(key, "auto")
        if given == "auto":
            continue
        if not _is_number(given):
            problems.append(f"{at(f'deepspeed_config.{key}')}: expected auto or a number, got {_show(given)}; "
                            f"set it to auto so the job's {job_key} decides")
        elif given != value:
            problems.append(f"{label}: {path} sets deepspeed_config.{key}: {given} but the job's {job_key} is "
                            f"{value}; set it to auto so the job decides")
    if launch_file.get("distributed_type") == "FSDP" and not cuda_available():
        problems.append(f"{label}: FSDP needs CUDA GPUs (Accelerate falls back to unsharded single-process "
                        "training without them); on CPU use deepspeed_zero3 or multi_cpu")
    if launch_file.get("distributed_type") == "MULTI_CPU":
        problems.append(f"{label}: distributed_type MULTI_CPU makes Accelerate expect mpirun; use "
                        "accelerate_configs/multi_cpu.yaml (MULTI_GPU processes that train on CPU)")
    return problems


def _read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The YAML document of `path`, and the line of each top-level key and of each key one level down."""
    import yaml

    with open(path, "rb") as handle:
        data = handle.read(MAX_JOB_FILE_BYTES + 1)
    if len(data) > MAX_JOB_FILE_BYTES:
        raise ValueError(f"larger than {MAX_JOB_FILE_BYTES >> 20} MiB; an Accelerate config is a few lines")
    loader = yaml.SafeLoader(data.decode("utf-8-sig"))
    try:
        node = loader.get_single_node()
        document = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    for key_node, value_node in (node.value if isinstance(node, yaml.MappingNode) else []):
        if isinstance(key_node, yaml.ScalarNode):
            lines.setdefault(key_node.value, key_node.start_mark.line + 1)
            for inner_key, _ in (value_node.value if isinstance(value_node, yaml.MappingNode) else []):
                if isinstance(inner_key, yaml.ScalarNode):
                    lines.setdefault(f"{key_node.value}.{inner_key.value}", inner_key.start_mark.line + 1)
    return document, lines


def _yaml_type(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}.get(
        type(value), type(value).__name__)


def reference_markdown() -> str:
    """The job-file reference, generated from the field docstrings so it cannot drift."""
    out = []
    section_docs = field_docs(JobConfig)
    for section in _sections():
        cls = _section_class(section.name)
        out.append(f"### `[{section.name}]`: {section_docs.get(section.name, '')}\n")
        out += _reference_table(cls, section.name)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):  # a list of tables, such as [[data.sources]]: its keys below
            table = _table_class(_type_hints(cls)[f.name])
            if table is not None:
                out.append(f"#### `[[{section.name}.{f.name}]]`: {docs.get(f.name, '')}\n")
                out += _reference_table(table, f"{section.name}.{f.name}")
    return "\n".join(out)


def _reference_table(cls: type, prefix: str) -> list[str]:
    docs = field_docs(cls)
    rows = ["| key | default | range | meaning |\n| --- | --- | --- | --- |"]
    instance = cls()
    for f in dataclasses.fields(cls):
        default = toml_value(getattr(instance, f.name))
        required = f"{prefix}.{f.name}" in REQUIRED
        allowed = range_text(f.metadata) if any(v is not None for v in f.metadata.values()) else ""
        if allowed:
            allowed = f"each item `{allowed}`" if isinstance(getattr(instance, f.name), list) else f"`{allowed}`"
        doc = docs.get(f.name, "").replace("|", "\\|")  # a bare `|` would end the table cell
        rows.append(f"| `{f.name}` | {'required' if required else f'`{default}`'} | {allowed} | {doc} |")
    return rows + [""]


def _table_class(tp: Any) -> type | None:
    """The dataclass of a key that holds a list of tables (`list[SourceConfig]`), else None."""
    args = typing.get_args(tp)
    return args[0] if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]) else None
