"""Batches for the loop: a padding collator and an epoch-seeded sampler.

    loader = build_dataloader(data.train, config, tokenizer, shuffle=True)
    loader.sampler.set_epoch(epoch)      # Accelerate also calls it through the prepared loader
    for batch in loader: ...             # input_ids, labels, attention_mask | position_ids (packed)

The sampler gives every process the same order for the same (seed, epoch); Accelerate shards the
batches after `accelerator.prepare(loader)`, so nothing here knows about ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from loop.data.render import IGNORE_INDEX


NUM_REAL_TOKENS = "num_real_tokens"  # a batch key the model is not called with


class Collator:
    """Right-pads a list of examples to the longest (rounded up to `pad_to_multiple_of`).

    Unpacked examples get an `attention_mask`. Packed rows (with `position_ids`) get none: the
    padding becomes one more short sequence whose positions restart at 0, which transformers
    masks off like any other packed sequence, and its labels are ignored. So that throughput counts
    only real tokens, packed batches carry `num_real_tokens` (per row), which is not a model input.

    `sequence_boundaries`: packed batches also carry the sequence boundaries of the flattened batch
    (`cu_seq_lens_q/k`, `max_length_q/k`), which transformers passes to the attention call: flash
    attention's varlen kernel, or SDPA once per example (`loop/attention.py`). Without them flash
    attention reads packing from `position_ids` only when the batch has a single row; with more rows
    the examples of a row would attend to each other.

    Packed rows need the model called with `use_cache=False` (or `model.config.use_cache = False`):
    transformers only reads packed sequences from `position_ids` when no KV cache is passed, and
    models create one whenever `use_cache` is on, even in training mode. With a cache, the examples
    of a row silently attend to each other.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 0, sequence_boundaries: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sequence_boundaries = sequence_boundaries

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in examples[0]
        batch = {
            "input_ids": _padded([e["input_ids"] for e in examples], width, self.pad_token_id),
            "labels": _padded([e["labels"] for e in examples], width, IGNORE_INDEX),
        }
        if packed:
            batch["position_ids"] = _padded([e["position_ids"] for e in examples], width, None)
            batch[NUM_REAL_TOKENS] = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
            if self.sequence_boundaries:
                batch.update(_sequence_boundaries(batch["position_ids"]))
        else:
            batch["attention_mask"] = _padded([[1] * len(e["input_ids"]) for e in examples], width, 0)
        return batch


def _padded(rows: Sequence[Sequence[int]], width: int, value: int | None) -> torch.Tensor:
    """A (len(rows), width) LongTensor; `value=None` pads with positions 0, 1, 2, ..."""
    out = torch.zeros((len(rows), width), dtype=torch.long) if value is None \
        else torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        if value is None:
            out[i, len(row):] = torch.arange(width - len(row))
    return out


def _sequence_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """Flash attention's varlen arguments for the flattened batch: every sequence (row padding too)
    starts where its positions restart at 0, and every row starts one."""
    flat = position_ids.reshape(-1)
    starts = torch.cat([(flat == 0).nonzero().view(-1), torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int(starts.diff().max())  # an int: a tensor here would cost a device sync in every layer
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": longest, "max_length_k": longest}


class EpochSampler(Sampler[int]):
    """Example order for one epoch, the same for the same (seed, epoch) on every process.

    `shuffle`: a random permutation per epoch, else file order. `lengths` (with shuffle): group
    examples of similar length, like transformers' LengthGroupedSampler: the permutation is cut into
    mega-batches of `megabatch_batches` batches, each sorted longest first, and the longest example
    goes first so that an out-of-memory shows at the first step.
    """

    def __init__(self, num_examples: int, *, seed: int, shuffle: bool = True,
                 lengths: Sequence[int] | None = None, batch_size: int = 1, megabatch_batches: int = 50):
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.lengths = np.asarray(lengths) if lengths is not None else None
        self.batch_size = batch_size
        self.megabatch_size = batch_size * megabatch_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        # A local generator keyed by (seed, epoch): no global RNG state is read or changed.
        permutation = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        if self.lengths is None:
            return permutation
        return self._grouped_by_length(permutation)

    def _grouped_by_length(self, permutation: np.ndarray) -> np.ndarray:
        megabatches = [permutation[i:i + self.megabatch_size]
                       for i in range(0, len(permutation), self.megabatch_size)]
        # Stable sort on the negated lengths: longest first, ties in shuffled order.
        megabatches = [m[np.argsort(-self.lengths[m], kind="stable")] for m in megabatches]
        order = np.concatenate(megabatches) if megabatches else permutation
        if len(order):
            longest = int(np.argmax(self.lengths[order]))
            order[[0, longest]] = order[[longest, 0]]
        return order


def example_lengths(dataset) -> list[int]:
    """Tokens per row of a `datasets.Dataset` (read from Arrow, not row by row) or a list of dicts."""
    try:
        import pyarrow.compute as pc

        column = dataset.select_columns(["input_ids"]).with_format("arrow")[:].column("input_ids")
        return np.asarray(pc.list_value_length(column)).tolist()
    except AttributeError:
        return [len(row["input_ids"]) for row in dataset]


def count_trained_tokens(dataset, batch_size: int = 8192) -> int:
    """Labels that are not `IGNORE_INDEX` in a `datasets.Dataset`, a batch of rows at a time (a whole
    column of a large data set would not fit in memory)."""
    import pyarrow.compute as pc

    total = 0
    for table in dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=batch_size):
        values = pc.list_flatten(table.column("labels"))
        total += len(values) - pc.sum(pc.equal(values, IGNORE_INDEX)).as_py() if len(values) else 0
    return total


def build_dataloader(dataset, config, tokenizer, shuffle: bool = True, batch_size: int | None = None) -> DataLoader:
    """A DataLoader over `dataset` for `config`; `shuffle=False` (e.g. evaluation) keeps file order.

    Shuffling also needs `data.shuffle`; `data.group_by_length` groups similar lengths when shuffling.
    """
    data = config.data
    batch_size = batch_size or config.hyperparams.batch_size
    is_shuffled = shuffle and data.shuffle
    lengths = example_lengths(dataset) if is_shuffled and data.group_by_length else None
    sampler = EpochSampler(len(dataset), seed=config.hyperparams.seed, shuffle=is_shuffled,
                           lengths=lengths, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      collate_fn=Collator(tokenizer.pad_token_id, data.pad_to_multiple_of,
                                          sequence_boundaries=sends_sequence_boundaries(config)),
                      num_workers=0)


def sends_sequence_boundaries(config) -> bool:
    """Packed batches carry their examples' boundaries for flash attention's varlen kernel and for
    SDPA once per example."""
    return config.model.attn_implementation.startswith("flash_attention") or config.runs_sdpa_per_example()
