"""`python -m launcher plan JOB.toml [--gpus N] [--gpu-memory 80GB]`: predicted peak memory per device.

    from launcher.plan import plan_job, format_plan
    plan = plan_job(load_config("job.toml", check_environment=False), gpus=8, gpu_memory="80GB")
    print(format_plan(plan))

Before anything is launched: the model's `config.json` is read with `transformers.AutoConfig` (no
weights are loaded) and its parameters are counted from the safetensors headers when the model is a
local folder (else from the config). The job's precision, LoRA/QLoRA, optimizer, loss path, gradient
checkpointing, sequence length, micro-batch and the sharding of `launch.accelerate_config` (DDP,
DeepSpeed ZeRO-1/2/3, FSDP) give each term of the peak; then the largest micro-batch that fits, and
the gradient accumulation that keeps the job's global batch (batch_size x gradient_accumulation x
processes). docs/memory.md gives the formula, how it was calibrated and what it leaves out.

Exit codes of `main_plan`: 0 the job's micro-batch fits, 1 it does not; a bad job raises `ConfigError`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from launcher.config import ConfigError, JobConfig

GiB = 2**30
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Headroom on a GPU: the CUDA context and library workspaces (cuBLAS, NCCL) outside PyTorch's
# allocator, and the allocator's fragmentation. The plan's peak is PyTorch's allocated bytes.
GPU_RESERVED_BYTES = 1 * GiB
GPU_USABLE_SHARE = 0.90
# bitsandbytes NF4 with double quantisation: 4 bits a value, an 8-bit scale per block of 64 values and
# a float32 scale per 256 of those blocks.
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes' 8-bit optimizers keep 32-bit states for tensors below this many values.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256  # values per float32 scale of each 8-bit state


# --- the model, from its config -----------------------------------------------------------------

class Tensor(NamedTuple):
    """One parameter tensor of the checkpoint."""

    name: str
    shape: tuple[int, ...]
    role: str
    """"embed", "head", "linear" (a decoder layer's projection), "norm" or "bias"."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """The projection's module name (`q_proj`, ...) for decoder linears and their biases."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) >= 2 else ""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer, from its config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qk_norm: bool = False
    """Qwen3-style RMSNorm on each query and key head."""
    attention_bias: bool = False
    """Biases on q, k, v (and o unless `qkv_bias_only`)."""
    qkv_bias_only: bool = False
    mlp_bias: bool = False
    logits_changed: str = ""
    """Why the logits are not just the output layer applied to the hidden states (soft-capping,
    scaling), so the fused loss would not be exact; "" when they are."""
    name: str = ""

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """From a transformers `PretrainedConfig` (or a dict of config.json)."""
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        text = get("text_config")  # multimodal wrappers keep the language model's config inside
        if text is not None and get("hidden_size") is None:
            return cls.from_config(text, name=name)
        if (get("num_experts") or get("num_local_experts") or get("n_routed_experts") or 0) > 0:
            raise ConfigError(f"model.model_path: {name or 'the model'} is a mixture of experts; the memory plan "
                              "models dense decoders only")
        missing = [key for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "vocab_size") if get(key) is None]
        if missing:
            raise ConfigError(f"model.model_path: the config of {name or 'the model'} has no {', '.join(missing)}: "
                              "the memory plan needs a decoder-only transformer's config")
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        model_type = str(get("model_type") or "")
        changed = []
        if get("final_logit_softcapping"):
            changed.append("soft-caps its logits")
        if get("logit_scale") not in (None, 1, 1.0):
            changed.append("scales its logits")
        if get("logits_scaling") not in (None, 1, 1.0):
            changed.append("scales its logits")
        return cls(
            hidden_size=hidden, num_layers=int(get("num_hidden_layers")), num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads), intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")), tied_embeddings=bool(get("tie_word_embeddings", False)),
            qk_norm=model_type in ("qwen3", "olmo2", "gemma3_text", "gemma3"),
            attention_bias=bool(get("attention_bias", False)) or model_type == "qwen2",
            qkv_bias_only=model_type == "qwen2", mlp_bias=bool(get("mlp_bias", False)),
            logits_changed=" and ".join(dict.fromkeys(changed)), name=name or model_type)

    def tensors(self) -> list[Tensor]:
        """The parameter tensors, named as in a Hugging Face checkpoint of a Llama/Qwen-style model."""
        return list(_shape_tensors(self))

    def _tensors(self) -> tuple[Tensor, ...]:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        out = [Tensor("model.embed_tokens.weight", (self.vocab_size, h), "embed")]
        projections = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                       "self_attn.o_proj": (h, q), "mlp.gate_proj": (self.intermediate_size, h),
                       "mlp.up_proj": (self.intermediate_size, h), "mlp.down_proj": (h, self.intermediate_size)}
        for i in range(self.num_layers):
            prefix = f"model.layers.{i}"
            out.append(Tensor(f"{prefix}.input_layernorm.weight", (h,), "norm"))
            out.append(Tensor(f"{prefix}.post_attention_layernorm.weight", (h,), "norm"))
            if self.qk_norm:
                out.append(Tensor(f"{prefix}.self_attn.q_norm.weight", (self.head_dim,), "norm"))
                out.append(Tensor(f"{prefix}.self_attn.k_norm.weight", (self.head_dim,), "norm"))
            for module, shape in projections.items():
                out.append(Tensor(f"{prefix}.{module}.weight", shape, "linear"))
                attention = module.startswith("self_attn")
                if (attention and self.attention_bias and not (self.qkv_bias_only and module.endswith("o_proj"))) \
                        or (not attention and self.mlp_bias):
                    out.append(Tensor(f"{prefix}.{module}.bias", (shape[0],), "bias"))
        out.append(Tensor("model.norm.weight", (h,), "norm"))
        if not self.tied_embeddings:
            out.append(Tensor("lm_head.weight", (self.vocab_size, h), "head"))
        return tuple(out)

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors())

    def describe(self) -> str:
        return (f"hidden {self.hidden_size}, {self.num_layers} layers, {self.num_heads} heads ({self.num_kv_heads} "
                f"kv, head dim {self.head_dim}), intermediate {self.intermediate_size}, vocab {self.vocab_size:,}, "
                f"{'tied' if self.tied_embeddings else 'separate'} input and output embeddings")


