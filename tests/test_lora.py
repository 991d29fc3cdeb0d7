"""LoRA and QLoRA: which weights train, checkpointing gradients, the adapter and merged final model,
and training runs that resume exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import gradients, random_batch, read_metrics
from loop.model import ModelLoadError, build_model, count_parameters, save_final_model

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
        "hyperparams.fp_precision": "fp32"}
QLORA = {**LORA, "model.load_in_4bit": True}


def perturb_adapters(model, seed: int = 1) -> None:
    """lora_B starts at zero (the adapter is a no-op); give it values as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


# --- which weights train ---------------------------------------------------------------------------

def test_all_linear_adapts_every_projection_but_not_the_tied_head(tmp_path, make_job, tiny_tokenizer):
    model = build_model(make_job(tmp_path, **LORA), tiny_tokenizer)
    base = model.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear  # peft leaves the output head out of all-linear
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    for layer in base.model.layers:
        for name in LINEAR:
            module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
            assert hasattr(module, "lora_A"), name
            assert module.scaling["default"] == 8 / 4
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    # r * (in + out) per adapted linear layer
    expected = sum(4 * (m.in_features + m.out_features) for n, m in base.named_modules()
                   if n.endswith(LINEAR) and hasattr(m, "in_features"))
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == expected + sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_a_list_of_target_modules_and_modules_to_save(tmp_path, make_job, tiny_tokenizer):
    config = make_job(tmp_path, **{**LORA, "lora.target_modules": ["q_proj", "v_proj"],
                                   "lora.modules_to_save": ["lm_head"], "lora.dropout": 0.1})
    model = build_model(config, tiny_tokenizer)
    base = model.get_base_model()
    attention = base.model.layers[0].self_attn
    assert hasattr(attention.q_proj, "lora_A") and hasattr(attention.v_proj, "lora_A")
    assert not hasattr(attention.k_proj, "lora_A") and not hasattr(base.model.layers[0].mlp.up_proj, "lora_A")
    assert attention.q_proj.lora_dropout["default"].p == 0.1
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in name for name in trained)
    assert all("lora_" in name or "modules_to_save" in name for name in trained)


def test_an_unknown_target_module_names_the_key(tmp_path, make_job, tiny_tokenizer):
    config = make_job(tmp_path, **LORA, **{"lora.target_modules": ["query"]})
    with pytest.raises(ModelLoadError, match=r"lora.target_modules.*q_proj"):
        build_model(config, tiny_tokenizer)


# --- gradient checkpointing under LoRA -------------------------------------------------------------

