"""Loading the model to train (full, LoRA or QLoRA), and writing the final one.

    model = build_model(config, tokenizer)          # every process, before accelerator.prepare
    register_checkpoint_hooks(accelerator)          # so step checkpoints of a 4-bit model resume
    ...
    save_final_model(accelerator, model, tokenizer, output_dir, config=config)   # every process

What each mode trains and writes:

| mode | keys | trains | `final/` |
| --- | --- | --- | --- |
| full | `lora.enabled = false` | every weight | the model, `from_pretrained`-ready |
| LoRA | `lora.enabled = true` | adapters (peft), `modules_to_save` | adapter; `merged/` with `output.merge_lora` |
| QLoRA | and `model.load_in_4bit` | the same, on an NF4 base | the same; `merged/` from a float copy of the base |

Gradient checkpointing is always non-reentrant: it needs no inputs that require grad, so it works on
a frozen base under LoRA, and its gradients equal those without it (tests/test_lora.py pins both).

Attention `auto` is transformers' own choice (sdpa where the model supports it, else eager); with
`data.packing`, its sdpa runs once per packed example (`loop/attention.py`); `sdpa` named is
transformers' own. LoRA's "all-linear" is resolved here so that it leaves MoE routers out
(`all_linear_targets`); docs/models.md lists the families tests/test_architectures.py proves.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from launcher.config import PRECISIONS, ConfigError, JobConfig
from loop.attention import use_packed_sdpa

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The dtype 4-bit layers compute in, and a QLoRA merge is written in, per mixed precision.
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}


class ModelLoadError(ConfigError):
    """The model named by the job cannot be loaded."""


# --- building -----------------------------------------------------------------------------------

def build_model(config: JobConfig, tokenizer):
    """The causal LM of `model.model_path`, ready for training.

    Cache off, pad token from the tokenizer, embeddings grown to the tokenizer, then either
    gradient checkpointing (full fine-tuning and LoRA) or the k-bit preparation (QLoRA), then the
    LoRA adapters. Raises `ModelLoadError` naming the key to change.
    """
    m = config.model
    _check_attention(m.attn_implementation)
    if config.lora.enabled:
        _require("peft", "lora.enabled", "LoRA", "lora")
    kwargs = {}
    if m.load_in_4bit:
        _require("bitsandbytes", "model.load_in_4bit", "4-bit loading (QLoRA)", "qlora")
        kwargs = _quantization_kwargs(config)
    # "auto" is transformers' own default: sdpa where the model class supports it, else eager (Gemma 2).
    attention = None if m.attn_implementation == "auto" else m.attn_implementation
    model = _from_pretrained(m.model_path, dtype=DTYPES.get(m.dtype, torch.float32), attn_implementation=attention,
                             trust_remote_code=m.trust_remote_code, **kwargs)
    if config.runs_sdpa_per_example() and use_packed_sdpa(model):
        logger.info("attention: sdpa once per packed example, skipping the masked work between them "
                    "(model.attn_implementation = %r)", m.attn_implementation)
    else:
        logger.info("attention: %s (model.attn_implementation = %r)",
                    getattr(model.config, "_attn_implementation", "?"), m.attn_implementation)
    model.config.use_cache = False  # the KV cache only costs memory in training
    _set_pad_token(model, tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if m.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        _keep_4bit_layout(model)
        # Freezes the base, upcasts norms to fp32 and (when asked) enables checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=m.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif m.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora.enabled:
        model = _add_lora(model, config)
    if m.compile:
        compile_layers(model)
    trainable, total = count_parameters(model)
    logger.info("model %s: %s of %s parameters trainable (%.2f%%)", type(model).__name__, f"{trainable:,}",
                f"{total:,}", 100 * trainable / max(total, 1))
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the values they hold, not their bytes."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 partitions hold a stub
        if param.__class__.__name__ == "Params4bit":
            count *= 2 * param.element_size()  # two 4-bit values per byte of storage
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model) -> int:
    """`torch.compile` each repeated decoder layer in place (not the whole model): every layer has the
    same code, so it compiles once and is reused, several times faster to compile than the whole graph
    on 8B models, and the embedding, loss and generation stay eager. Returns the layers compiled."""
    layers = [module for module in model.modules() if type(module).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=None)
    if not layers:
        logger.warning("model.compile: found no decoder layers (a *DecoderLayer module) to compile; running eager")
    else:
        logger.info("model.compile: %d %s layers compiled on first use", len(layers), type(layers[0]).__name__)
    return len(layers)


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model_of(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if is_peft_model(model) else model


def _from_pretrained(path: str, **kwargs):
    from transformers import AutoModelForCausalLM

    if _is_offline() and not Path(path).exists():
        # huggingface_hub reads HF_HUB_OFFLINE once at import; read it now so an offline run
        # fails at once instead of retrying the network for most of a minute. The adapter lookup
        # takes its own copy of the flag.
        kwargs["local_files_only"] = True
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as error:  # e.g. bitsandbytes too old for 4-bit, or a package remote code wants
        raise ModelLoadError(f"model.model_path: loading {path!r} needs a package that is missing or too old: "
                             f"{_first_line(error)}") from None
    except (OSError, ValueError) as error:
        attention = kwargs.get("attn_implementation")
        if attention and any(word in str(error) for word in ("attn_implementation", "scaled_dot_product_attention")):
            # e.g. sdpa asked of Gemma 2
            raise ModelLoadError(f"model.attn_implementation: {path!r} cannot use {attention!r}: {_first_line(error)} "
                                 "Use \"auto\" (the default), which picks what the model supports.") from None
        raise ModelLoadError(_load_message("model.model_path", path, error)) from None


def _is_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _load_message(key: str, value: str, error: Exception) -> str:
    first_line = _first_line(error)
    if not Path(value).exists():
        offline = " (HF_HUB_OFFLINE is set)" if _is_offline() else ""
        return (f"{key}: cannot load {value!r}: no such local folder, and the model hub is not reachable{offline} "
                f"or has no such model ({first_line}). The model must be a local folder with config.json and "
                f"weights, or the hub must be reachable: point {key} at a local folder, or download the model "
                "first.")
    return f"{key}: cannot load {value!r} ({first_line}). Check that the folder holds a causal LM."


def _require(module: str, key: str, feature: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{key}: {feature} needs the `{module}` package, which is not installed. "
                             f"Install it with: pip install 'trainer-engine[{extra}]'")


def _check_attention(implementation: str) -> None:
    if implementation not in FLASH_PACKAGES:
        return
    module, package = FLASH_PACKAGES[implementation]
    missing = []
    if importlib.util.find_spec(module) is None:
        missing.append(f"the `{package}` package is not installed")
    if not torch.cuda.is_available():
        missing.append("there is no CUDA GPU")
    if missing:
        raise ModelLoadError(f"model.attn_implementation: {implementation!r} cannot run here: "
                             f"{' and '.join(missing)}. Use attn_implementation = \"auto\" (the default: sdpa "
                             "where the model supports it, else eager).")


def _quantization_kwargs(config: JobConfig) -> dict:
    """from_pretrained arguments for an NF4 base with double quantisation, on this process's device."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, PRECISIONS[config.hyperparams.fp_precision].dtype))
    # A quantised model cannot be moved after loading, so it is loaded where it trains: each rank
    # on its own GPU (LOCAL_RANK, set by every launcher, read before any Accelerator exists).
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def _keep_4bit_layout(model) -> None:
    """Keep the 4-bit weights as loaded, also through evaluation on CPU.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel at its first
    forward without grad (evaluation, previews), rounding its scales to bfloat16, and `state_dict()`
    unpacks it again with another rounding. A model that trains would then drift from the one a
    resume rebuilds from `model.model_path`, so the repacking is turned off.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _set_pad_token(model, tokenizer) -> None:
    """Batches are padded with the tokenizer's pad token; the model config must agree."""
    pad = tokenizer.pad_token_id
    if pad is None or getattr(model.config, "pad_token_id", None) == pad:
        return
    model.config.pad_token_id = pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad


