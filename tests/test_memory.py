"""Memory savers (issue #17): the fused loss equals the logits path, the memory-light optimizers resume
exactly, and compiled layers train like eager ones.

    pytest tests/test_memory.py -q
"""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import ROUNDING_SAFE_ADAM, assert_same_weights, final_weights, read_metrics, run_cli, small_job

# Adam with a near-zero epsilon turns rounding noise in tiny gradients into full-size updates (see
# helpers.ROUNDING_SAFE_ADAM): two exact paths that add in another order stay within rounding with this one.
STEPS = {"hyperparams.max_steps": 5, "hyperparams.lr_scheduler": "constant", **ROUNDING_SAFE_ADAM}


def train_job(folder, model_dir, capsys, **dotted) -> tuple[list[float], dict, dict]:
    """(per-step losses, final weights, result summary) of a run of `small_job` with `dotted`."""
    from helpers import read_json_if_present

    job = small_job(folder, model_dir, **{**STEPS, **dotted})
    code, out, err = run_cli(["run", job], capsys)
    assert code == 0, (out + err)[-3000:]
    output = folder / "out"
    losses = [r["loss"] for r in read_metrics(output)]
    weights = final_weights(output) if (output / "final" / "model.safetensors").exists() else {}  # {} for adapters
    return losses, weights, read_json_if_present(output / "result.json")["summary"]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


# --- the fused loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    pytest.param({}, id="plain"),
    pytest.param({"data.packing": True}, id="packed"),
    pytest.param({"hyperparams.batch_size": 1, "hyperparams.gradient_accumulation": 4}, id="accumulation"),
])
def test_the_fused_loss_equals_the_logits_path(tmp_path, tiny_model_dir, capsys, variant):
    logits = train_job(tmp_path / "logits", tiny_model_dir, capsys, **{"hyperparams.loss": "logits", **variant})
    fused = train_job(tmp_path / "fused", tiny_model_dir, capsys, **{"hyperparams.loss": "fused", **variant})
    assert logits[2]["loss"] == "logits" and fused[2]["loss"] == "fused"
    assert_close(fused[0], logits[0], rel=1e-5)
    assert_same_weights(fused[1], logits[1], rel=1e-4)


def test_evaluation_uses_the_fused_loss_too(tmp_path, tiny_model_dir, capsys):
    from helpers import chat_records

    extra = {"monitoring.validation_split": 0.25, "hyperparams.eval_steps": 2}
    records = chat_records(16)
    logits = train_job(tmp_path / "logits", tiny_model_dir, capsys, **{"hyperparams.loss": "logits", **extra})
    fused = train_job(tmp_path / "fused", tiny_model_dir, capsys, **{"hyperparams.loss": "fused", **extra})
    assert records and logits[2]["eval_loss"] is not None
    assert abs(fused[2]["eval_loss"] - logits[2]["eval_loss"]) <= 1e-5 * logits[2]["eval_loss"]


def test_auto_takes_the_fused_path_where_exact_and_says_why_not_elsewhere(tmp_path, tiny_model_dir, capsys, caplog):
    assert train_job(tmp_path / "auto", tiny_model_dir, capsys)[2]["loss"] == "fused"
    # A trained output layer wrapped by peft's modules_to_save: the fused path would miss the wrapper.
    summary = train_job(tmp_path / "lora", tiny_model_dir, capsys, **{
        "lora.enabled": True, "lora.modules_to_save": ["lm_head"], "hyperparams.loss": "fused"})[2]
    assert summary["loss"] == "logits"
    assert "not exact for this job" in caplog.text and "not a plain nn.Linear" in caplog.text


def test_bf16_mixed_precision_takes_the_fused_path(tmp_path, tiny_model_dir, capsys):
    # The probe once compared bf16 logits with an fp32 matmul and never matched: under bf16, the
    # recipe of most GPU jobs, "auto" and "fused" silently took the logits path.
    bf16 = {"hyperparams.fp_precision": "bf16"}
    logits = train_job(tmp_path / "logits", tiny_model_dir, capsys, **{"hyperparams.loss": "logits", **bf16})
    fused = train_job(tmp_path / "fused", tiny_model_dir, capsys, **bf16)
    assert fused[2]["loss"] == "fused"
    assert_close(fused[0], logits[0], rel=2e-2)  # the logits path rounds its logits to bf16, the fused one not


