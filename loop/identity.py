"""The model identity of a run: `[locked]` values and the identity recorded in the run folder,
checked against the model actually loaded.

    identity = check_identity(config, model, tokenizer, recorded=run_dir.recorded_identity)  # raises IdentityError
    run_dir.open(identity=identity, ...)            # the run folder's marker records it

`[locked]` states what a job must train (`base_model`, `model_architecture`, `vocab_size`, and
`max_context_length`, an upper bound for `data.max_length`); empty or 0 skips a field. Independently,
the first run in an output folder records what it trained in its marker, and a later run in the
same folder with another model, vocabulary, context length or `data.max_length` is refused, so
a folder never mixes checkpoints of two different models. A run that replaces the folder
(`output.resume = "never"` with `output.overwrite = true`) records anew. Nothing here reads or writes
files: the run folder's owner (`loop.run_dir`) does.
"""

from __future__ import annotations

from pathlib import Path

from launcher.config import ConfigError, JobConfig

# The recorded fields, in the order they are reported.
FIELDS = ("base_model", "model_architecture", "vocab_size", "max_context_length", "data_max_length")
# What each recorded field is, for messages.
LABELS = {"base_model": "model.model_path", "model_architecture": "the model class",
          "vocab_size": "the embedding rows", "max_context_length": "the model's max_position_embeddings",
          "data_max_length": "data.max_length"}


class IdentityError(ConfigError):
    """The loaded model or the data settings contradict `[locked]` or the identity recorded in the run folder."""


def actual_values(config: JobConfig, model, tokenizer) -> dict:
    """What this run trains, in the form `lock.json` records."""
    base = _base(model)
    model_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return {
        "base_model": config.model.model_path,
        "model_architecture": _architecture(base),
        # Rows of the embedding: the size the model was built for (often padded beyond the tokenizer).
        "vocab_size": int(base.get_input_embeddings().num_embeddings),
        "max_context_length": int(getattr(model_config, "max_position_embeddings", 0) or 0),
        "data_max_length": int(config.data.max_length),
    }


def check_identity(config: JobConfig, model, tokenizer, recorded: dict | None) -> dict:
    """Raise `IdentityError` listing every contradiction; return what this run trains, to be recorded."""
    actual = actual_values(config, model, tokenizer)
    problems = _locked_problems(config, model, actual, len(tokenizer))
    replacing = config.output.resume == "never" and config.output.overwrite
    if recorded and not replacing:
        problems += _recorded_problems(config.output_path, recorded, actual)
    if problems:
        raise IdentityError("the job does not match its lock:\n" + "\n".join(f"  - {p}" for p in problems))
    return actual


def _base(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _architecture(base) -> str:
    architectures = getattr(base.config, "architectures", None) or []
    return architectures[0] if architectures else type(base).__name__


def _same_model(expected: str, actual: str) -> bool:
    """Equal paths (or hub ids), or the same folder name (a model moved or downloaded elsewhere)."""
    if expected == actual:
        return True
    expected_path, actual_path = Path(expected).expanduser(), Path(actual).expanduser()
    try:
        if expected_path.resolve() == actual_path.resolve():
            return True
    except OSError:
        pass
    return bool(expected_path.name) and expected_path.name == actual_path.name


def _locked_problems(config: JobConfig, model, actual: dict, tokenizer_size: int) -> list[str]:
    locked, problems = config.locked, []
    if locked.base_model and not _same_model(locked.base_model, actual["base_model"]):
        problems.append(f"locked.base_model: expected {locked.base_model!r}, but model.model_path is "
                        f"{actual['base_model']!r}. Point model.model_path at the locked model, or change "
                        "locked.base_model.")
    if locked.model_architecture:
        names = {actual["model_architecture"], type(_base(model)).__name__}
        if locked.model_architecture not in names:
            problems.append(f"locked.model_architecture: expected {locked.model_architecture!r}, but the loaded "
                            f"model is {actual['model_architecture']!r}.")
    if locked.vocab_size and locked.vocab_size not in (actual["vocab_size"], tokenizer_size):
        problems.append(f"locked.vocab_size: expected {locked.vocab_size}, but the model has {actual['vocab_size']} "
                        f"embedding rows and the tokenizer {tokenizer_size} tokens.")
    if locked.max_context_length and config.data.max_length > locked.max_context_length:
        problems.append(f"data.max_length: {config.data.max_length} exceeds locked.max_context_length = "
                        f"{locked.max_context_length}; lower data.max_length.")
    return problems


def _recorded_problems(folder: Path, recorded: dict, actual: dict) -> list[str]:
    fresh = (f"To train something else, choose a new output.output_dir (or set output.resume = \"never\" and "
             f"output.overwrite = true to replace the run in {folder}).")
    problems = []
    for name in FIELDS:
        if name not in recorded:
            continue
        before, now = recorded[name], actual[name]
        same = _same_model(str(before), str(now)) if name == "base_model" else before == now
        if not same:
            problems.append(f"{name} ({LABELS[name]}): {folder} records {before!r} from the first run in this "
                            f"folder, but this run has {now!r}. {fresh}")
    return problems