def _add_lora(model, config: JobConfig):
    """Wrap `model` in a peft LoRA adapter; only the adapter (and `modules_to_save`) train."""
    import peft

    lora = config.lora
    targets = {"target_modules": lora.target_modules if isinstance(lora.target_modules, str)
               else list(lora.target_modules)}
    if lora.target_modules == "all-linear":
        targets = all_linear_targets(model)
    lora_config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none", task_type="CAUSAL_LM",
        modules_to_save=list(lora.modules_to_save) or None, **targets,
    )
    try:
        return peft.get_peft_model(model, lora_config)
    except ValueError as error:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__})
        raise ModelLoadError(f"lora.target_modules / lora.modules_to_save: {_first_line(error)}. Linear modules "
                             f"of this model: {', '.join(linear)}; or use target_modules = \"all-linear\".") from None


# Routers of Mixture-of-Experts layers, by module name (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek: `gate`;
# Qwen2-MoE: `shared_expert_gate`; Jamba, GPT-OSS, Granite-MoE: `router`) or class (`*Router`, `*Gate`,
# `*Gating`). An adapter on a router changes which experts see which tokens, not what they compute.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
ROUTER_CLASS_SUFFIXES = ("Router", "Gate", "Gating")


def all_linear_targets(model) -> dict:
    """peft arguments for `lora.target_modules = "all-linear"`: every linear layer (`target_modules`)
    and every stacked expert weight (`target_parameters`), but not the output layer or the routers.

    peft's own "all-linear" also adapts the routers of Mixture-of-Experts models: transformers 5 made
    them custom modules and stacked each layer's experts into 3-D parameters, and peft maps its v4
    names (router included) onto those. So the targets are resolved here, as full names like peft's.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    routers = tuple(name for name, module in modules.items()
                    if name.rsplit(".", 1)[-1] in ROUTER_NAMES or type(module).__name__.endswith(ROUTER_CLASS_SUFFIXES))

    def in_router(name: str) -> bool:
        return any(name == router or name.startswith(router + ".") for router in routers)

    linear = sorted(name for name, module in modules.items()
                    if isinstance(module, torch.nn.Linear) and module is not output and not in_router(name))
    experts = [name for name, module in modules.items()
               if (name.rsplit(".", 1)[-1] == "experts" or type(module).__name__.endswith("Experts"))
               and not in_router(name)]
    stacked = sorted(f"{name}.{leaf}" for name in experts
                     for leaf, param in modules[name].named_parameters(recurse=False) if param.ndim == 3)
    targets: dict = {"target_modules": linear}
    if stacked:
        targets["target_parameters"] = stacked  # peft >= 0.17
    return targets


# --- step checkpoints of 4-bit models -----------------------------------------------------------

def register_checkpoint_hooks(accelerator) -> None:
    """Let `save_state` / `load_state` handle a 4-bit (QLoRA) model.

    torch cannot load a bitsandbytes 4-bit state dict back into a loaded model (the quantisation
    state comes back as unexpected keys). The frozen 4-bit weights need no saving anyway: they are
    rebuilt exactly by quantising `model.model_path` again. So for such a model the checkpoint holds
    everything else (adapters, norms, embeddings), and loading checks that exactly the 4-bit
    weights are missing. Other models are saved and loaded by Accelerate as usual.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return  # they save through their own engines, not through the `weights` list

    def save_hook(models, weights, output_dir):
        for index, model in enumerate(models):
            if index < len(weights) and _quantized_prefixes(model):
                prefixes = _quantized_prefixes(model)
                # Same mapping type: Accelerate de-duplicates tied tensors only in an OrderedDict.
                weights[index] = type(weights[index])(
                    (k, v) for k, v in weights[index].items() if not _is_quantized_key(k, prefixes))

    def load_hook(models, input_dir):
        from safetensors.torch import load_model

        # Only our one model is ever prepared; popping it keeps Accelerate from loading it again.
        for index in reversed(range(len(models))):
            prefixes = _quantized_prefixes(models[index])
            if not prefixes:
                continue
            model = models.pop(index)
            suffix = "" if index == 0 else f"_{index}"
            device = next(p.device for p in model.parameters())
            # safetensors' loader knows that a tied tensor was saved once under one of its names.
            missing, unexpected = load_model(model, Path(input_dir) / f"model{suffix}.safetensors", strict=False,
                                             device=str(device))
            missing = [k for k in missing if not _is_quantized_key(k, prefixes)]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {input_dir} does not fit this 4-bit model: missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _quantized_prefixes(model) -> tuple[str, ...]:
    """State-dict names of the 4-bit weights in `model` (as wrapped, so DDP's `module.` is kept)."""
    return tuple(f"{name}." for name, param in model.named_parameters() if param.__class__.__name__ == "Params4bit")


