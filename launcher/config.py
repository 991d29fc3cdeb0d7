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
import inspect
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


def _range(*, ge=None, gt=None, le=None, lt=None) -> dict:
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


def _f(default, **bounds):
    """A field with an optional numeric range, checked on load."""
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
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    """Attention kernel; flash attention needs a CUDA GPU and the flash-attn package."""
    load_in_4bit: bool = False
    """Load the base model in 4-bit NF4 through bitsandbytes (QLoRA; needs `[lora] enabled = true`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory at the cost of time."""
    trust_remote_code: bool = False
    """Allow model and tokenizer code shipped with the checkpoint to run. Off unless you trust it."""


@dataclass
class DataConfig:
    dataset_path: str = ""
    """JSONL training file, one record per line. Required."""
    validation_path: str = ""
    """Optional JSONL validation file; when empty, `monitoring.validation_split` carves one out."""
    max_length: int = _f(2048, ge=8)
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
    pad_to_multiple_of: int = _f(0, ge=0)
    """Pad each batch to a multiple of this many tokens (8 helps tensor cores); 0 pads to the longest."""
    num_proc: int = _f(1, ge=1)
    """Processes used to tokenize the data set."""
    cache_dir: str = ""
    """Where tokenized data is cached; empty uses `~/.cache/trainer-engine/data`."""


@dataclass
class ProfileConfig:
    name: str = "chat"
    """Record format: chat | alpaca | sharegpt | completion | text, or `pkg.module:Class`."""
    system_prompt: str = ""
    """System prompt inserted where a record has none; `{date}` is filled in. Empty keeps the data's own."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn, only the last one, or every token."""


@dataclass
class HyperparamsConfig:
    batch_size: int = _f(1, ge=1)
    """Examples per process per micro-step."""
    gradient_accumulation: int = _f(1, ge=1)
    """Micro-steps per optimizer step."""
    learning_rate: float = _f(2e-5, gt=0)
    """Peak learning rate of AdamW."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = _f(0, ge=0)
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""
    num_epochs: float = _f(1.0, ge=0)
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = _f(-1, ge=-1)
    """Optimizer steps to run; > 0 overrides `num_epochs`, -1 uses `num_epochs`."""
    max_grad_norm: float = _f(1.0, ge=0)
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    weight_decay: float = _f(0.0, ge=0)
    """AdamW weight decay, not applied to biases and norm weights."""
    adam_betas: list[float] = _f([0.9, 0.999])
    """AdamW betas, two numbers in [0, 1)."""
    adam_epsilon: float = _f(1e-8, gt=0)
    """AdamW epsilon."""
    fp_precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Mixed precision of forward and backward; fp16 needs a CUDA GPU."""
    seed: int = _f(42, ge=0)
    """Seed for weights of new layers, shuffling, dropout and the validation split."""
    save_steps: int = _f(500, ge=0)
    """Optimizer steps between resumable checkpoints; 0 saves only the final model."""
    save_total_limit: int = _f(3, ge=1)
    """Step checkpoints kept; the oldest complete ones are removed."""
    eval_steps: int = _f(0, ge=0)
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
    validation_max_samples: int = _f(500, ge=1)
    """Cap on the held-out validation examples: min(cap, int(n * split))."""
    preview_steps: int = _f(0, ge=0)
    """Optimizer steps between sample generations; 0 disables them."""
    preview_prompts: list[str] = _f([])
    """User prompts for sample generations; empty uses the first validation prompts."""
    preview_num_prompts: int = _f(2, ge=1)
    """How many validation prompts to sample when `preview_prompts` is empty."""
    preview_max_new_tokens: int = _f(64, ge=1)
    """Tokens generated per sample (greedy)."""


@dataclass
class EnvironmentConfig:
    logging_steps: int = _f(10, ge=1)
    """Optimizer steps between metric records and log lines."""
    report_to: list[str] = _f([])
    """Experiment trackers through Accelerate: tensorboard, wandb, mlflow, ..."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Python logging level of the main process."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = _f(16, ge=1)
    """LoRA rank."""
    alpha: float = _f(32, gt=0)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = _f(0.05, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names."""
    modules_to_save: list[str] = _f([])
    """Modules trained in full and saved with the adapter (e.g. `lm_head` after adding tokens)."""


@dataclass
class LaunchConfig:
    num_processes: int = _f(1, ge=1)
    """Processes (usually GPUs) on this machine; > 1 makes `run` start `accelerate launch`."""
    accelerate_config: str = ""
    """An Accelerate config file (see `accelerate_configs/`) used when `run` launches."""
    timeout_minutes: int = _f(30, ge=1)
    """Timeout of collective operations; a rank that waits longer fails the job."""
    main_process_port: int = _f(0, ge=0, le=65535)
    """Port of the rendezvous; 0 picks a free one."""