def test_checkpointing_gives_the_same_lora_gradients_without_input_grad_hooks(tmp_path, make_job, tiny_tokenizer):
    """Non-reentrant checkpointing needs no inputs that require grad (the frozen embedding's output).

    transformers registers such a hook anyway; removing it shows the gradients do not depend on it.
    """
    torch.manual_seed(0)
    plain = build_model(make_job(tmp_path / "a", **LORA), tiny_tokenizer)
    torch.manual_seed(0)
    checkpointed = build_model(make_job(tmp_path / "b", **LORA, **{"model.gradient_checkpointing": True}),
                               tiny_tokenizer)
    for model in (plain, checkpointed):
        perturb_adapters(model)
    inputs = random_batch(len(tiny_tokenizer))
    expected = gradients(plain, inputs)
    with_hook = gradients(checkpointed, inputs)
    checkpointed.get_base_model().disable_input_require_grads()
    without_hook = gradients(checkpointed, inputs)
    assert len(expected) == 2 * 2 * len(LINEAR)
    for name in expected:
        assert float(expected[name].abs().max()) > 0, name
        torch.testing.assert_close(with_hook[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(without_hook[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


# --- the final model -------------------------------------------------------------------------------

def save_final(config, model, tokenizer):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model)
    return save_final_model(accelerator, prepared, tokenizer, config.output_path, config=config)


def test_lora_final_is_the_adapter_and_merged_matches_base_plus_adapter(tmp_path, make_job, tiny_model_dir,
                                                                        tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_job(tmp_path, **LORA, **{"output.merge_lora": True})
    model = build_model(config, tiny_tokenizer)
    perturb_adapters(model)
    inputs = random_batch(len(tiny_tokenizer))
    trained = logits(model, inputs)
    final = save_final(config, model, tiny_tokenizer)

    assert final == config.output_path / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    assert not (config.output_path / ".tmp-final").exists()
    adapter_config = json.loads((final / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir) and adapter_config["r"] == 4
    assert all("lora_" in key for key in load_file(final / "adapter_model.safetensors"))

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    torch.testing.assert_close(logits(adapted, inputs), trained, rtol=0, atol=1e-6)

    merged_dir = final / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(merged).__name__ == "Qwen3ForCausalLM" and merged.config.use_cache
    assert not any("lora" in key for key in load_file(merged_dir / "model.safetensors"))
    assert (merged_dir / "tokenizer.json").exists()
    torch.testing.assert_close(logits(merged, inputs), trained, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), inputs), trained,
                              atol=1e-3)  # the adapter changed something


def test_transformers_loads_the_adapter_folder_with_its_base(tmp_path, make_job, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    config = make_job(tmp_path, **LORA)
    model = build_model(config, tiny_tokenizer)
    perturb_adapters(model)
    inputs = random_batch(len(tiny_tokenizer))
    trained = logits(model, inputs)
    final = save_final(config, model, tiny_tokenizer)
    assert not (final / "merged").exists()  # only with output.merge_lora
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(final), inputs), trained,
                               rtol=0, atol=1e-6)


def test_qlora_merges_into_a_float_copy_of_the_base(tmp_path, make_job, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_job(tmp_path, **QLORA, **{"output.merge_lora": True})
    model = build_model(config, tiny_tokenizer)
    perturb_adapters(model)
    final = save_final(config, model, tiny_tokenizer)
    assert all("lora_" in key for key in load_file(final / "adapter_model.safetensors"))

    inputs = random_batch(len(tiny_tokenizer))
    float_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = logits(PeftModel.from_pretrained(float_base, final), inputs)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not getattr(merged, "is_loaded_in_4bit", False) and "quantization_config" not in merged.config.to_dict()
    assert merged.dtype == torch.float32  # fp_precision fp32
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=1e-5)


# --- training runs ---------------------------------------------------------------------------------

RUN = {"hyperparams.max_steps": 4, "hyperparams.save_steps": 2, "hyperparams.save_total_limit": 10,
       "hyperparams.learning_rate": 1e-2, "hyperparams.warmup_steps": 0, "hyperparams.batch_size": 2,
       "data.max_length": 128, "environment.logging_steps": 1}


def losses(output_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(output_dir)]


def interrupt_after_step_2(output_dir) -> None:
    """Leave the folder as a run killed right after its step-2 checkpoint would."""
    for path in (output_dir / "checkpoints").iterdir():
        if path.name != "step_000002":
            shutil.rmtree(path)
    shutil.rmtree(output_dir / "final")


@pytest.mark.parametrize("settings", [LORA, {**QLORA, "model.gradient_checkpointing": True}],
                         ids=["lora", "qlora-checkpointing"])
def test_adapter_training_learns_and_resumes_exactly(tmp_path, make_job, settings):
    from loop.train import train

    config = make_job(tmp_path, **settings, **RUN)
    first = train(config)
    assert first.success, first.error
    output_dir = config.output_path
    run_losses = losses(output_dir)
    assert len(run_losses) == 4 and run_losses[-1] < run_losses[0]
    adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    # Checkpoints of a 4-bit model leave the 4-bit weights out (they are rebuilt from model_path).
    saved = load_file(output_dir / "checkpoints" / "step_000002" / "model.safetensors")
    assert any("lora_" in key for key in saved)
    if settings.get("model.load_in_4bit"):
        assert not any("absmax" in key for key in saved)

    interrupt_after_step_2(output_dir)
    resumed = train(config)
    assert resumed.success, resumed.error
    assert resumed.summary["resumed_from"].endswith("step_000002")
    assert losses(output_dir) == run_losses
    resumed_adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    for key in adapter:
        assert torch.equal(resumed_adapter[key], adapter[key]), key


def test_a_training_run_writes_the_merged_model(tmp_path, make_job, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loop.train import train

    config = make_job(tmp_path, **{**LORA, **RUN, "output.merge_lora": True, "hyperparams.max_steps": 2,
                                   "hyperparams.save_steps": 0})
    result = train(config)
    assert result.success, result.error
    final = config.output_path / "final"
    inputs = random_batch(AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size)
    expected = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final), inputs)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(final / "merged"), inputs), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
@pytest.mark.filterwarnings("ignore:Input and output embeddings are no longer tied")
def test_a_trained_copy_of_the_tied_head_survives_the_merge(tmp_path, make_job, tiny_model_dir, tiny_tokenizer):
    """`modules_to_save = ["lm_head"]` on tied embeddings trains a separate head; merged keeps it (untied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_job(tmp_path, **{**LORA, "lora.modules_to_save": ["lm_head"], "output.merge_lora": True})
    model = build_model(config, tiny_tokenizer)
    perturb_adapters(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    inputs = random_batch(len(tiny_tokenizer))
    trained = logits(model, inputs)
    final = save_final(config, model, tiny_tokenizer)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    torch.testing.assert_close(logits(adapted, inputs), trained, rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(logits(merged, inputs), trained, rtol=0, atol=1e-5)
