"""Loading the model to train, and writing the final one."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from launcher.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ConfigError):
    """The model named by the job cannot be loaded."""


def build_model(config: JobConfig, tokenizer):
    """The causal LM of `model.model_path`, ready for training (cache off, checkpointing, adapters)."""
    from transformers import AutoModelForCausalLM

    m = config.model
    # "auto" keeps float32 master weights; mixed precision then comes from autocast.
    dtype = DTYPES.get(m.dtype, torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            m.model_path, dtype=dtype, attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError, ImportError) as error:
        raise ModelLoadError(_load_message("model.model_path", m.model_path, error)) from None
    model.config.use_cache = False  # the KV cache only costs memory in training
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _load_message(key: str, value: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not Path(value).exists():
        return (f"{key}: cannot load {value!r}: no such local folder, and the model hub is not reachable "
                f"or has no such model ({first_line}). Point {key} at a local folder with config.json and "
                "weights, or make the hub reachable.")
    return f"{key}: cannot load {value!r} ({first_line}). Check that the folder holds a causal LM."


def save_final_model(accelerator, model, tokenizer, output_dir: Path) -> Path:
    """Write `output_dir/final` in Hugging Face format from the unwrapped, gathered weights.

    Every process must call this (ZeRO-3 and FSDP gather shards); only the main one writes.
    The folder appears whole: it is written next to its destination and renamed.
    """
    final, tmp = output_dir / "final", output_dir / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # inference wants it back
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        unwrapped.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