@functools.lru_cache(maxsize=64)
def _shape_tensors(shape: ModelShape) -> tuple[Tensor, ...]:
    return shape._tensors()  # the plan asks for them once per micro-batch it tries


def checkpoint_tensors(folder: str | Path) -> list[Tensor] | None:
    """The parameter tensors listed in a folder's safetensors headers (no tensor is read), or None
    when the folder has no safetensors files."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    found = []
    for path in files:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                found.append(Tensor(name, tuple(entry["shape"]), _role(name, entry["shape"])))
    return sorted(found, key=lambda t: t.name)


def _role(name: str, shape: list[int]) -> str:
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return "embed"
    if name.startswith("lm_head") or name.endswith("output.weight"):
        return "head"
    if len(shape) >= 2:
        return "linear"
    return "bias" if name.endswith(".bias") else "norm"


# --- the setup, from the job ----------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """How the job trains, as far as memory goes. `from_job` reads it from a job."""

    micro_batch: int = 1
    seq_len: int = 2048
    gradient_accumulation: int = 1
    num_processes: int = 1
    sharding: str = "none"
    """"none" (one process), "ddp", "zero1", "zero2", "zero3" or "fsdp"."""
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "fp32"
    """hyperparams.fp_precision: "fp32", "bf16" or "fp16"."""
    weight_dtype: str = "float32"
    """The dtype the weights are loaded in (`model.dtype`; "auto" loads float32)."""
    lora: bool = False
    lora_r: int = 16
    lora_targets: tuple[str, ...] = DECODER_LINEARS
    lora_dropout: float = 0.05
    modules_to_save: tuple[str, ...] = ()
    load_in_4bit: bool = False
    optimizer: str = "adamw"
    loss: str = "fused"
    """"fused" or "logits": the path the job takes (`resolve_loss` turns "auto" into one)."""
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    attention_mask: bool = False
    """Whether batches carry an attention mask (padding, or packed rows not run once per example,
    `JobConfig.runs_sdpa_per_example`): SDPA then repeats the key/value heads to the query heads
    before saving them."""
    device: str = "cuda"

    # --- derived ------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def deepspeed(self) -> bool:
        return self.sharding in ("zero1", "zero2", "zero3")

    @property
    def half_weights(self) -> bool:
        """Weights stored in 16 bits while training: a 16-bit `model.dtype`, or DeepSpeed's conversion
        under bf16/fp16 (it steps a float32 master copy)."""
        return DTYPE_BYTES[self.weight_dtype] == 2 or (self.precision != "fp32" and self.deepspeed)

    @property
    def autocast(self) -> bool:
        """16-bit autocast over float32 weights: each matmul runs on 16-bit copies (FSDP instead gathers
        16-bit copies of the float32 shards)."""
        return self.precision != "fp32" and not self.half_weights and self.sharding != "fsdp"

    @property
    def weight_bytes(self) -> int:
        return 2 if self.half_weights else 4

    @property
    def act_bytes(self) -> int:
        """Bytes of a matmul's inputs and outputs as saved for backward."""
        return 2 if self.precision != "fp32" or self.half_weights else 4

    @property
    def residual_bytes(self) -> int:
        """Bytes of the residual stream between layers (float32 under autocast over float32 weights)."""
        return 2 if self.half_weights or (self.sharding == "fsdp" and self.precision != "fp32") else 4

    @property
    def weights_sharded(self) -> bool:
        return self.sharding in ("zero3", "fsdp")

    @property
    def grads_sharded(self) -> bool:
        return self.sharding in ("zero2", "zero3", "fsdp")

    @property
    def states_sharded(self) -> bool:
        return self.sharding in ("zero1", "zero2", "zero3", "fsdp")

    def describe(self) -> str:
        mode = "QLoRA" if self.load_in_4bit else ("LoRA" if self.lora else "full fine-tuning")
        if self.lora:
            mode += f" (r {self.lora_r}, {len(self.lora_targets)} projections per layer)"
        precision = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        if self.autocast:
            precision += " autocast over float32 weights"
        elif self.half_weights:
            precision += " weights" + (" (a float32 master copy in the optimizer)" if self.deepspeed else "")
        elif self.sharding == "fsdp" and self.precision != "fp32":
            precision += " compute over float32 shards"
        sharding = {"none": "one process", "ddp": "DDP", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2",
                    "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP (full shard)"}[self.sharding]
        if self.offload_optimizer or self.offload_params:
            sharding += ", offloading " + " and ".join(
                name for name, on in (("optimizer states", self.offload_optimizer), ("weights", self.offload_params))
                if on) + " to CPU"
        return (f"{mode}, {precision}, {self.optimizer}, {self.loss} loss, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}, "
                f"{'sdpa (auto)' if self.attn_implementation == 'auto' else self.attn_implementation} attention, "
                f"{sharding}")


# --- the terms --------------------------------------------------------------------------------------

@dataclass
class Estimate:
    """Bytes per device of each term, and the peak (the largest of the phases of a step)."""

    terms: dict[str, float]
    """`TERMS` -> bytes held at the peak phase."""
    phases: dict[str, float]
    """Bytes in use at each phase of a step whose peak the plan compares."""
    notes: dict[str, str] = field(default_factory=dict)
    """How each term was counted, in words."""
    phase_terms: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each phase's terms."""

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def largest(self, term: str) -> float:
        """The term's largest value over the phases (the activations' is not in the peak phase when the
        gradients make the peak)."""
        return max(terms.get(term, 0.0) for terms in self.phase_terms.values())


