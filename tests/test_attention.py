"""Packed SDPA (`loop/attention.py`): on packed rows every family that runs SDPA computes the same loss
and gradients as transformers' masked SDPA while attending only within each example; a sliding window
shorter than an example keeps the mask; generation and saved models are untouched; a packed run
under `auto` trains like one under transformers' sdpa and under eager attention.

    pytest tests/test_attention.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import chat_records, read_metrics, run_cli, small_job
from launcher.demo import ARCHITECTURES, build_tiny_model
from loop.attention import PACKED_SDPA, use_packed_sdpa
from loop.data.batches import NUM_REAL_TOKENS, Collator

WINDOW = 16  # launcher.demo's sliding window for mistral, gemma2 and gemma3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), architecture=arch)
        return built[arch]

    return get


def packed_batch(lengths: list[list[int]], seed: int = 0) -> dict:
    """Rows of random examples of the given lengths, packed as `loop.data.prepare.pack` packs them
    (positions restart at 0 per example), padded to the longest row, with their boundaries."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        ids = torch.randint(5, 400, (sum(row),), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in row for p in range(n)]})
    batch = Collator(pad_token_id=0, sequence_boundaries=True)(rows)
    del batch[NUM_REAL_TOKENS]
    return batch


def load(folder, packed: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    switched = use_packed_sdpa(model) if packed else False
    model.train()
    return model, switched


def loss_and_gradients(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def attention_work(model, batch) -> int:
    """Query x key positions SDPA is called on in one forward: what attention computes."""
    from torch.profiler import profile

    with profile(record_shapes=True) as trace, torch.no_grad():
        model(**batch)
    calls = [e.input_shapes for e in trace.events() if e.name == "aten::scaled_dot_product_attention"]
    return sum(math.prod(query[:-1]) * key[-2] for query, key, *_ in calls)  # (..., queries, dim), (..., keys, dim)


ROWS = [[37, 80, 12, 61], [150, 9, 20]]  # two rows of 190 and 179 tokens: the second padded by 11


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_sdpa_trains_like_masked_sdpa(arch, model_dir):
    batch = packed_batch(ROWS)
    masked, _ = load(model_dir(arch), packed=False)
    packed, switched = load(model_dir(arch), packed=True)
    # Every family transformers runs with sdpa switches (Gemma 2's soft-capping keeps eager).
    assert switched == (masked.config._attn_implementation == "sdpa"), masked.config._attn_implementation
    (loss, grads), (packed_loss, packed_grads) = loss_and_gradients(masked, batch), loss_and_gradients(packed, batch)
    assert torch.isclose(packed_loss, loss, rtol=1e-6), (packed_loss, loss)
    assert (packed_grads - grads).abs().max() <= 1e-5 * grads.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "qwen3_moe"])
def test_packed_sdpa_attends_only_within_each_example(arch, model_dir):
    batch = packed_batch(ROWS)
    masked, _ = load(model_dir(arch), packed=False)
    packed, _ = load(model_dir(arch), packed=True)
    heads, layers, width = masked.config.num_attention_heads, masked.config.num_hidden_layers, batch["input_ids"].shape[1]
    assert attention_work(masked, batch) == layers * heads * len(ROWS) * width ** 2
    # Each example with itself, and each row's padding (positions restarting at 0) with itself.
    examples = [n ** 2 for row in ROWS for n in row] + [(width - sum(row)) ** 2 for row in ROWS if sum(row) < width]
    assert attention_work(packed, batch) == layers * heads * sum(examples)


def test_a_sliding_window_shorter_than_an_example_keeps_the_mask(model_dir):
    """Mistral's window (16 in the tiny model) never cuts an example of 16 tokens or fewer, so those
    rows attend per example; one longer example sends the whole batch through the windowed mask."""
    short, long = packed_batch([[16, 5, 11, 16]]), packed_batch([[16, 5, 60, 16]])
    for batch, is_per_example in ((short, True), (long, False)):
        masked, _ = load(model_dir("mistral"), packed=False)
        packed, switched = load(model_dir("mistral"), packed=True)
        assert switched
        work = attention_work(packed, batch)
        assert (work < attention_work(masked, batch)) is is_per_example
        (loss, grads), (packed_loss, packed_grads) = loss_and_gradients(masked, batch), \
            loss_and_gradients(packed, batch)
        assert torch.isclose(packed_loss, loss, rtol=1e-6)
        assert (packed_grads - grads).abs().max() <= 1e-5 * grads.abs().max()
        if not is_per_example:  # and the window is the model's: a plain causal mask would differ
            assert not torch.isclose(loss, plain_causal_loss(model_dir("mistral"), batch), rtol=1e-5)