def test_the_fused_loss_over_several_chunks_equals_the_logits_path(tiny_model_dir):
    """2,500 tokens make three chunks of the fused loss (the runs above fit in one): the same row sums
    and the same gradients as the model's own logits, with padding and a prompt masked out."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from loop.loss import FUSED_CHUNK_ROWS, summed_token_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 1250), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :300] = -100  # a prompt
    labels[1, 1000:] = -100  # padding
    attention_mask = (labels != -100) | (torch.arange(1250) < 1000)
    batch = {"input_ids": ids, "attention_mask": attention_mask.long(), "labels": labels}
    assert ids.numel() > 2 * FUSED_CHUNK_ROWS

    results = []
    for head in (None, model.get_output_embeddings()):
        model.zero_grad(set_to_none=True)
        losses, counts = summed_token_loss(model, batch, head)
        (losses.sum() / counts.sum()).backward()
        results.append((losses.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_losses, logits_counts, logits_grads), (fused_losses, fused_counts, fused_grads) = results
    assert torch.equal(fused_counts, logits_counts)
    torch.testing.assert_close(fused_losses, logits_losses, rtol=1e-5, atol=0)
    for name, grad in logits_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_model_that_soft_caps_its_logits_keeps_the_logits_path(tmp_path, tiny_model_dir):
    """The probe forward notices what happens after the output layer (Gemma 2's soft-capping)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    from helpers import job_config
    from loop.loss import choose_loss_head
    from loop.train import build_accelerator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=30.0))
    config = job_config(tiny_model_dir, tmp_path / "out", **{"hyperparams.loss": "fused"})
    accelerator = build_accelerator(config)
    head, reason = choose_loss_head(gemma, config, accelerator)
    assert head is None and "soft-capping" in reason
    gemma.config.final_logit_softcapping = None
    head, _ = choose_loss_head(gemma, config, accelerator)
    assert head is gemma.lm_head


@pytest.mark.slow
def test_the_fused_loss_with_two_processes_equals_the_logits_path(tmp_path, tiny_model_dir, capsys):
    two = {"launch.num_processes": 2, "hyperparams.batch_size": 1}
    logits = train_job(tmp_path / "logits", tiny_model_dir, capsys, **{"hyperparams.loss": "logits", **two})
    fused = train_job(tmp_path / "fused", tiny_model_dir, capsys, **{"hyperparams.loss": "fused", **two})
    assert fused[2]["world_size"] == 2 and fused[2]["loss"] == "fused"
    assert_close(fused[0], logits[0], rel=1e-5)
    assert_same_weights(fused[1], logits[1], rel=1e-4)


# --- optimizers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit", "adafactor"])
def test_each_optimizer_resumes_exactly(tmp_path, tiny_model_dir, capsys, optimizer):
    pytest.importorskip("bitsandbytes") if "8bit" in optimizer else None
    settings = {"hyperparams.optimizer": optimizer, "hyperparams.max_steps": 6, "hyperparams.save_steps": 3,
                "hyperparams.save_total_limit": 5, "hyperparams.lr_scheduler": "cosine"}
    whole = train_job(tmp_path / "whole", tiny_model_dir, capsys, **settings)
    parted = tmp_path / "parted"
    train_job(parted, tiny_model_dir, capsys, **settings)
    # As if killed after step 3: the later checkpoint, the result and the final model are gone.
    shutil.rmtree(parted / "out" / "checkpoints" / "step_000006")
    shutil.rmtree(parted / "out" / "final")
    (parted / "out" / "result.json").unlink()
    resumed = train_job(parted, tiny_model_dir, capsys, **settings)
    assert resumed[2]["resumed_from"].endswith("step_000003")
    assert resumed[0] == whole[0]  # every step's loss, bit for bit
    assert_same_weights(resumed[1], whole[1], rel=0.0)
    # The optimizer really is the one asked for: its state differs from AdamW's two fp32 moments.
    state = torch.load(parted / "out" / "checkpoints" / "step_000006" / "optimizer.bin", weights_only=True)
    names = set().union(*(s.keys() for s in state["state"].values()))
    assert not {"exp_avg", "exp_avg_sq"} & names, names


# --- compile --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("variant", [pytest.param({}, id="plain"),
                                     pytest.param({"data.packing": True}, id="packed")])  # SDPA per example
def test_compiled_layers_train_like_eager_ones(tmp_path, tiny_model_dir, capsys, caplog, variant):
    eager = train_job(tmp_path / "eager", tiny_model_dir, capsys, **{"hyperparams.max_steps": 3, **variant})
    compiled = train_job(tmp_path / "compiled", tiny_model_dir, capsys,
                         **{"hyperparams.max_steps": 3, "model.compile": True, **variant})
    assert "layers compiled on first use" in caplog.text
    assert_close(compiled[0], eager[0], rel=1e-4)
    assert_same_weights(compiled[1], eager[1], rel=1e-3)
