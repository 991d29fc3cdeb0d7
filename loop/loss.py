"""The training loss: per-row sums of token cross-entropy over the supervised tokens.

    head, reason = choose_loss_head(model, config, accelerator)   # once, at setup
    row_losses, row_tokens = summed_token_loss(model, batch, head)

Two paths compute the same sums:

- `logits`: the model's own forward gives the (rows, tokens, vocabulary) logits, cast to fp32, then
  cross-entropy. At a 151,936-token vocabulary and 2,048 tokens that is 1.2 GB per row before its
  gradient: on a GPU it, not the weights, caps batch size and context length.
- `fused`: the output layer is skipped during the forward (it returns its input, the last hidden
  states), and `torch.nn.functional.linear_cross_entropy` computes the loss from the hidden states
  of the supervised positions only and the output layer's weight, in chunks of 1,024 tokens
  (`FUSED_CHUNK_ROWS`), never forming the full logits.

`hyperparams.loss = "auto"` takes the fused path where it is exact: the output layer is a plain
`nn.Linear` (not wrapped by LoRA or `modules_to_save`, not 4-bit), it is not sharded (ZeRO-3,
FSDP), torch has `linear_cross_entropy`, and a probe forward shows the model's logits are exactly
the output layer applied to the hidden states (no soft-capping or scaling after it, as Gemma 2/3,
Cohere and Granite apply). Otherwise, and with `loss = "logits"`, the logits path.

A Mixture-of-Experts model whose config sets `output_router_logits` (Mixtral, Qwen3-MoE, ...) also
returns its router load-balancing loss from the same forward, on either path (it comes from the
router logits, not the output layer): `TokenLoss.aux_loss`, which the loop adds with the model's
`router_aux_loss_coef` (`router_aux_coef`), as the model's own loss would.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from loop.data import IGNORE_INDEX
from loop.data.batches import NUM_REAL_TOKENS

logger = logging.getLogger(__name__)


class TokenLoss(tuple):
    """`(row_losses, row_tokens)`, plus `aux_loss`: the router auxiliary loss of the same forward (a
    scalar tensor, before its coefficient), or None for a model that computes none."""

    def __new__(cls, row_losses: torch.Tensor, row_tokens: torch.Tensor, aux_loss: torch.Tensor | None = None):
        pair = super().__new__(cls, (row_losses, row_tokens))
        pair.aux_loss = aux_loss
        return pair


def summed_token_loss(model, batch: dict, head: torch.nn.Linear | None = None) -> TokenLoss:
    """(sum of per-token cross-entropy over supervised tokens, per row; supervised tokens per row),
    with the router auxiliary loss of the forward as `.aux_loss`.

    `head`: the output layer for the fused path (from `choose_loss_head`), or None for the logits path.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", NUM_REAL_TOKENS)}
    # Position t predicts label t+1; the last position predicts nothing. Shifting the labels instead
    # of slicing the outputs keeps them contiguous, so flattening them copies nothing.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    if head is None:
        logits, aux_loss = _forward(model, inputs)
        logits = logits.float()  # rebinding frees a half-precision original under autocast
        losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
    else:
        with _returning_hidden_states(head):
            hidden, aux_loss = _forward(model, inputs)  # the output layer passed its input through
        # Only the supervised positions go through the output layer: prompts, padding and the last
        # position of each row cost no logits (on a GPU, picking them waits for the forward's kernels).
        supervised = targets.reshape(-1) != IGNORE_INDEX
        hidden = hidden.reshape(-1, hidden.size(-1))[supervised]
        weight = head.weight.to(hidden.dtype)  # the autocast dtype, as the logits path's matmul
        bias = head.bias.to(hidden.dtype) if head.bias is not None else None
        token_losses = F.linear_cross_entropy(hidden, weight, targets.reshape(-1)[supervised], linear_bias=bias,
                                              reduction="none", options=_chunked())
        losses = torch.zeros(supervised.shape, dtype=torch.float32, device=supervised.device)
        losses = losses.masked_scatter(supervised, token_losses.float())
    return TokenLoss(losses.view(targets.shape).sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1), aux_loss)