def trainable_tensors(tensors: list[Tensor], setup: Setup) -> tuple[list[Tensor], list[Tensor]]:
    """(trainable, frozen) tensors. Under LoRA the adapters are the trainable ones (as `Tensor`s of
    role "adapter"), plus copies of `modules_to_save`."""
    if not setup.lora:
        return list(tensors), []
    adapters, copies = [], []
    for t in tensors:
        if t.role == "linear" and t.module in setup.lora_targets:
            out_features, in_features = t.shape
            for adapter, shape in (("lora_A", (setup.lora_r, in_features)), ("lora_B", (out_features, setup.lora_r))):
                adapters.append(Tensor(t.name.replace(".weight", f".{adapter}.weight"), shape, "adapter"))
        if any(t.name.split(".")[-2] == module or f".{module}." in f".{t.name}" for module in setup.modules_to_save):
            copies.append(Tensor(t.name + ".copy", t.shape, t.role))
        if t.role == "embed" and "lm_head" in setup.modules_to_save and not any(u.role == "head" for u in tensors):
            copies.append(Tensor("lm_head.weight.copy", t.shape, "head"))  # a tied output layer, copied untied
    return adapters + copies, list(tensors)


def weight_bytes(t: Tensor, setup: Setup) -> float:
    """Bytes of one weight as held while training."""
    if t.role == "adapter":
        return t.numel * 4  # peft keeps adapters in float32 (autocast_adapter_dtype)
    if setup.load_in_4bit:
        # The decoder projections are NF4; peft's k-bit preparation casts the rest to float32.
        return t.numel * NF4_BYTES_PER_VALUE if t.role == "linear" else t.numel * 4
    return t.numel * setup.weight_bytes