def _is_quantized_key(key: str, prefixes: tuple[str, ...]) -> bool:
    # A 4-bit weight saves as `...weight` plus `...weight.absmax`, `...weight.quant_map`, ...
    return (key + ".").startswith(prefixes)


# --- the final model ----------------------------------------------------------------------------

def save_final_model(accelerator, model, tokenizer, output_dir: Path, *, config: JobConfig | None = None) -> Path:
    """Write `output_dir/final` in Hugging Face format from the unwrapped, gathered weights.

    Full fine-tuning: the model. LoRA/QLoRA: the adapter (`adapter_config.json`,
    `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained(base, final)` loads onto the
    base; with `output.merge_lora` (needs `config`) also `final/merged`, the adapter merged into a
    float copy of the base. The tokenizer goes with each.

    Every process must call this (ZeRO-3 and FSDP gather shards); only the main one writes.
    The folder appears whole: it is written next to its destination and renamed.
    """
    output_dir = Path(output_dir)
    final, tmp = output_dir / "final", output_dir / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # inference wants it back
        # For a peft model this writes only the adapter, picked out of the full state dict.
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        unwrapped.config.use_cache = False
        tokenizer.save_pretrained(tmp)
        if is_peft_model(unwrapped) and config is not None and config.output.merge_lora:
            merged = merge_lora(unwrapped, state_dict, config)
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            tokenizer.save_pretrained(tmp / "merged")
            del merged
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def merge_lora(peft_model, state_dict: dict, config: JobConfig):
    """A plain transformers model: the trained adapter merged into a float copy of the base.

    The base is reloaded from `model.model_path` without quantisation (in `model.dtype` for LoRA; for
    QLoRA in float32, or bfloat16 under bf16), the trained values are loaded into a fresh peft
    wrapper of it, and the adapter is merged. Every floating-point tensor of `state_dict` that fits is
    loaded (adapters, `modules_to_save`, resized embeddings, and for LoRA the unchanged base too); the
    4-bit weights of QLoRA do not fit and keep their full-precision originals. Runs on the main
    process's CPU and holds one more copy of the model.
    """
    import peft

    m = config.model
    base = base_model_of(peft_model)
    if getattr(base, "is_loaded_in_4bit", False):
        dtype = torch.bfloat16 if config.hyperparams.fp_precision == "bf16" else torch.float32
    else:
        dtype = DTYPES.get(m.dtype, torch.float32)
    fresh = _from_pretrained(m.model_path, dtype=dtype, trust_remote_code=m.trust_remote_code)
    num_rows = base.get_input_embeddings().num_embeddings
    if fresh.get_input_embeddings().num_embeddings != num_rows:
        fresh.resize_token_embeddings(num_rows)
    fresh.config.pad_token_id = base.config.pad_token_id
    adapter_name = peft_model.active_adapter
    wrapped = peft.get_peft_model(fresh, copy.deepcopy(peft_model.peft_config[adapter_name]),
                                  adapter_name=adapter_name)
    target = wrapped.state_dict()
    loadable = {k: v.to(dtype) for k, v in state_dict.items()
                if k in target and v.is_floating_point() and v.shape == target[k].shape}
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    not_loaded = [name for name in trained if name not in loadable]
    assert not not_loaded, f"trained weights missing from the state dict: {not_loaded[:5]}"
    wrapped.load_state_dict(loadable, strict=False)
    merged = wrapped.merge_and_unload()
    merged.config.use_cache = True
    return merged
