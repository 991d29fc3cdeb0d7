"""Loading the model: dtype, attention, pad token, cache, embeddings, gradient checkpointing, 4-bit
(QLoRA) loading, parameter counts, and the errors for what cannot be loaded."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from helpers import gradients, job_config, model_with_remote_code, random_batch
from loop.model import (
    ModelLoadError,
    build_model,
    count_parameters,
    enable_gradient_checkpointing,
    register_checkpoint_hooks,
)


def is_checkpointing(model) -> bool:
    # transformers 5.x renamed the property (the old name warns).
    return getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


# --- loading ---------------------------------------------------------------------------------------

def test_full_model_trains_every_weight_with_the_cache_off(tmp_path, tiny_model_dir, tiny_tokenizer):
    model = build_model(job_config(tiny_model_dir, tmp_path / "out"), tiny_tokenizer)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.use_cache is False
    assert all(p.dtype == torch.float32 for p in model.parameters())  # "auto": fp32 master weights
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    assert not is_checkpointing(model)


def test_dtype_and_attention_implementation_are_passed_through(tmp_path, tiny_model_dir, tiny_tokenizer):
    model = build_model(job_config(tiny_model_dir, tmp_path / "out", **{"model.dtype": "bfloat16",
                                                          "model.attn_implementation": "eager"}), tiny_tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    default = build_model(job_config(tiny_model_dir, tmp_path / "out"), tiny_tokenizer)
    assert default.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("trusted", [False, True])
def test_a_model_folders_own_code_runs_only_when_trusted(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch,
                                                         trusted):
    """config.json may name Python files of the folder (`auto_map`); `model.trust_remote_code` decides."""
    import transformers.dynamic_module_utils as dynamic_modules

    # transformers copies remote code into its modules cache and imports it from there: a private one.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "transformers_modules", raising=False)
    ran = tmp_path / "remote-code-ran"
    model_dir = model_with_remote_code(tiny_model_dir, tmp_path / "model", ran)
    try:
        config = job_config(model_dir, tmp_path / "out", **{"model.trust_remote_code": trusted})
        model = build_model(config, tiny_tokenizer)
    finally:
        for name in [name for name in sys.modules if name.startswith("transformers_modules.")]:
            del sys.modules[name]
    assert ran.exists() == trusted
    assert type(model).__name__ == ("CustomModel" if trusted else "Qwen3ForCausalLM")


def test_pad_token_of_the_model_follows_the_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token  # as load_tokenizer does for a tokenizer without one
    model = build_model(job_config(tiny_model_dir, tmp_path / "out"), tiny_tokenizer)
    assert model.config.pad_token_id == tiny_tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tiny_tokenizer.eos_token_id


def test_embeddings_grow_to_a_larger_tokenizer(tmp_path, tiny_model_dir, tiny_tokenizer):
    before = len(tiny_tokenizer)
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|think|>"]})
    model = build_model(job_config(tiny_model_dir, tmp_path / "out"), tiny_tokenizer)
    assert model.get_input_embeddings().num_embeddings == before + 2 == len(tiny_tokenizer)


# --- errors ----------------------------------------------------------------------------------------

def test_a_missing_local_folder_is_a_clear_error(tmp_path, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(ModelLoadError, match="model.model_path.*no such local folder"):
        build_model(job_config(tmp_path / "nowhere", tmp_path / "out"), tiny_tokenizer)


def test_an_unreachable_hub_id_fails_at_once_offline(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = job_config(tiny_model_dir, tmp_path / "out", **{"model.model_path": "nonexistent-org/nonexistent-model"})
    assert config.model.model_path == "nonexistent-org/nonexistent-model"  # kept as a hub id
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        build_model(config, tiny_tokenizer)
    assert time.monotonic() - started < 10  # no network retries
    message = str(error.value)
    assert "model.model_path" in message and "nonexistent-org/nonexistent-model" in message
    assert "must be a local folder" in message and "hub must be reachable" in message


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_without_its_package_or_cuda_suggests_sdpa(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                    implementation):
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash attention can run here")
    config = job_config(tiny_model_dir, tmp_path / "out", **{"model.attn_implementation": implementation})
    with pytest.raises(ModelLoadError, match=r"model.attn_implementation.*sdpa"):
        build_model(config, tiny_tokenizer)


def test_missing_peft_names_the_key_and_the_extra(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # find_spec and import both see "not installed"
    with pytest.raises(ModelLoadError, match=r"lora.enabled.*pip install 'trainer-engine\[lora\]'"):
        build_model(job_config(tiny_model_dir, tmp_path / "out", **{"lora.enabled": True}), tiny_tokenizer)


def test_missing_bitsandbytes_names_the_key_and_the_extra(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    config = job_config(tiny_model_dir, tmp_path / "out", **{"lora.enabled": True, "model.load_in_4bit": True})
    with pytest.raises(ModelLoadError, match=r"model.load_in_4bit.*pip install 'trainer-engine\[qlora\]'"):
        build_model(config, tiny_tokenizer)


# --- gradient checkpointing ------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_gradients_in_full_fine_tuning(tmp_path, tiny_model_dir,
                                                                            tiny_tokenizer):
    plain = build_model(job_config(tiny_model_dir, tmp_path / "out"), tiny_tokenizer)
    checkpointed = build_model(job_config(tiny_model_dir, tmp_path / "out", **{"model.gradient_checkpointing": True}),
                               tiny_tokenizer)
    assert is_checkpointing(checkpointed) and not is_checkpointing(plain)
    inputs = random_batch(len(tiny_tokenizer))
    expected, actual = gradients(plain, inputs), gradients(checkpointed, inputs)
    assert expected.keys() == actual.keys() == {name for name, _ in plain.named_parameters()}  # every weight
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_recomputes_the_layers(tiny_model_dir):
    """The flag is not just set: the decoder layers run again in backward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enable_gradient_checkpointing(model)
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
    model.train()
    model(**random_batch(model.config.vocab_size)).loss.backward()
    assert len(calls) == 2