def optimizer_state_bytes(trainable: list[Tensor], setup: Setup) -> float:
    """Bytes of the optimizer's state for these trainable tensors, on one process before sharding.

    adamw: two moments in the parameter's dtype (8 bytes a float32 parameter); under DeepSpeed with
    16-bit weights also the float32 master copy (4 + 8 bytes a parameter).
    adamw_8bit, paged_adamw_8bit: two 8-bit moments and a float32 scale per 256 values of each; tensors
    below 4,096 values keep 32-bit moments (bitsandbytes' min_8bit_size).
    adafactor: torch's Adafactor keeps a row and a column second moment per matrix (rows + columns
    values) and a full second moment per vector, in the parameter's dtype; no first moment.
    """
    total = 0.0
    for t in trainable:
        state_dtype = 4 if t.role == "adapter" or setup.load_in_4bit or not setup.half_weights else 2
        if setup.deepspeed and setup.half_weights:
            state_dtype = 4  # DeepSpeed steps a float32 master copy
            total += t.numel * 4
        if setup.optimizer == "adamw":
            total += 2 * t.numel * state_dtype
        elif setup.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if t.numel < BNB_MIN_8BIT_SIZE:
                total += 2 * t.numel * 4
            else:
                total += 2 * (t.numel + math.ceil(t.numel / BNB_BLOCK) * 4)
        elif setup.optimizer == "adafactor":
            if len(t.shape) >= 2:
                rows = math.prod(t.shape[:-1])
                total += (rows + math.prod(t.shape) // rows) * state_dtype
            else:
                total += t.numel * state_dtype
        else:
            raise ConfigError(f"hyperparams.optimizer: {setup.optimizer!r} is not one the plan knows")
    return total


def layer_activation_bytes(shape: ModelShape, setup: Setup, *, trainable_base: bool | None = None) -> float:
    """Bytes per token one decoder layer saves for backward (no checkpointing).

    Counted op by op for a Llama/Qwen layer under autograd: the RMSNorm keeps its input and
    1/rms (and its normalised input when the norm's weight trains); each projection keeps its input
    when its weight trains (under autocast, its own 16-bit copy); a LoRA adapter keeps its dropout's
    output and mask and its rank-r middle; Qwen3's q/k norms like the layer norms; SDPA keeps q, k, v,
    its output and the log-sum-exp; the MLP keeps gate and up outputs, the SiLU output and their
    product. Transients (freed within the op) are not counted here.
    """
    h, H, K, d, I = (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                     shape.intermediate_size)
    q, kv = H * d, K * d
    a, r, f = setup.act_bytes, setup.residual_bytes, 4
    full = (not setup.lora) if trainable_base is None else trainable_base
    sdpa = setup.attn_implementation in ("sdpa", "auto")  # "auto": transformers' default, sdpa for these models
    kv_saved = q if setup.attention_mask and sdpa and K != H else kv

    def inputs_of(modules: tuple[str, ...], width: int) -> float:
        """What the projections reading one tensor of `width` keep of it."""
        total, shared = 0.0, False
        for module in modules:
            if full:
                if setup.autocast:
                    total += width * 2  # autocast casts the input once per projection
                else:
                    shared = True
            if setup.lora and module in setup.lora_targets:
                if setup.lora_dropout > 0:
                    # the dropout's output and its mask: bool on CUDA, a float noise tensor on CPU
                    total += width * a + width * (1 if setup.device == "cuda" else a)
                elif setup.autocast:
                    total += width * 2
                else:
                    shared = True
                total += setup.lora_r * a  # lora_A's output, kept by lora_B
        return total + (width * a if shared else 0)

    saved = 0.0
    # input RMSNorm: input (as float32), 1/rms, normalised input (for the weight's gradient)
    saved += h * f + f + (h * r if full else 0)
    saved += inputs_of(("q_proj", "k_proj", "v_proj"), h)
    if shape.qk_norm:  # per-head RMSNorm of queries and keys
        saved += (q + kv) * f + (H + K) * f + ((q + kv) * a if full else 0)
    # SDPA: q, k, v (k and v repeated to the query heads when a mask forces the math/efficient path),
    # the output and the float32 log-sum-exp
    saved += q * a + 2 * kv_saved * a + q * a + H * f
    if setup.attn_implementation == "eager":
        saved += H * setup.seq_len * (f + a)  # softmax output (float32) and its cast, per query
    saved += inputs_of(("o_proj",), q)  # the attention output, made contiguous
    # residual sum, post-attention RMSNorm
    saved += h * f + f + (h * r if full else 0)
    saved += inputs_of(("gate_proj", "up_proj"), h)
    saved += 3 * I * a  # gate output (SiLU's input), SiLU output, up output
    saved += inputs_of(("down_proj",), I)  # their product
    return saved


def head_activation_bytes(shape: ModelShape, setup: Setup, head_trains: bool) -> float:
    """Bytes per token the final norm keeps, and the hidden states the output layer (or the fused loss) keeps."""
    h, f, r, a = shape.hidden_size, 4, setup.residual_bytes, setup.act_bytes
    saved = h * f + f + (h * r if head_trains and not setup.lora else 0)
    if setup.loss == "fused":
        saved += h * r  # the fused loss keeps its input
    elif head_trains:
        saved += h * (2 if setup.autocast else a)
    return saved


FUSED_CHUNK_TOKENS = 1024
"""Tokens a chunk of the fused loss: `loop.loss.FUSED_CHUNK_ROWS` (this module imports no torch; a
test checks the two agree)."""


def loss_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes the loss holds at its peak (backward), for the micro-batch.

    logits: float32 log-probabilities (kept by log_softmax) and, in backward, the gradients of the
    loss and of log_softmax: three (tokens x vocabulary) float32 tensors at once.
    fused: torch's chunked linear_cross_entropy, whose backward recomputes one chunk at a time: the
    chunk's float32 logits, turned into their gradient in place (`fused_chunk_bytes`), and the
    gradient of the whole input.
    """
    if setup.loss == "logits":
        return 3 * 4 * setup.tokens * shape.vocab_size
    h, V, r = shape.hidden_size, shape.vocab_size, setup.residual_bytes
    grad_input = setup.tokens * h * (4 if setup.device == "cpu" else r)  # float32 on CPU ("accurate" policy)
    # 16-bit inputs on CPU: the "accurate" policy also casts the output weight to float32 and keeps a
    # float32 scratch for each chunk's weight gradient.
    weight_scratch = 2 * 4 * V * h if r == 2 and setup.device == "cpu" else 0
    return fused_chunk_bytes(shape, setup) + grad_input + weight_scratch


def fused_chunk_bytes(shape: ModelShape, setup: Setup) -> float:
    """One chunk of the fused loss: (chunk tokens x vocabulary) float32 logits, and under 16-bit
    inputs on a GPU their 16-bit copy for the gradients' matmuls (torch's "compact" policy)."""
    chunk = min(setup.tokens, FUSED_CHUNK_TOKENS)
    return chunk * shape.vocab_size * (4 + (2 if setup.residual_bytes == 2 and setup.device != "cpu" else 0))


def estimate(shape: ModelShape, setup: Setup, tensors: list[Tensor] | None = None) -> Estimate:
    """The memory of one training step per device: each phase's terms; the peak is the largest phase.

    Phases (gradients are set to None after each optimizer step, so within a step they appear
    during backward, while the activations are freed):
    - end of forward: every saved activation, autocast's weight copies and the loss's forward;
    - loss backward: the same, with the loss's backward and the output layer's weight gradient;
    - backward of layer 0 (the last layer backward reaches): nearly all gradients, layer 0's
      activations (rebuilt first under gradient checkpointing) and its backward's temporaries;
    - end of backward: all gradients and the embedding's dense gradient;
    - optimizer step: all gradients and the step's temporaries.
    With gradient accumulation the gradients are present from the second micro-batch on.
    """
    tensors = tensors if tensors is not None else shape.tensors()
    trainable, frozen = trainable_tensors(tensors, setup)
    n, tokens = setup.num_processes, setup.tokens
    h, V = shape.hidden_size, shape.vocab_size
    notes: dict[str, str] = {}

    # Weights (the frozen base and the trainable ones), sharded by ZeRO-3 and FSDP.
    held = frozen + trainable if setup.lora else trainable
    weights = 0.0 if setup.offload_params else sum(weight_bytes(t, setup) for t in held)
    if setup.weights_sharded:
        weights /= n
    notes["weights"] = (f"{_count(sum(t.numel for t in held))} values"
                        + (", decoder projections in NF4" if setup.load_in_4bit else "")
                        + (f", / {n} (sharded)" if setup.weights_sharded else "")
                        + (" (offloaded to CPU)" if setup.offload_params else ""))

    # Gradients of the trainable values in their dtype (float32 for adapters), sharded by ZeRO-2/3 and
    # FSDP; DDP keeps a second copy in its communication buckets.
    def grad_bytes(t: Tensor) -> int:
        return 4 if t.role == "adapter" or setup.load_in_4bit or not setup.half_weights else 2

    grads = sum(t.numel * grad_bytes(t) for t in trainable) / (n if setup.grads_sharded else 1)
    ddp_buckets = grads if setup.sharding == "ddp" else 0.0
    notes["gradients"] = (f"{_count(sum(t.numel for t in trainable))} trainable values"
                          + (f", / {n} (sharded)" if setup.grads_sharded else "")
                          + (", and DDP's bucket copy" if ddp_buckets else ""))

    states = 0.0 if setup.offload_optimizer else optimizer_state_bytes(trainable, setup)
    if setup.states_sharded:
        states /= n
    notes["optimizer states"] = setup.optimizer + (f", / {n} (sharded)" if setup.states_sharded else "") + (
        " (offloaded to CPU)" if setup.offload_optimizer else "")

    # Activations of the decoder layers and of the head.
    per_layer = layer_activation_bytes(shape, setup)
    head_trains = any(t.role == "head" for t in trainable) or (
        shape.tied_embeddings and any(t.role == "embed" for t in trainable))
    head_saved = head_activation_bytes(shape, setup, head_trains) * tokens
    all_layers = shape.num_layers * per_layer * tokens
    if setup.gradient_checkpointing:
        layers_saved = shape.num_layers * h * setup.residual_bytes * tokens  # each layer's input
        recompute = per_layer * tokens  # one layer's activations, rebuilt during its backward
        notes["activations"] = (f"checkpointed: {shape.num_layers} layer inputs and one recomputed layer "
                                f"({per_layer / 1024:.1f} KiB a token); without checkpointing "
                                f"{_gib(all_layers + head_saved)} GiB")
    else:
        layers_saved, recompute = all_layers, 0.0
        checkpointed = (shape.num_layers * h * setup.residual_bytes + per_layer) * tokens + head_saved
        notes["activations"] = (f"{shape.num_layers} layers x {per_layer / 1024:.1f} KiB a token x {tokens:,} "
                                f"tokens; with checkpointing {_gib(checkpointed)} GiB")
    loss = loss_bytes(shape, setup)
    if setup.loss == "logits":
        # forward: the logits (and their float32 copy under 16 bits) and the log-probabilities
        loss_forward = tokens * V * (setup.act_bytes + (4 if setup.act_bytes == 2 else 0) + 4)
        notes["loss"] = "logits path: log-probabilities and two gradients, float32 (tokens x vocabulary)"
    else:
        loss_forward = 4 * min(tokens, FUSED_CHUNK_TOKENS) * V  # one chunk's logits at a time
        notes["loss"] = (f"fused path: a chunk of {min(tokens, FUSED_CHUNK_TOKENS):,} tokens' logits, float32, "
                         "and the input's gradient")

    # The output layer's weight gradient is made during the loss's backward (a temporary when it is
    # added to an existing gradient); the logits path makes it once its three big tensors are down to one.
    head_grad = V * h * (2 if setup.half_weights and not setup.load_in_4bit else 4) if head_trains else 0.0
    if setup.grads_sharded:
        head_grad /= n
    if setup.loss == "logits" and 4 * tokens * V + head_grad > loss:
        loss_backward, loss_backward_grads = 4 * tokens * V, head_grad
    elif setup.loss == "logits":
        loss_backward, loss_backward_grads = loss, 0.0
    else:
        loss_backward, loss_backward_grads = loss, head_grad

    # Autocast's 16-bit copies of the projections' weights: kept for backward by each matmul, and for
    # trainable weights also cached until the model's forward returns.
    autocast_copies = 0.0
    if setup.autocast:
        cast = [t for t in tensors if t.role == "linear" and not setup.load_in_4bit]
        cast += [t for t in trainable if t.role == "adapter"]
        head_copy = 2 * V * h if setup.loss == "logits" else 0.0
        autocast_copies = 2 * sum(t.numel for t in cast) + head_copy
        notes["autocast copies"] = "16-bit copies of the projections' weights made by autocast"
    kept_copies = autocast_copies if not setup.gradient_checkpointing else (
        2 * V * h if setup.autocast and setup.loss == "logits" else 0.0)

    # ZeRO-3 / FSDP gather a layer's weights (and prefetch the next) and the embedding in 16 bits.
    gathered = 0.0
    if setup.weights_sharded:
        layer = sum(t.numel for t in tensors if t.name.startswith("model.layers.0."))
        gathered = (2 * layer + V * h) * (2 if setup.precision != "fp32" else 4)
        notes["gathered weights"] = "two layers and the embedding, gathered for compute"

    # Temporaries: a dequantised 4-bit weight, the embedding's dense gradient (added to the tied output
    # layer's, or to the accumulated one), the optimizer step's.
    largest_linear = max((t.numel for t in tensors if t.role == "linear"), default=0)
    dequant = largest_linear * setup.act_bytes if setup.load_in_4bit else 0.0
    embed_trains = any(t.role == "embed" for t in trainable)
    embedding_grad = V * h * 4 if embed_trains and (shape.tied_embeddings or setup.gradient_accumulation > 1) else 0.0
    if setup.grads_sharded:
        embedding_grad /= n
    step_tmp = _step_temporaries(trainable, setup)

    accumulated = grads if setup.gradient_accumulation > 1 else 0.0  # kept between micro-batches
    base = {"weights": weights, "optimizer states": states, "gathered weights": gathered}
    during = {"gradients": accumulated + ddp_buckets}
    phases: dict[str, dict[str, float]] = {
        "end of forward": {**base, **during, "activations": layers_saved + head_saved, "loss": loss_forward,
                           "autocast copies": autocast_copies, "temporaries": dequant},
        "loss backward": {**base, "gradients": during["gradients"] + (0.0 if accumulated else loss_backward_grads),
                          "activations": layers_saved + head_saved, "loss": loss_backward,
                          "autocast copies": kept_copies, "temporaries": dequant},
        "end of backward": {**base, "gradients": grads + ddp_buckets, "temporaries": embedding_grad},
        "optimizer step": {**base, "gradients": grads + ddp_buckets, "temporaries": step_tmp},
    }
    # Layer 0's backward, the last of the layers: every gradient but its own (and an untied embedding's)
    # is there, and with checkpointing layer 0 is rebuilt first; its backward's own temporaries (the
    # gradients of the MLP's intermediates and of the hidden states) come on top.
    layer0 = [t for t in trainable if t.name.startswith("model.layers.0.")]
    untied_embed = [t for t in trainable if t.role == "embed" and not shape.tied_embeddings]
    missing = sum(t.numel * grad_bytes(t) for t in layer0 + untied_embed) / (n if setup.grads_sharded else 1)
    backward_tmp = (2 * shape.intermediate_size * setup.act_bytes + 2 * h * 4) * tokens
    phases["backward of layer 0"] = {
        **base, "gradients": max(grads - missing, accumulated) + ddp_buckets,
        "activations": (h * setup.residual_bytes + per_layer) * tokens,
        "autocast copies": (2 * sum(t.numel for t in tensors if t.name.startswith("model.layers.0.") and t.role ==
                                    "linear") if setup.autocast and not setup.load_in_4bit else 0.0),
        "temporaries": dequant + backward_tmp}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    terms = {name: phases[peak_phase].get(name, 0.0) for name in TERMS}
    return Estimate(terms=terms, phases=totals, notes=notes, phase_terms=phases)


TERMS = ("weights", "gradients", "optimizer states", "activations", "loss", "autocast copies", "gathered weights",
         "temporaries")


def _step_temporaries(trainable: list[Tensor], setup: Setup) -> float:
    """Memory the optimizer step allocates and frees: none for fused AdamW and bitsandbytes; the
    largest tensor's worth for a per-tensor loop; all trainable values for torch's foreach on CUDA."""
    if not trainable:
        return 0.0
    fused = setup.optimizer == "adamw" and not setup.deepspeed and not setup.load_in_4bit
    if fused or setup.optimizer in ("adamw_8bit", "paged_adamw_8bit") or setup.offload_optimizer:
        return 0.0
    if setup.device == "cuda" and not setup.deepspeed:
        return sum(t.numel for t in trainable) * 4  # foreach: one full-size temporary list
    return 2 * max(t.numel for t in trainable) * 4


# --- reading the job ---------------------------------------------------------------------------------

class Topology(NamedTuple):
    num_processes: int
    sharding: str
    offload_optimizer: bool
    offload_params: bool
    source: str


def read_topology(config: JobConfig) -> Topology:
    """Processes and sharding from `launch.accelerate_config` (and `launch.num_processes`)."""
    path = config.launch.accelerate_config
    processes = config.launch.num_processes
    if not path:
        return Topology(processes, "ddp" if processes > 1 else "none", False, False, "launch.num_processes")
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"launch.accelerate_config: cannot read {path} ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"launch.accelerate_config: {path} is not an Accelerate config (a YAML mapping)")
    if processes <= 1:  # the file decides unless the job asks for more (launcher/run.py)
        processes = int(data.get("num_processes") or 1)
    kind = str(data.get("distributed_type", "NO")).upper()
    offload_optimizer = offload_params = False
    if kind == "DEEPSPEED":
        deepspeed = data.get("deepspeed_config") or {}
        stage = deepspeed.get("zero_stage")
        if deepspeed.get("deepspeed_config_file"):
            try:
                ds_file = json.loads(Path(deepspeed["deepspeed_config_file"]).read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ConfigError(f"launch.accelerate_config: cannot read deepspeed_config_file of {path} "
                                  f"({error})") from None
            zero = ds_file.get("zero_optimization", {})
            stage = zero.get("stage", stage)
            offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
            offload_params = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        else:
            offload_optimizer = str(deepspeed.get("offload_optimizer_device", "none")).lower() not in ("none", "")
            offload_params = str(deepspeed.get("offload_param_device", "none")).lower() not in ("none", "")
        sharding = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}.get(int(stage or 0), "zero2")
    elif kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        strategy = str(fsdp.get("fsdp_sharding_strategy", "")).upper()
        reshard = fsdp.get("fsdp_reshard_after_forward", True)
        if strategy in ("NO_SHARD", "3"):
            sharding = "ddp"
        elif strategy in ("SHARD_GRAD_OP", "2") or reshard is False or str(reshard).upper() == "SHARD_GRAD_OP":
            sharding = "zero2"  # weights stay gathered between forward and backward
        else:
            sharding = "fsdp"
        offload_params = offload_optimizer = bool(fsdp.get("fsdp_offload_params", False))
    else:
        sharding = "ddp" if processes > 1 else "none"
    if processes <= 1 and sharding != "none":
        sharding = "none" if sharding == "ddp" else sharding
    return Topology(processes, sharding, offload_optimizer, offload_params, path)


def resolve_loss(config: JobConfig, shape: ModelShape, sharding: str) -> tuple[str, str]:
    """("fused" or "logits", why) as `loop.loss.choose_loss_head` will decide, from the config alone."""
    wanted = config.hyperparams.loss
    if wanted == "logits":
        return "logits", 'hyperparams.loss = "logits"'
    problem = ""
    if not _torch_has_linear_cross_entropy():
        problem = "torch has no linear_cross_entropy (2.13 or newer has)"
    elif sharding in ("zero3", "fsdp"):
        problem = "the output layer is sharded (ZeRO-3 / FSDP)"
    elif config.lora.enabled and ({"lm_head"} & set(config.lora.modules_to_save) or (
            not isinstance(config.lora.target_modules, str) and "lm_head" in config.lora.target_modules)):
        problem = "the output layer is wrapped by LoRA (modules_to_save or target_modules)"
    elif shape.logits_changed:
        problem = f"the model {shape.logits_changed} after the output layer"
    if problem:
        return "logits", problem
    return "fused", f'hyperparams.loss = "{wanted}"'


def _torch_has_linear_cross_entropy() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(x) for x in re.findall(r"\d+", version("torch"))[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (2, 13)


def setup_from_job(config: JobConfig, shape: ModelShape, topology: Topology, *, device: str = "cuda",
                   num_processes: int | None = None) -> Setup:
    """The `Setup` of a job on `num_processes` processes (default: the job's)."""
    h, m, lora = config.hyperparams, config.model, config.lora
    processes = num_processes or topology.num_processes
    sharding = topology.sharding
    if processes > 1 and sharding == "none":
        sharding = "ddp"
    if processes == 1 and sharding == "ddp":
        sharding = "none"
    loss, _ = resolve_loss(config, shape, sharding)
    targets = DECODER_LINEARS if lora.target_modules == "all-linear" else tuple(
        [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules)
    weight_dtype = m.dtype if m.dtype in DTYPE_BYTES else "float32"  # "auto" loads float32 (loop/model.py)
    return Setup(
        micro_batch=h.batch_size, seq_len=config.data.max_length, gradient_accumulation=h.gradient_accumulation,
        num_processes=processes, sharding=sharding, offload_optimizer=topology.offload_optimizer,
        offload_params=topology.offload_params, precision=h.fp_precision, weight_dtype=weight_dtype,
        lora=lora.enabled, lora_r=lora.r, lora_targets=targets, lora_dropout=lora.dropout,
        modules_to_save=tuple(lora.modules_to_save), load_in_4bit=m.load_in_4bit and lora.enabled,
        optimizer=h.optimizer, loss=loss, gradient_checkpointing=m.gradient_checkpointing,
        attn_implementation=m.attn_implementation,
        attention_mask=not config.runs_sdpa_per_example() if config.data.packing else h.batch_size > 1,
        device=device)


def load_shape(model_path: str, trust_remote_code: bool = False) -> tuple[ModelShape, list[Tensor] | None]:
    """The model's shape from its config.json, and its tensors from the safetensors headers when the
    model is a local folder that has them. Loads no weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.model_path: cannot read the config of {model_path!r} ({first}); the plan needs "
                          "config.json (a local folder, or a hub model that is cached)") from None
    shape = ModelShape.from_config(config, name=Path(model_path).name or model_path)
    tensors = checkpoint_tensors(model_path) if Path(model_path).is_dir() else None
    return shape, tensors


# --- the plan ---------------------------------------------------------------------------------------

def parse_memory(text: str) -> int:
    """Bytes of "80GB", "80 GiB", "141G", "24000MB" or "80" (GB). GB are binary here (an "80 GB" GPU
    has 80 GiB)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 141GB or 24GiB")
    number, unit = float(match.group(1)), match.group(2) or "G"
    return int(number * 2 ** (10 * "KMGT".index(unit) + 10))


@dataclass
class Plan:
    """A job's memory plan on `num_processes` devices of `device_bytes` each."""

    shape: ModelShape
    setup: Setup
    estimate: Estimate
    device_bytes: int
    device_source: str
    num_parameters: int
    count_source: str
    global_batch: int
    largest_micro_batch: int
    """The largest micro-batch that fits (0: not even one row)."""
    micro_batch: int
    """The largest that fits and divides the global batch per process (0: none)."""
    accumulation: int
    alternatives: dict[str, float]
    """Peak at the job's micro-batch with one setting changed."""
    loss_reason: str
    topology_source: str
    warnings: list[str] = field(default_factory=list)

    @property
    def usable_bytes(self) -> float:
        if self.setup.device != "cuda":
            return float(self.device_bytes)
        return GPU_USABLE_SHARE * self.device_bytes - GPU_RESERVED_BYTES

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.usable_bytes


def plan_for(shape: ModelShape, setup: Setup, device_bytes: int, *, tensors: list[Tensor] | None = None,
             global_batch: int | None = None) -> tuple[int, int, int]:
    """(largest micro-batch that fits, the largest of those that divides the global batch per process,
    the accumulation for it). Activations and the loss grow with the micro-batch; nothing else does."""
    usable = GPU_USABLE_SHARE * device_bytes - GPU_RESERVED_BYTES if setup.device == "cuda" else device_bytes

    def fits(micro_batch: int) -> bool:
        return estimate(shape, replace(setup, micro_batch=micro_batch), tensors).peak <= usable

    largest = 0
    if fits(1):
        low, high = 1, 2
        while fits(high) and high < 2**20:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        largest = low
    if global_batch is None:
        global_batch = setup.micro_batch * setup.gradient_accumulation * setup.num_processes
    per_process = global_batch // setup.num_processes
    divisors = [m for m in range(1, min(largest, per_process) + 1) if per_process % m == 0]
    micro = max(divisors, default=0)
    return largest, micro, (per_process // micro if micro else 0)


def plan_job(config: JobConfig, *, gpus: int | None = None, gpu_memory: str | None = None,
             device: str = "cuda") -> Plan:
    """The memory plan of a job on `gpus` devices (default: the job's processes) of `gpu_memory`
    (default: this machine's first GPU, else 80 GB)."""
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus {gpus}: expected 1 or more")
    shape, tensors = load_shape(config.model.model_path, config.model.trust_remote_code)
    warnings = []
    if tensors is not None:
        count_source = "the safetensors headers"
        vocab = {t.shape[0] for t in tensors if t.role == "embed"}
        if vocab and vocab != {shape.vocab_size}:
            warnings.append(f"the checkpoint's embedding has {vocab.pop():,} rows, the config says "
                            f"{shape.vocab_size:,}; the plan uses the checkpoint's tensors")
    else:
        count_source = "config.json"
    topology = read_topology(config)
    job_processes = topology.num_processes
    setup = setup_from_job(config, shape, topology, device=device, num_processes=gpus)
    if gpu_memory:
        device_bytes, device_source = parse_memory(gpu_memory), "--gpu-memory"
    else:
        device_bytes, device_source = _this_gpu_memory()
    global_batch = config.hyperparams.batch_size * config.hyperparams.gradient_accumulation * job_processes
    per_process = global_batch // setup.num_processes
    if global_batch % setup.num_processes or not per_process:
        per_process = max(per_process, 1)
        warnings.append(f"the job's global batch of {global_batch} does not divide over {setup.num_processes} "
                        f"processes; the plan keeps {per_process * setup.num_processes}")
        global_batch = per_process * setup.num_processes
    used = tensors if tensors is not None else shape.tensors()
    # The job's micro-batch (or the largest below it that divides the batch per process), with the
    # accumulation that keeps the global batch on these processes.
    micro = max(m for m in range(1, min(setup.micro_batch, per_process) + 1) if per_process % m == 0)
    if micro != setup.micro_batch:
        warnings.append(f"hyperparams.batch_size = {setup.micro_batch} does not divide the {per_process} examples "
                        f"per process and step; the table is for micro-batch {micro}")
    setup = replace(setup, micro_batch=micro, gradient_accumulation=per_process // micro)
    result = estimate(shape, setup, used)
    largest, micro, accumulation = plan_for(shape, setup, device_bytes, tensors=used, global_batch=global_batch)
    alternatives = {}
    for label, change in (("gradient checkpointing on", {"gradient_checkpointing": True}),
                          ("gradient checkpointing off", {"gradient_checkpointing": False}),
                          ("fused loss", {"loss": "fused"}), ("logits loss", {"loss": "logits"})):
        changed = replace(setup, **change)
        if changed != setup and not (change.get("loss") == "fused" and setup.loss == "logits"
                                     and setup.sharding in ("zero3", "fsdp")):
            alternatives[label] = estimate(shape, changed, used).peak
    _, loss_reason = resolve_loss(config, shape, setup.sharding)
    return Plan(shape=shape, setup=setup, estimate=result, device_bytes=device_bytes, device_source=device_source,
                num_parameters=sum(t.numel for t in used), count_source=count_source, global_batch=global_batch,
                largest_micro_batch=largest, micro_batch=micro, accumulation=accumulation,
                alternatives=alternatives, loss_reason=loss_reason, topology_source=topology.source,
                warnings=warnings)


def _this_gpu_memory() -> tuple[int, str]:
    try:
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            return properties.total_memory, f"this machine's {properties.name}"
    except ImportError:  # pragma: no cover
        pass
    return 80 * GiB, "assumed (no GPU here; give --gpu-memory)"


def _count(value: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _gib(value: float) -> str:
    return f"{value / GiB:,.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as text: model, setup, the terms at the peak, the largest micro-batch, what-ifs."""
    s, e = plan.setup, plan.estimate
    lines = [
        f"Memory plan: {plan.shape.name}, {_count(plan.num_parameters)} parameters (counted from "
        f"{plan.count_source})",
        f"  model: {plan.shape.describe()}",
        f"  setup: {s.describe()}",
        f"  loss: {s.loss} ({plan.loss_reason}); topology from {plan.topology_source}",
        f"  batch: micro-batch {s.micro_batch} x {s.seq_len:,} tokens, accumulation {s.gradient_accumulation}, "
        f"{s.num_processes} process(es): global batch {plan.global_batch}",
        f"  device: {s.num_processes} x {plan.device_bytes / GiB:.0f} GiB ({plan.device_source}); usable "
        f"{plan.usable_bytes / GiB:.1f} GiB"
        + (" (10% and 1 GiB kept for the CUDA context, workspaces and fragmentation)" if s.device == "cuda" else ""),
        "",
        f"Per device at micro-batch {s.micro_batch} ({s.tokens:,} tokens), peak during the {e.peak_phase}:",
        "",
        "| term | GiB | counted as |",
        "| --- | ---: | --- |",
    ]
    for name, value in e.terms.items():
        if value or name in ("weights", "gradients", "optimizer states", "activations", "loss"):
            lines.append(f"| {name} | {_gib(value)} | {e.notes.get(name, '')} |")
    lines.append(f"| **peak** | **{_gib(e.peak)}** | {'fits' if plan.fits else 'does NOT fit'} in "
                 f"{plan.usable_bytes / GiB:.1f} GiB |")
    lines += ["", "Phases of a step (GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in e.phases.items())]
    if plan.alternatives:
        lines.append("What if (peak, GiB): " + ", ".join(f"{k} {_gib(v)}" for k, v in plan.alternatives.items()))
    lines.append("")
    if plan.largest_micro_batch == 0:
        lines.append("Not even a micro-batch of 1 fits: try gradient checkpointing, LoRA or QLoRA, ZeRO-3 or FSDP "
                     "(launch.accelerate_config), more GPUs, or a shorter data.max_length.")
    else:
        lines.append(f"Largest micro-batch that fits: {plan.largest_micro_batch}.")
        if plan.micro_batch:
            lines.append(f"Keeping the global batch of {plan.global_batch} on {s.num_processes} process(es): "
                         f"hyperparams.batch_size = {plan.micro_batch}, hyperparams.gradient_accumulation = "
                         f"{plan.accumulation}.")
    for warning in plan.warnings:
        lines.append(f"note: {warning}")
    return "\n".join(lines)


# --- the reference table of docs/memory.md -----------------------------------------------------------

# Published config.json values (hidden, layers, heads, kv heads, head dim, intermediate, vocabulary, tied).
PUBLISHED_MODELS = {
    "Qwen3-0.6B": ModelShape(1024, 28, 16, 8, 128, 3072, 151936, True, qk_norm=True, name="Qwen3-0.6B"),
    "Qwen3-8B": ModelShape(4096, 36, 32, 8, 128, 12288, 151936, False, qk_norm=True, name="Qwen3-8B"),
    "Llama-3.1-8B": ModelShape(4096, 32, 32, 8, 128, 14336, 128256, False, name="Llama-3.1-8B"),
    "Llama-3.1-70B": ModelShape(8192, 80, 64, 8, 128, 28672, 128256, False, name="Llama-3.1-70B"),
}
REFERENCE_SETUP = Setup(micro_batch=1, seq_len=2048, precision="bf16", optimizer="adamw", loss="fused",
                        gradient_checkpointing=True)  # packed rows: SDPA per example, no mask


def reference_table(device_bytes: int = 80 * GiB) -> str:
    """The table of docs/memory.md: the published models on 1 and 8 GPUs of `device_bytes`."""
    methods = {"full": {}, "LoRA r16": {"lora": True},
               "LoRA r16, bf16 weights": {"lora": True, "weight_dtype": "bfloat16"},
               "QLoRA r16": {"lora": True, "load_in_4bit": True}}
    lines = ["| model | method | GPUs | weights | gradients | optimizer | activations | loss | peak | peak, logits "
             "loss | peak, no checkpointing | largest micro-batch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, shape in PUBLISHED_MODELS.items():
        for method, change in methods.items():
            for gpus in (1, 8):
                sharding = "none" if gpus == 1 else ("ddp" if method.startswith("QLoRA") else "zero3")
                setup = replace(REFERENCE_SETUP, num_processes=gpus, sharding=sharding, **change)
                if sharding == "zero3":
                    setup = replace(setup, loss="logits")  # the output layer is sharded: no fused loss
                result = estimate(shape, setup)
                logits = estimate(shape, replace(setup, loss="logits")).peak
                no_checkpointing = estimate(shape, replace(setup, gradient_checkpointing=False)).peak
                largest, _, _ = plan_for(shape, setup, device_bytes, global_batch=gpus * 2**20)
                where = {"none": "1", "zero3": f"{gpus}, ZeRO-3", "ddp": f"{gpus}, DDP"}[sharding]
                cells = [_gib(result.largest(term)) for term in ("weights", "gradients", "optimizer states",
                                                                 "activations", "loss")]
                lines.append(f"| {name} | {method} | {where} | {' | '.join(cells)} | {_gib(result.peak)} | "
                             f"{_gib(logits)} | {_gib(no_checkpointing)} | {largest or 'does not fit'} |")
    return "\n".join(lines)


def main_plan(job_path: str, gpus: int | None, gpu_memory: str | None, overrides: dict) -> int:
    """`python -m launcher plan`: print the plan; 0 if the job's micro-batch fits, 1 if not.

    The job is read without checking that its data files exist (a plan comes before the data)."""
    from launcher.config import load_config

    config = load_config(job_path, overrides=overrides or None, check_environment=False)
    plan = plan_job(config, gpus=gpus, gpu_memory=gpu_memory)
    print(format_plan(plan))
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    print(reference_table())  # the table of docs/memory.md
