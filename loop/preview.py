"""Sample generations during training: a quick look at what the current weights say.

    from loop.preview import generate_previews, preview_prompts
    prompt_ids = preview_prompts(config, data.validation, tokenizer)      # once, before the loop
    ...
    if config.monitoring.preview_steps and step % config.monitoring.preview_steps == 0:
        samples = generate_previews(model, tokenizer, prompt_ids, config.monitoring.preview_max_new_tokens,
                                    accelerator)                           # on every process
        # -> [{"prompt": ..., "completion": ...}] on the main process

Prompts are token-id lists ready for `generate`: configured prompts are rendered through the
tokenizer's chat template with the generation prompt appended, so a preview sees exactly what
inference sees; without configured prompts, the first validation rows are cut just before their
last trained span (the last assistant reply), which needs no access to the original records.

Decoding is greedy, so previews of two runs with the same weights are comparable, and the training
run is left exactly as it was: modes, `use_cache` and every RNG state are restored afterwards.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

from launcher.config import JobConfig
from loop.data.render import IGNORE_INDEX
from profiles import fill_system_prompt

logger = logging.getLogger(__name__)


def preview_prompts(config: JobConfig, validation: Iterable[dict] | None, tokenizer) -> list[list[int]]:
    """Prompt token ids for previews.

    From `monitoring.preview_prompts` (each a user message, after `profile.system_prompt` as the system
    message when set), rendered with the chat template and its generation prompt. When none are
    configured, from the first `monitoring.preview_num_prompts` rows of `validation` (tokenized rows
    with `input_ids` and `labels`, a `datasets.Dataset` or a list): each row's `input_ids` up to the
    start of its last trained span (in a packed row, from the start of that span's example, where
    `position_ids` restart at 0). Rows with nothing before that span (everything trained, as with
    the `text` profile) are skipped, so the list may be shorter or empty.
    """
    monitoring = config.monitoring
    if monitoring.preview_prompts:
        system = fill_system_prompt(config.profile.system_prompt)
        prompts = []
        for text in monitoring.preview_prompts:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
            prompts.append(list(rendered["input_ids"]))
        return prompts

    prompts = []
    for row in validation if validation is not None else []:
        prompt = _prompt_before_last_trained_span(row["input_ids"], row["labels"], row.get("position_ids"))
        if prompt:
            prompts.append(prompt)
        if len(prompts) == monitoring.preview_num_prompts:
            break
    return prompts


def _prompt_before_last_trained_span(input_ids, labels, position_ids=None) -> list[int]:
    """`input_ids` before the last run of supervised labels (labels are aligned with input_ids)."""
    input_ids, labels = [int(i) for i in input_ids], [int(label) for label in labels]
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:  # skip untrained tokens after the span
        end -= 1
    if end == 0:
        return []
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    first = 0
    if position_ids is not None:  # packed: the examples before this one are not part of its prompt
        positions = [int(p) for p in position_ids]
        first = max((i for i in range(start + 1) if positions[i] == 0), default=0)
    return input_ids[first:start]


def generate_previews(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                      accelerator) -> list[dict[str, Any]]:
    """Greedy completions of `prompt_ids` with the current weights: [{"prompt", "completion"}].

    Call it on every process. Under DeepSpeed ZeRO-3 the weights are sharded, so every process takes
    part (`synced_gpus`) and every process gets the samples; under FSDP previews are skipped with a
    warning; otherwise only the main process generates and the others return [] at once. The prompt
    is decoded with its special tokens (what the model saw), the completion without them.
    """
    if not prompt_ids:
        return []
    sharding = _sharding(accelerator)
    if sharding == "fsdp":
        # The unwrapped FSDP module holds only this rank's shards; generating from it would need
        # every rank inside FSDP's own forward, which `generate` on the unwrapped model bypasses.
        logger.warning("sample generations are skipped under FSDP (monitoring.preview_steps is ignored)")
        return []
    if sharding is None and not accelerator.is_main_process:
        return []

    unwrapped = accelerator.unwrap_model(model)
    was_training, had_cache = model.training, unwrapped.config.use_cache
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    samples = []
    # Greedy decoding draws no random numbers, but a model's forward may (dropout in a custom model
    # that ignores eval mode); forking the RNGs guarantees the next training step sees the same state.
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        model.eval()
        unwrapped.config.use_cache = True  # training turns the KV cache off; generation needs it
        try:
            for ids in prompt_ids:
                # One prompt at a time: no padding to get wrong, and previews are few and short.
                input_ids = torch.tensor([ids], dtype=torch.long, device=accelerator.device)
                output = unwrapped.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                    pad_token_id=_pad_token_id(tokenizer),
                    synced_gpus=sharding == "zero3" and accelerator.num_processes > 1)
                new_tokens = output[0, input_ids.shape[1]:].tolist()
                samples.append({"prompt": tokenizer.decode(ids, skip_special_tokens=False),
                                "completion": tokenizer.decode(new_tokens, skip_special_tokens=True)})
        finally:
            unwrapped.config.use_cache = had_cache
            model.train(was_training)
    return samples


def _sharding(accelerator) -> str | None:
    """"zero3", "fsdp" or None: whether the weights are split over processes."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return "zero3"
    return None


def _pad_token_id(tokenizer) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