def plain_causal_loss(folder, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.sliding_window = None
    model.config.use_cache = False
    with torch.no_grad():
        return model(**batch).loss


def test_generation_and_the_saved_model_are_plain_sdpa(model_dir, tmp_path, tiny_tokenizer):
    """Without boundaries (left-padded prompts, a KV cache) it is transformers' sdpa, and the saved
    config names no attention, so the folder loads anywhere."""
    import json

    from transformers import AutoModelForCausalLM

    folder = model_dir("qwen3")
    packed, switched = load(folder, packed=True)
    assert switched and packed.config._attn_implementation == PACKED_SDPA
    plain, _ = load(folder, packed=False)
    prompts = tiny_tokenizer(["What is the capital of France?", "Hi"], return_tensors="pt", padding=True,
                             padding_side="left")
    outputs = []
    for model in (packed, plain):
        model.eval()
        outputs.append(model.generate(**prompts, max_new_tokens=8, do_sample=False, use_cache=True,
                                      pad_token_id=tiny_tokenizer.pad_token_id))
    assert torch.equal(outputs[0], outputs[1])

    packed.save_pretrained(tmp_path / "saved")
    assert PACKED_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == "sdpa" and json.loads((tmp_path / "saved" / "config.json")
                                                                          .read_text())["model_type"] == "qwen3"


@pytest.mark.parametrize("extra", [pytest.param({}, id="plain"),
                                   pytest.param({"model.gradient_checkpointing": True}, id="checkpointing")])
def test_a_packed_run_trains_like_one_under_masked_attention(tmp_path, tiny_model_dir, capsys, caplog, extra):
    """`auto` runs SDPA per example; `sdpa` named is transformers' own under a block-causal mask, and
    eager builds its own mask: independent references for the whole loop, two rows a micro-batch."""
    import logging

    losses = {}
    for attention in ("auto", "sdpa", "eager"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loop.model"):
            job = small_job(tmp_path / attention, tiny_model_dir, chat_records(24), **{
                "data.packing": True, "data.max_length": 96, "model.attn_implementation": attention,
                "hyperparams.max_steps": 3, **extra})
            code, out, err = run_cli(["run", job], capsys)
        assert code == 0, (out + err)[-3000:]
        assert ("once per packed example" in caplog.text) is (attention == "auto")
        losses[attention] = [r["loss"] for r in read_metrics(tmp_path / attention / "out")]
    assert len(losses["auto"]) == 3
    for masked in ("sdpa", "eager"):
        for ours, theirs in zip(losses["auto"], losses[masked]):
            assert abs(ours - theirs) <= 1e-5 * abs(theirs), losses


STRICT_FORWARD = """
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               labels=labels)
"""


def test_a_model_folders_own_forward_gets_no_boundaries(tmp_path, tiny_model_dir, capsys, caplog, monkeypatch):
    """A trusted model folder's code may take only the arguments it names: a packed `auto` run keeps
    transformers' masked attention for it, and never passes the boundaries its forward would refuse."""
    import logging
    import sys

    import transformers.dynamic_module_utils as dynamic_modules

    from helpers import model_with_remote_code

    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "transformers_modules", raising=False)
    model_dir = model_with_remote_code(tiny_model_dir, tmp_path / "model", tmp_path / "ran", body=STRICT_FORWARD)
    try:
        with caplog.at_level(logging.INFO, logger="loop.model"):
            job = small_job(tmp_path / "job", model_dir, chat_records(24), **{
                "data.packing": True, "data.max_length": 96, "model.trust_remote_code": True,
                "hyperparams.max_steps": 2})
            code, out, err = run_cli(["run", job], capsys)
    finally:
        for name in [name for name in sys.modules if name.startswith("transformers_modules.")]:
            del sys.modules[name]
    assert (tmp_path / "ran").exists()  # the folder's own class trained
    assert code == 0, (out + err)[-3000:]
    assert "once per packed example" not in caplog.text
    assert len(read_metrics(tmp_path / "job" / "out")) == 2