@dataclass
class LockedConfig:
    base_model: str = ""
    """Expected `model_path` (or its folder name); empty skips the check."""
    model_architecture: str = ""
    """Expected model class, e.g. `Qwen3ForCausalLM`; empty skips the check."""
    max_context_length: int = _f(0, ge=0)
    """Upper bound for `data.max_length`; 0 skips the check."""
    vocab_size: int = _f(0, ge=0)
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
            lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
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
    raise TypeError(f"cannot write {value!r} as TOML")


# --- locating keys in the file, for messages ---------------------------------------------------

def _key_lines(text: str) -> dict[str, int]:
    """Map `section` and `section.key` to their line numbers in a simple TOML file."""
    lines: dict[str, int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]", stripped)
        if header and not stripped.startswith("[["):
            section = header.group(1).strip("\"' ")
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
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to `tp`); ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
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
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    return isinstance(value, tp), value


def _check_range(value: Any, meta: Any) -> str | None:
    if not meta or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    ge, gt, le, lt = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("lt")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or \
            (le is not None and value > le) or (lt is not None and value >= lt):
        parts = [f">= {ge}" if ge is not None else None, f"> {gt}" if gt is not None else None,
                 f"<= {le}" if le is not None else None, f"< {lt}" if lt is not None else None]
        return "must be " + " and ".join(p for p in parts if p)
    return None


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
    except tomllib.TOMLDecodeError:
        return raw


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None, *,
                check_environment: bool = True) -> JobConfig:
    """Read, override, type-check, resolve paths and validate a job file.

    `overrides` maps dotted keys to values (already parsed; use `parse_override` for strings from
    the command line). Raises `ConfigError` listing every problem found.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the job file ({error})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}. Check quoting, brackets and `key = value` syntax.") from None
    return config_from_dict(raw, overrides=overrides, source=path, key_lines=_key_lines(text),
                            check_environment=check_environment)


def config_from_dict(raw: dict[str, Any], *, overrides: dict[str, Any] | None = None,
                     source: str | os.PathLike | None = None, key_lines: dict[str, int] | None = None,
                     check_environment: bool = True) -> JobConfig:
    source_path = Path(source) if source else None
    key_lines = key_lines or {}
    problems: list[str] = []

    def where(key: str) -> str:
        if source_path is None:
            return key
        line = key_lines.get(key) or key_lines.get(key.split(".")[0])
        return f"{source_path}:{line}: {key}" if line else f"{source_path}: {key}"

    section_names = [f.name for f in _sections()]
    values: dict[str, dict[str, Any]] = {}
    for section, content in raw.items():
        if section not in section_names:
            problems.append(f"{where(section)}: unknown section [{section}]; {_suggest(section, section_names, 'sections')}")
            continue
        if not isinstance(content, dict):
            problems.append(f"{where(section)}: expected a [{section}] table, got {content!r}")
            continue
        values[section] = dict(content)

    origin: dict[str, str] = {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section in section_names and not key:
            example = f"{section}.{_section_keys(section)[0]}=..."
            problems.append(f"--set {dotted}: expected SECTION.KEY=VALUE, e.g. --set {example}")
            continue
        if section not in section_names:
            problems.append(f"--set {dotted}: unknown section `{section}`; {_suggest(section, section_names, 'sections')}")
            continue
        values.setdefault(section, {})[key] = value
        origin[dotted] = "--set "

    sections: dict[str, Any] = {}
    failed: set[str] = set()  # keys already reported; later rules must not report them again
    for name in section_names:
        cls = _section_class(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        given = values.get(name, {})
        accepted = {}
        for key, value in given.items():
            dotted = f"{name}.{key}"
            label = f"{origin[dotted]}{dotted}" if dotted in origin else where(dotted)
            if key not in fields:
                problems.append(f"{label}: unknown key `{key}` in [{name}]; {_suggest(key, list(fields))}")
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
            accepted[key] = converted
        sections[name] = cls(**accepted)

    config = JobConfig(**sections, source=str(source_path or ""))
    # Keys that failed above keep their defaults here, so every remaining problem is found too.
    _resolve_paths(config, source_path.parent if source_path else Path.cwd())
    problems += _cross_field_problems(config, where, check_environment, failed)
    if problems:
        header = f"{source_path}: " if source_path else ""
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise ConfigError(f"{header}the job has {count}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, bool)) else repr(value)


def _resolve_paths(config: JobConfig, base: Path) -> None:
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        obj = getattr(config, section)
        value = getattr(obj, key)
        if not value or value in PATH_KEY_NAMES.get(dotted, ()):
            continue
        expanded = Path(os.path.expanduser(value))
        if dotted in ("model.model_path", "model.tokenizer_path") and not expanded.is_absolute() \
                and not (base / expanded).exists() and _looks_like_hub_id(value):
            continue  # a hub id such as "Qwen/Qwen3-0.6B"; loading says whether it can be reached
        if dotted == "launch.accelerate_config" and not expanded.is_absolute() and not (base / expanded).exists():
            shipped = Path(__file__).resolve().parent.parent / "accelerate_configs"
            for candidate in (shipped / value, shipped / f"{value}.yaml"):
                if candidate.exists():
                    expanded = candidate
                    break
        setattr(obj, key, str(expanded if expanded.is_absolute() else (base / expanded).resolve()))


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
        if dotted not in failed and not getattr(getattr(config, section), key):
            problems.append(f"{where(dotted)}: required; set it in [{section}]")
    h, data, lora = config.hyperparams, config.data, config.lora
    if h.max_steps <= 0 and h.num_epochs <= 0:
        problems.append(f"{where('hyperparams.num_epochs')}: with max_steps = -1, num_epochs must be > 0")
    if len(h.adam_betas) != 2 or not all(0 <= b < 1 for b in h.adam_betas):
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
                        f"got {lora.target_modules!r}")
    has_validation = bool(data.validation_path) or config.monitoring.validation_split > 0
    if h.eval_steps > 0 and not has_validation:
        problems.append(f"{where('hyperparams.eval_steps')}: evaluation needs validation data; set "
                        "data.validation_path or monitoring.validation_split > 0")
    resume = config.output.resume
    if resume not in ("auto", "never") and check_environment and not Path(resume).is_dir():
        problems.append(f"{where('output.resume')}: expected \"auto\", \"never\" or a checkpoint folder; "
                        f"{resume!r} is none of these")
    for dotted in ("data.dataset_path", "data.validation_path", "launch.accelerate_config"):
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value and check_environment and not Path(value).is_file():
            problems.append(f"{where(dotted)}: file not found: {value}")
    if data.chat_template and data.chat_template != "chatml" and check_environment \
            and not Path(data.chat_template).is_file():
        problems.append(f"{where('data.chat_template')}: expected \"chatml\" or a template file; "
                        f"file not found: {data.chat_template}")
    if config.launch.accelerate_config and check_environment and Path(config.launch.accelerate_config).is_file():
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


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}


def _tracker_installed(tracker: str) -> bool:
    import importlib.util

    modules = ("tensorboard", "tensorboardX") if tracker == "tensorboard" else (tracker,)
    return any(importlib.util.find_spec(module) is not None for module in modules)


def _accelerate_config_problems(config: JobConfig, where) -> list[str]:
    """The Accelerate file may not contradict the job: batch, accumulation, clipping and precision are the job's."""
    import yaml

    path, h = config.launch.accelerate_config, config.hyperparams
    label = where("launch.accelerate_config")
    try:
        launch_file = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        return [f"{label}: cannot read {path} as YAML ({error})"]
    if not isinstance(launch_file, dict):
        return [f"{label}: {path} is not an Accelerate config (expected a YAML mapping)"]
    problems = []
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
        if given != "auto" and float(given) != float(value):
            problems.append(f"{label}: {path} sets deepspeed_config.{key}: {given} but the job's {job_key} is "
                            f"{value}; set it to auto so the job decides")
    if launch_file.get("distributed_type") == "FSDP" and not cuda_available():
        problems.append(f"{label}: FSDP needs CUDA GPUs (Accelerate falls back to unsharded single-process "
                        "training without them); on CPU use deepspeed_zero3 or multi_cpu")
    if launch_file.get("distributed_type") == "MULTI_CPU":
        problems.append(f"{label}: distributed_type MULTI_CPU makes Accelerate expect mpirun; use "
                        "accelerate_configs/multi_cpu.yaml (MULTI_GPU processes that train on CPU)")
    return problems


def reference_markdown() -> str:
    """The job-file reference, generated from the field docstrings so it cannot drift."""
    out = []
    section_docs = field_docs(JobConfig)
    for section in _sections():
        cls = _section_class(section.name)
        docs = field_docs(cls)
        out.append(f"### `[{section.name}]`: {section_docs.get(section.name, '')}\n")
        out.append("| key | default | meaning |\n| --- | --- | --- |")
        instance = cls()
        for f in dataclasses.fields(cls):
            default = toml_value(getattr(instance, f.name))
            required = f"{section.name}.{f.name}" in REQUIRED
            doc = docs.get(f.name, "").replace("|", "\\|")  # a bare `|` would end the table cell
            out.append(f"| `{f.name}` | {'required' if required else f'`{default}`'} | {doc} |")
        out.append("")
    return "\n".join(out)