def _forward(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(what the output layer returned, the router auxiliary loss in fp32 or None) of one forward.

    The model computes the auxiliary loss when its config sets `output_router_logits`, the
    default for the call. The rest of the output is dropped here, not held through the loss.
    """
    outputs = model(**inputs)
    aux_loss = getattr(outputs, "aux_loss", None)
    return outputs.logits, aux_loss.float() if isinstance(aux_loss, torch.Tensor) else None


def router_aux_coef(model) -> float | None:
    """The coefficient the model's own loss gives its router auxiliary loss, or None when it adds
    none (a dense model, or an MoE model whose config leaves `output_router_logits` off).

    `model`: unwrapped from DDP/DeepSpeed (`accelerator.unwrap_model`); a peft model reads its base's config.
    """
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0))


def choose_loss_head(model, config, accelerator) -> tuple[torch.nn.Linear | None, str]:
    """(the output layer for the fused path or None for the logits path, why) for this job."""
    wanted = config.hyperparams.loss
    if wanted == "logits":
        return None, "hyperparams.loss = \"logits\""
    problem = _fused_problem(model, accelerator)
    if problem is None:
        return _output_layer(model, accelerator), "the output layer is exact to fuse (checked on a probe forward)"
    if wanted == "fused":
        logger.warning("hyperparams.loss = \"fused\" is not exact for this job (%s): using the logits path", problem)
    return None, problem


def _fused_problem(model, accelerator) -> str | None:
    """Why the fused path would not be exact here, or None."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no linear_cross_entropy (2.13 or newer has)"
    if accelerator.distributed_type.value in ("FSDP",) or _zero_stage(accelerator) == 3:
        return "the output layer is sharded (ZeRO-3 / FSDP)"
    head = _output_layer(model, accelerator)
    if head is None or type(head) is not torch.nn.Linear:
        name = type(head).__name__ if head is not None else "none"
        return f"the output layer is a {name}, not a plain nn.Linear (LoRA, modules_to_save or 4-bit)"
    config = getattr(accelerator.unwrap_model(model), "config", None)
    changed = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if changed or not _probe_matches(model, head, accelerator):
        return (f"the model changes its logits after the output layer (soft-capping or scaling"
                f"{': ' + ', '.join(changed) if changed else ''})")
    return None


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")
"""Config attributes of transformers models that transform the logits after the output layer
(Gemma 2/3, Cohere, Granite, ...). The probe forward catches them too, except where the logits of a
freshly initialised model are too small for soft-capping to show in 16-bit precision."""


def _output_layer(model, accelerator):
    base = accelerator.unwrap_model(model)
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    return base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def _probe_matches(model, head: torch.nn.Linear, accelerator) -> bool:
    """The model's logits equal the output layer applied to what it receives, on a short input.

    The output layer is applied again under the forward's own autocast (bf16/fp16 mixed precision
    wraps the prepared model's forward), so the two matmuls are the same and agree to the bit.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.arange(1, 9, device=accelerator.device).remainder(head.out_features).unsqueeze(0)
            logits = model(input_ids=ids).logits.float()
            with _returning_hidden_states(head):
                hidden = model(input_ids=ids).logits
            with accelerator.autocast():
                recomputed = F.linear(hidden, head.weight.to(hidden.dtype),
                                      head.bias.to(hidden.dtype) if head.bias is not None else None).float()
    finally:
        model.train(was_training)
    return logits.shape == recomputed.shape and torch.allclose(logits, recomputed, rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _returning_hidden_states(head: torch.nn.Linear):
    """The output layer returns its input for the duration: the forward still runs through every
    wrapper (DDP, autocast, peft), but no logits are formed."""
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        del head.forward


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


# Tokens per chunk of the fused loss. Each chunk forms (tokens x vocabulary) float32 logits, 0.6 GB
# at Qwen3's 151,936, and reads the whole output weight four times (its forward, and in backward the
# logits again and the two gradients: `reduction="none"` recomputes rather than keeps). torch's
# default chunk follows the weight's aspect ratio, about hidden x tokens / (2 x vocabulary) tokens:
# one token at hidden 64, so a small model's step took 5.7x the logits path's. 1,024 tokens keep
# every matmul compute-bound (a GPU needs a few hundred rows not to wait on reading the weight).
FUSED_CHUNK_ROWS = 1024


def _chunked():
    """The fused loss's chunking: FUSED_CHUNK_ROWS rows a chunk; torch picks the precision policy
    (float32 accumulation for 16-bit inputs) for the device and dtype."""
    return torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=FUSED_CHUNK_ROWS)
