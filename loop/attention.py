"""Packed rows under SDPA: each example attends only within itself, and only that is computed.

    use_packed_sdpa(model)      # build_model: data.packing, attn_implementation "auto", a model on sdpa

A packed row holds several examples whose `position_ids` restart at 0. Transformers then builds a
block-causal mask over the whole row, and SDPA computes every query against every key of the row
before masking most of them away: for 1,024-token rows of typical chat examples about 85% of the
attention work is discarded, and with a mask SDPA cannot take its flash kernel on a GPU. Flash
attention's varlen kernel skips that work; `packed_sdpa_attention` does the same with SDPA alone,
calling it once per example with `is_causal=True` on the boundaries the collator already hands to
flash attention (`cu_seq_lens_q`, over the flattened batch; `loop/data/batches.py`).

It is registered with transformers' `AttentionInterface` as `sdpa_packed`, so it is the model's own
attention call, not a patch; every forward without boundaries (unpacked evaluation, sample
generation with a KV cache) and every layer whose mask is more than block-causal (sliding windows
shorter than an example, attention sinks, position biases, non-causal layers) goes to transformers'
`sdpa` unchanged. tests/test_attention.py proves the loss and gradients equal the masked SDPA of
every family in `launcher.demo.ARCHITECTURES` that runs SDPA.
"""

from __future__ import annotations

import torch

PACKED_SDPA = "sdpa_packed"
# Layer types whose masks are block-causal once packed (a sliding window is checked per call).
CAUSAL_LAYER_TYPES = {"full_attention", "sliding_attention"}

_spans_of: tuple = (None, [])  # (the last boundaries tensor, its spans): one host read per forward, not per layer


def use_packed_sdpa(model) -> bool:
    """Switch `model` from transformers' `sdpa` to `sdpa_packed` where that is exact; True if switched.

    Models whose config asks for more than a causal mask per layer (chunked attention, layer types
    other than full and sliding) keep `sdpa`; so do models that cannot change attention after loading."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if config._attn_implementation != "sdpa" or not layer_types <= CAUSAL_LAYER_TYPES \
            or getattr(config, "attention_chunk_size", None) or not model._can_set_attn_implementation():
        return False
    _register()
    model.set_attn_implementation(PACKED_SDPA)
    return config._attn_implementation == PACKED_SDPA


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Transformers' attention signature: `query` (rows, heads, tokens, dim), `key`/`value` (rows,
    kv heads, tokens, dim); returns ((rows, tokens, heads, value dim), None) like its `sdpa`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[2] != key.shape[2] or not _is_block_causal(module, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, width, _ = query.shape
    # (1, heads, rows x tokens, dim): the boundaries index the flattened batch, every row starting a
    # sequence. Four dimensions, so that SDPA takes its flash kernel on CPU too (three go to the math path).
    q, k, v = (t.transpose(1, 2).reshape(1, rows * width, t.shape[1], t.shape[3]).transpose(1, 2)
               for t in (query, key, value))
    is_gqa = q.shape[1] != k.shape[1]
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], dropout_p=dropout, is_causal=True,
        scale=scaling, enable_gqa=is_gqa) for start, end in _spans(bounds)], dim=2)
    return out.transpose(1, 2).reshape(rows, width, heads, v.shape[-1]), None


def _is_block_causal(module, kwargs) -> bool:
    """The layer's packed mask is exactly "causal within each example"."""
    if not getattr(module, "is_causal", True) or kwargs.get("s_aux") is not None or getattr(module, "sinks", None) \
            is not None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return False
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if not window:
        return True
    longest = kwargs.get("max_length_q")
    return longest is not None and longest <= window  # such a window never cuts an example short


def _spans(bounds: torch.Tensor) -> list[tuple[int, int]]:
    global _spans_of
    cached, spans = _spans_of
    if cached is not bounds:  # every layer of a forward (and its recomputation) gets the same tensor
        edges = bounds.tolist()
        spans = [(start, end) for start, end in zip(edges[:-1], edges[1:]) if end > start]
        _spans_of = (bounds, spans)
    return spans


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, torch.compiler.disable(packed_sdpa_attention))
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the fallbacks need sdpa's own mask