# --- 4-bit loading (QLoRA) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qlora_config(tmp_path_factory, tiny_model_dir):
    return job_config(tiny_model_dir, tmp_path_factory.mktemp("qlora") / "out",
               **{"model.load_in_4bit": True, "lora.enabled": True, "lora.r": 4, "lora.dropout": 0.0})


def test_4bit_base_is_nf4_with_double_quantisation_and_only_adapters_train(qlora_config, tiny_model_dir,
                                                                          tiny_tokenizer):
    from bitsandbytes.nn import Linear4bit

    model = build_model(qlora_config, tiny_tokenizer)
    base = model.get_base_model()
    assert base.is_loaded_in_4bit
    q_proj = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantisation
    assert q_proj.compute_dtype == torch.float32  # from hyperparams.fp_precision = "fp32"
    assert str(q_proj.weight.device) == "cpu"
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    # Counts are of values, not of packed bytes: the same total as the unquantised model plus adapters.
    full = build_model(job_config(tiny_model_dir, qlora_config.output_path.parent / "out",
                           **{"lora.enabled": True, "lora.r": 4}), tiny_tokenizer)
    assert count_parameters(model) == count_parameters(full)
    model(**random_batch(len(tiny_tokenizer))).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_4bit_compute_dtype_follows_bf16(tmp_path, tiny_model_dir, tiny_tokenizer):
    config = job_config(tiny_model_dir, tmp_path / "out", **{"model.load_in_4bit": True, "lora.enabled": True,
                                              "hyperparams.fp_precision": "bf16"})
    layer = build_model(config, tiny_tokenizer).get_base_model().model.layers[0].mlp.up_proj.base_layer
    assert layer.compute_dtype == torch.bfloat16


def test_4bit_with_checkpointing_matches_4bit_without(qlora_config, tiny_model_dir, tiny_tokenizer):
    import dataclasses

    checkpointed_config = dataclasses.replace(
        qlora_config, model=dataclasses.replace(qlora_config.model, gradient_checkpointing=True))
    torch.manual_seed(0)
    plain = build_model(qlora_config, tiny_tokenizer)
    torch.manual_seed(0)
    checkpointed = build_model(checkpointed_config, tiny_tokenizer)
    assert is_checkpointing(checkpointed.get_base_model())
    inputs = random_batch(len(tiny_tokenizer))
    # lora_B starts at zero, so give the adapters values to make every gradient non-trivial.
    for model in (plain, checkpointed):
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.constant_(p, 0.01)
    expected, actual = gradients(plain, inputs), gradients(checkpointed, inputs)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_4bit_loads_on_the_local_rank_device(tmp_path, tiny_model_dir, monkeypatch):
    from loop.model import _quantization_kwargs

    monkeypatch.setenv("LOCAL_RANK", "1")
    device_map = _quantization_kwargs(job_config(tiny_model_dir, tmp_path / "out"))["device_map"]
    assert device_map == ({"": 1} if torch.cuda.is_available() else {"": "cpu"})


def test_step_checkpoints_of_a_4bit_model_resume_exactly(tmp_path, qlora_config, tiny_tokenizer):
    """save_state/load_state round trip: the 4-bit weights are rebuilt from model_path, the rest restored."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    def setup():
        accelerator = Accelerator(cpu=True)
        register_checkpoint_hooks(accelerator)
        torch.manual_seed(0)
        model = build_model(qlora_config, tiny_tokenizer)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return accelerator, *accelerator.prepare(model, optimizer)

    inputs = random_batch(len(tiny_tokenizer))

    def step(accelerator, model, optimizer):
        loss = model(**inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    accelerator, model, optimizer = setup()
    model.train()
    step(accelerator, model, optimizer)
    model.eval()
    with torch.no_grad():  # an evaluation between steps must not change the 4-bit weights
        model(**inputs)
    model.train()
    accelerator.save_state(str(tmp_path / "checkpoint"))
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert not any("absmax" in key or "quant_state" in key for key in saved)  # no 4-bit weights stored
    expected = [step(accelerator, model, optimizer) for _ in range(2)]

    accelerator, model, optimizer = setup()  # a fresh process would start like this
    accelerator.load_state(str(tmp_path / "checkpoint"))
    model.train()
    assert [step(accelerator, model, optimizer) for _ in range(2)] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_4bit_base_on_cuda_sits_on_the_local_rank_gpu_and_trains(tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    config = job_config(tiny_model_dir, tmp_path / "out", **{"model.load_in_4bit": True, "lora.enabled": True,
                                              "model.gradient_checkpointing": True, "hyperparams.fp_precision": "bf16"})
    model = build_model(config, tiny_tokenizer)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    assert {p.device for p in model.parameters()} == {device}
    inputs = {k: v.to(device) for k, v in random_batch(len(tiny_tokenizer)).items()}
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
