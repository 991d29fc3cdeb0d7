"""The memory plan (`launcher/plan.py`): hand-checked terms, counts against published models and real
checkpoints, the job's topology, and a calibration against peaks measured on CPU.

    pytest tests/test_plan.py -q                    # about 2 minutes on 2 cores, most of it the calibration
    pytest tests/test_plan.py -q -m "not slow"      # the unit tests, seconds
    python tests/test_plan.py MODEL WARMUP SPECS     # the measuring process the calibration starts

Expected values are literals worked out by hand in the comments beside them, or references from
outside the plan: published parameter counts, the safetensors headers transformers writes, peft's own
count of trainable parameters, and resident memory measured while the product's own builders train.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.config import ConfigError
from launcher.plan import (GiB, PUBLISHED_MODELS, ModelShape, Setup, Tensor, checkpoint_tensors, estimate,
                           layer_activation_bytes, loss_bytes, optimizer_state_bytes, parse_memory, plan_for,
                           read_topology, reference_table, resolve_loss, setup_from_job)

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20

# A Llama-shaped model small enough to count by hand: hidden 64, 2 layers, 4 heads of 16 (2 kv heads),
# intermediate 128, vocabulary 512, tied embeddings (the shape ENVIRONMENT.md's tiny model has).
TINY = ModelShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                  vocab_size=512, tied_embeddings=True, name="tiny")
# Its parameters: embedding 512 x 64 = 32,768; per layer q 64x64 = 4,096, k and v 32x64 = 2,048 each,
# o 4,096, gate/up/down 3 x 128x64 = 24,576, two norms 128: 36,992; two layers 73,984; final norm 64.
TINY_PARAMETERS = 32_768 + 73_984 + 64  # 106,816 ("about 107K", ENVIRONMENT.md)
TINY_BYTES_FP32 = TINY_PARAMETERS * 4  # 427,264


def cpu(**changes) -> Setup:
    return replace(Setup(precision="fp32", device="cpu"), **changes)


# --- the model: counts against published figures and real checkpoints ------------------------------

def test_the_tiny_shape_counts_by_hand():
    assert TINY.num_parameters() == 106_816 == TINY_PARAMETERS


def test_the_llama_3_1_counts_are_the_published_ones():
    # Llama-3.1-8B: embedding and output 2 x 128,256 x 4,096 = 1,050,673,152; 32 layers of q, o 4,096^2,
    # k, v 4,096 x 1,024, MLP 3 x 4,096 x 14,336 and two norms = 218,112,000 each; final norm 4,096.
    assert PUBLISHED_MODELS["Llama-3.1-8B"].num_parameters() == 8_030_261_248
    # Llama-3.1-70B: 2 x 128,256 x 8,192 + 80 x 855,654,400 + 8,192.
    assert PUBLISHED_MODELS["Llama-3.1-70B"].num_parameters() == 70_553_706_496


def test_qwen3_counts_match_the_model_cards():
    """Qwen3's model cards give non-embedding parameters: 0.44B (0.6B) and 6.95B (8B)."""
    for name, non_embedding in (("Qwen3-0.6B", 0.44e9), ("Qwen3-8B", 6.95e9)):
        shape = PUBLISHED_MODELS[name]
        embeddings = sum(t.numel for t in shape.tensors() if t.role in ("embed", "head"))
        assert round((shape.num_parameters() - embeddings) / 1e7) == round(non_embedding / 1e7), name


@pytest.mark.parametrize("architecture, extra", [
    ("qwen3", {}), ("llama", {"tie_word_embeddings": False}), ("qwen2", {}), ("llama", {"attention_bias": True,
                                                                                      "mlp_bias": True}),
])
def test_the_config_formula_lists_the_tensors_transformers_saves(tmp_path, architecture, extra):
    """The tensors counted from config.json are the checkpoint's, name for name and shape for shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(architecture, vocab_size=300, hidden_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
                                  head_dim=12, tie_word_embeddings=extra.pop("tie_word_embeddings", True), **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    formula = sorted((t.name, t.shape) for t in ModelShape.from_config(AutoConfig.from_pretrained(tmp_path)).tensors())
    assert formula == [(t.name, t.shape) for t in checkpoint_tensors(tmp_path)]


def test_a_mixture_of_experts_is_refused_with_the_key_to_change():
    with pytest.raises(ConfigError, match="model.model_path: .*mixture of experts"):
        ModelShape.from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 128, "vocab_size": 512, "num_experts": 8})


# --- trainable values and optimizer states -----------------------------------------------------------

def test_lora_trains_the_values_peft_counts():
    # r 8 on every projection of TINY: q (64 -> 64) 8 x 128 = 1,024; k, v (64 -> 32) 8 x 96 = 768 each;
    # o 1,024; gate, up (64 -> 128) 8 x 192 = 1,536 each; down (128 -> 64) 1,536: 8,192 a layer, 16,384.
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.plan import trainable_tensors

    trainable, frozen = trainable_tensors(TINY.tensors(), cpu(lora=True, lora_r=8))
    assert sum(t.numel for t in trainable) == 16_384 and sum(t.numel for t in frozen) == TINY_PARAMETERS
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, head_dim=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_config(config),
                                peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == (16_384, TINY_PARAMETERS + 16_384)


MATRIX_AND_VECTOR = [Tensor("model.layers.0.mlp.up_proj.weight", (1000, 10), "linear"),
                     Tensor("model.norm.weight", (10,), "norm")]  # 10,010 values


@pytest.mark.parametrize("optimizer, expected", [
    ("adamw", 80_080),  # two float32 moments: 8 bytes x 10,010
    # 8-bit: the matrix (10,000 >= 4,096 values) 2 x (10,000 one-byte values + ceil(10,000 / 256) = 40
    # float32 scales) = 20,320; the vector (10 < 4,096) keeps 32-bit moments, 80: 20,400.
    ("adamw_8bit", 20_400),
    ("paged_adamw_8bit", 20_400),
    # Adafactor: a row (1,000) and a column (10) second moment for the matrix, a full one (10) for the
    # vector, float32: (1,010 + 10) x 4 = 4,080.
    ("adafactor", 4_080),
])
def test_optimizer_state_bytes(optimizer, expected):
    assert optimizer_state_bytes(MATRIX_AND_VECTOR, cpu(optimizer=optimizer)) == expected


def test_deepspeed_under_bf16_keeps_a_float32_master_copy():
    # bf16 weights, and in the optimizer a float32 copy and two float32 moments: 12 bytes x 10,010.
    setup = Setup(precision="bf16", sharding="zero2", num_processes=2)
    assert optimizer_state_bytes(MATRIX_AND_VECTOR, setup) == 120_120


def test_the_optimizer_states_match_what_torch_allocates():
    """The same tensors in torch: AdamW's and Adafactor's state after one step, byte for byte."""
    import torch

    for name, expected in (("adamw", 80_080), ("adafactor", 4_080)):
        params = [torch.nn.Parameter(torch.zeros(t.shape)) for t in MATRIX_AND_VECTOR]
        optimizer = (torch.optim.AdamW(params) if name == "adamw" else torch.optim.Adafactor(params))
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        held = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                   if torch.is_tensor(v) and v.dim() > 0)  # not the scalar step counters
        assert held == expected == optimizer_state_bytes(MATRIX_AND_VECTOR, cpu(optimizer=name))


# --- sharding -------------------------------------------------------------------------------------

def test_zero3_divides_weights_gradients_and_states_by_the_processes():
    one = estimate(TINY, cpu()).phase_terms["optimizer step"]
    assert one["weights"] == TINY_BYTES_FP32  # 427,264
    assert one["gradients"] == TINY_BYTES_FP32
    assert one["optimizer states"] == 2 * TINY_BYTES_FP32  # 854,528
    eight = estimate(TINY, cpu(sharding="zero3", num_processes=8)).phase_terms["optimizer step"]
    assert eight["weights"] == 53_408  # 427,264 / 8
    assert eight["gradients"] == 53_408
    assert eight["optimizer states"] == 106_816  # 854,528 / 8


def test_zero2_shards_gradients_and_states_not_weights_and_ddp_keeps_a_bucket_copy():
    zero2 = estimate(TINY, cpu(sharding="zero2", num_processes=4)).phase_terms["optimizer step"]
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer states"]) == (427_264, 106_816, 213_632)
    ddp = estimate(TINY, cpu(sharding="ddp", num_processes=4)).phase_terms["optimizer step"]
    assert (ddp["weights"], ddp["gradients"], ddp["optimizer states"]) == (427_264, 854_528, 854_528)


def test_qlora_holds_the_projections_in_four_bits():
    # Projections 73,984 - 256 (norms) = 73,728 values at 0.5 + 1/64 + 4/16,384 bytes (NF4, an 8-bit
    # scale per 64 and a float32 scale per 16,384) = 38,034; embedding and norms 33,088 x 4 = 132,352;
    # adapters r 8: 16,384 x 4 = 65,536. Total 235,922.
    terms = estimate(TINY, cpu(lora=True, lora_r=8, load_in_4bit=True)).phase_terms["optimizer step"]
    assert terms["weights"] == pytest.approx(235_922, abs=1)


# --- activations and the loss ----------------------------------------------------------------------

def test_one_layer_saves_what_the_op_list_says():
    # TINY, full fine-tuning, fp32, no mask, per token (bytes): input norm: input 256, 1/rms 4, normalised
    # input 256; q/k/v's shared input 256; SDPA: q 256, k 128, v 128, output 256, log-sum-exp 4 x 4 = 16;
    # o's input 256; residual sum 256, 1/rms 4, normalised 256; gate/up's input 256; gate output, SiLU
    # output, up output 3 x 512; down's input 512. Sum 4,632.
    assert layer_activation_bytes(TINY, cpu()) == 4_632


def test_gradient_checkpointing_keeps_one_hidden_vector_per_layer_and_token():
    tokens = 1_000
    plain = estimate(TINY, cpu(seq_len=tokens)).phase_terms["loss backward"]["activations"]
    checkpointed = estimate(TINY, cpu(seq_len=tokens, gradient_checkpointing=True))
    head = plain - 2 * 4_632 * tokens  # what the final norm keeps, the same either way
    # two layer inputs of 64 float32 values a token, and no other layer activation until backward
    assert checkpointed.phase_terms["loss backward"]["activations"] == 2 * 256 * tokens + head
    # in backward, layer 0 is rebuilt: its input and its activations
    assert checkpointed.phase_terms["backward of layer 0"]["activations"] == (256 + 4_632) * tokens


def test_the_logits_path_holds_three_float32_vocabulary_rows_per_token():
    # 2 x 2,048 tokens x 151,936 x 4 bytes x 3 (log-probabilities, and in backward two gradients)
    qwen = PUBLISHED_MODELS["Qwen3-8B"]
    assert loss_bytes(qwen, Setup(micro_batch=2, seq_len=2048, loss="logits")) == 7_467_958_272
    # fused, fp32: one chunk of 1,024 tokens' float32 logits (4 x 1,024 x 151,936) and the float32
    # gradient of the 4,096 x 4,096 input (4 x 4,096 x 4,096)
    assert loss_bytes(qwen, Setup(micro_batch=2, seq_len=2048, loss="fused")) == 622_329_856 + 67_108_864
    # 16-bit weights on a GPU: the chunk's logits also in 16 bits for the gradients' matmuls (2 x 1,024 x
    # 151,936), and a 16-bit input gradient
    assert loss_bytes(qwen, Setup(micro_batch=2, seq_len=2048, loss="fused", precision="bf16",
                                  weight_dtype="bfloat16")) == 622_329_856 + 311_164_928 + 33_554_432


def test_the_plan_chunks_the_fused_loss_as_the_loop_does():
    from launcher.plan import FUSED_CHUNK_TOKENS
    from loop.loss import FUSED_CHUNK_ROWS, _chunked

    assert FUSED_CHUNK_TOKENS == FUSED_CHUNK_ROWS == _chunked().batch_chunk_size


def test_the_peak_grows_with_the_micro_batch_and_the_largest_that_fits_is_found():
    device = 24 * GiB
    for setup in (Setup(seq_len=1024, precision="bf16", loss="logits"),
                  Setup(seq_len=1024, precision="bf16", gradient_checkpointing=True),
                  Setup(seq_len=1024, lora=True, num_processes=4, sharding="ddp", gradient_accumulation=3)):
        shape = PUBLISHED_MODELS["Qwen3-0.6B"]
        usable = 0.9 * device - GiB
        largest, micro, accumulation = plan_for(shape, setup, device, global_batch=48 * setup.num_processes)
        assert largest >= 1
        assert estimate(shape, replace(setup, micro_batch=largest)).peak <= usable
        assert estimate(shape, replace(setup, micro_batch=largest + 1)).peak > usable
        assert micro <= largest and 48 % micro == 0 and micro * accumulation == 48


# --- the job -------------------------------------------------------------------------------------------

def job(tmp_path, model_dir, **dotted):
    from helpers import job_config

    return job_config(model_dir, tmp_path / "out", **dotted)


@pytest.mark.parametrize("file, expected", [
    ("deepspeed_zero2.yaml", (2, "zero2", False, False)),
    ("deepspeed_zero3.yaml", (2, "zero3", False, False)),
    ("deepspeed_zero3_offload.yaml", (2, "zero3", True, True)),
    ("fsdp.yaml", (2, "fsdp", False, False)),
    ("multi_gpu.yaml", (2, "ddp", False, False)),
    ("single_gpu.yaml", (1, "none", False, False)),
])
def test_the_topology_of_the_shipped_accelerate_configs(tmp_path, tiny_model_dir, file, expected):
    config = job(tmp_path, tiny_model_dir, **{"launch.accelerate_config": str(REPO / "accelerate_configs" / file)})
    assert tuple(read_topology(config))[:4] == expected


def test_the_jobs_process_count_overrides_the_files(tmp_path, tiny_model_dir):
    config = job(tmp_path, tiny_model_dir, **{"launch.num_processes": 8,
                                              "launch.accelerate_config": str(REPO / "accelerate_configs" /
                                                                              "deepspeed_zero3.yaml")})
    assert read_topology(config)[:2] == (8, "zero3")


def test_the_loss_path_is_the_one_the_loop_takes(tmp_path, tiny_model_dir):
    shape = TINY
    assert resolve_loss(job(tmp_path, tiny_model_dir), shape, "none")[0] == "fused"
    assert resolve_loss(job(tmp_path, tiny_model_dir, **{"hyperparams.loss": "logits"}), shape, "none")[0] == "logits"
    assert resolve_loss(job(tmp_path, tiny_model_dir), shape, "zero3")[0] == "logits"
    assert resolve_loss(job(tmp_path, tiny_model_dir, **{"lora.enabled": True, "lora.modules_to_save": ["lm_head"]}),
                        shape, "none")[0] == "logits"
    gemma = ModelShape.from_config({"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512,
                                    "final_logit_softcapping": 30.0})
    assert resolve_loss(job(tmp_path, tiny_model_dir), gemma, "none") == (
        "logits", "the model soft-caps its logits after the output layer")


def test_the_setup_follows_the_job(tmp_path, tiny_model_dir):
    config = job(tmp_path, tiny_model_dir, **{"lora.enabled": True, "model.load_in_4bit": True, "lora.r": 4,
                                              "lora.target_modules": ["q_proj", "v_proj"],
                                              "model.gradient_checkpointing": True, "data.max_length": 512,
                                              "data.packing": True, "hyperparams.optimizer": "adafactor"})
    setup = setup_from_job(config, TINY, read_topology(config))
    assert (setup.lora, setup.load_in_4bit, setup.lora_r, setup.lora_targets) == (True, True, 4, ("q_proj", "v_proj"))
    assert (setup.gradient_checkpointing, setup.seq_len, setup.optimizer) == (True, 512, "adafactor")
    # Packed rows run SDPA per example without a mask (loop/attention.py); padded batches carry one,
    # and so do packed rows under transformers' own sdpa.
    assert not setup.attention_mask
    for name, settings in (("unpacked", {"hyperparams.batch_size": 2}),
                           ("sdpa", {"data.packing": True, "model.attn_implementation": "sdpa"})):
        masked = job(tmp_path / name, tiny_model_dir, **settings)
        assert setup_from_job(masked, TINY, read_topology(masked)).attention_mask, name


@pytest.mark.parametrize("text, expected", [("80GB", 80 * GiB), ("141 GiB", 141 * GiB), ("24000MB", 24000 * MiB),
                                            ("80", 80 * GiB), ("0.5GB", GiB // 2)])
def test_gpu_memory_sizes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "eighty", "80 parsecs", "-1GB"])
def test_a_bad_gpu_memory_size_is_refused(text):
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


def test_the_command_prints_the_plan_and_says_whether_it_fits(tmp_path, tiny_model_dir, capsys):
    from helpers import write_job

    from launcher.plan import main_plan

    path = write_job(tmp_path, tiny_model_dir, **{"hyperparams.batch_size": 4, "hyperparams.gradient_accumulation": 2,
                                                  "data.max_length": 256})
    assert main_plan(str(path), 2, "80GB", {}) == 0
    out = capsys.readouterr().out
    assert "| **peak** |" in out and "fits in" in out
    # 4 x 2 x 1 = 8 examples a step; on 2 GPUs 4 each: the largest micro-batch dividing 4 is 4, accumulation 1
    assert "hyperparams.batch_size = 4, hyperparams.gradient_accumulation = 1" in out
    assert main_plan(str(path), None, "0.9GB", {"hyperparams.loss": "logits"}) == 1  # 0.9 GiB less 10% and 1 GiB
    assert "does NOT fit" in capsys.readouterr().out


def test_a_model_without_a_readable_config_is_a_config_error(tmp_path, tiny_model_dir, monkeypatch):
    from launcher.plan import plan_job

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = job(tmp_path, tiny_model_dir)
    config.model.model_path = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="model.model_path: cannot read the config"):
        plan_job(config, gpu_memory="80GB")


def test_the_table_in_docs_memory_md_is_current():
    text = (REPO / "docs" / "memory.md").read_text(encoding="utf-8")
    assert reference_table() in text, "run: python -m launcher.plan, and paste the table into docs/memory.md"


# --- calibration: predicted against measured peaks on CPU --------------------------------------------

# A Qwen3-shaped model whose terms are all of a size: 5.2M parameters (21 MiB in float32), activations
# of about 100 KiB and logits of 96 KiB a token (vocabulary 8,192).
CALIBRATION_MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 64, "intermediate_size": 768, "vocab_size": 8192}
LORA = {"lora.enabled": True, "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.05}
CALIBRATION = [  # (label, dotted job settings, tokens of the row)
    ("full, logits loss", {"hyperparams.loss": "logits"}, 512),
    ("full, fused loss", {"hyperparams.loss": "fused"}, 512),
    ("full, fused loss, gradient checkpointing", {"hyperparams.loss": "fused", "model.gradient_checkpointing": True},
     512),
    ("LoRA r16, fused loss", {**LORA, "hyperparams.loss": "fused"}, 512),
    ("QLoRA r16, fused loss", {**LORA, "model.load_in_4bit": True, "hyperparams.loss": "fused"}, 512),
    ("full, adafactor, fused loss", {"hyperparams.optimizer": "adafactor", "hyperparams.loss": "fused"}, 512),
    ("full, logits loss, 1,024 tokens", {"hyperparams.loss": "logits"}, 1024),
    ("full, fused loss, 1,024 tokens", {"hyperparams.loss": "fused"}, 1024),
    ("full, fused loss, 1,024 tokens packed", {"hyperparams.loss": "fused", "data.packing": True}, 1024),
]
TOLERANCE = 0.15


def build_calibration_model(folder: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from launcher.demo import build_tokenizer

    tokenizer = build_tokenizer(folder, vocab_size=512)  # the model's embedding is larger: no resize
    config = AutoConfig.for_model("qwen3", tie_word_embeddings=True, max_position_embeddings=2048,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=None, **CALIBRATION_MODEL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def calibration_config(model_dir, settings: dict, tokens: int):
    from helpers import job_config

    return job_config(model_dir, "unused", **{"data.max_length": tokens, **settings})


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_measured_peaks(tmp_path, tiny_model_dir):
    model_dir = build_calibration_model(tmp_path / "model")
    specs = [{"settings": settings, "tokens": tokens} for _, settings, tokens in CALIBRATION]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run([sys.executable, __file__, str(model_dir), str(tiny_model_dir), json.dumps(specs)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(measured) == len(CALIBRATION), done.stderr[-3000:]

    from launcher.plan import load_shape

    shape, tensors = load_shape(str(model_dir))
    rows, misses = [], []
    for (label, settings, tokens), result in zip(CALIBRATION, measured):
        config = calibration_config(model_dir, settings, tokens)
        predicted = estimate(shape, setup_from_job(config, shape, read_topology(config), device="cpu"), tensors)
        ratio = predicted.peak / result["peak"]
        rows.append(f"| {label} | {tokens} | {predicted.peak / MiB:.1f} | {result['peak'] / MiB:.1f} | {ratio:.3f} | "
                    f"{predicted.peak_phase} |")
        assert result["loss"] == setup_from_job(config, shape, read_topology(config)).loss, label
        if abs(ratio - 1) > TOLERANCE:
            misses.append(label)
    print("\n| configuration | tokens | predicted MiB | measured MiB | predicted / measured | peak phase |\n"
          "| --- | ---: | ---: | ---: | ---: | --- |\n" + "\n".join(rows))
    assert not misses, f"off by more than {TOLERANCE:.0%}: {misses}\n" + "\n".join(rows)


# --- the measuring process ------------------------------------------------------------------------------
# Run as `python tests/test_plan.py MODEL WARMUP SPECS`: imports once, then forks a child per
# configuration, which trains one step with the product's builders and reports the step's peak resident
# memory above its resident memory before the model was built. docs/memory.md says why each step is there.

def _measure_main(model_dir: str, warmup_dir: str, specs: list[dict]) -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    # Every block over 128 KiB is mapped when allocated and unmapped when freed, so resident memory
    # follows the live tensors rather than the high-water mark of glibc's heap (inherited by children).
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoTokenizer  # noqa: F401

    import loop.train  # noqa: F401  (the builders every child uses)
    from helpers import in_fresh_process

    torch.set_num_threads(1)
    for spec in specs:
        print(json.dumps(in_fresh_process(lambda: _measure_one(model_dir, warmup_dir, spec, libc))), flush=True)


def _measure_one(model_dir: str, warmup_dir: str, spec: dict, libc) -> dict:
    import gc

    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from loop.loss import choose_loss_head
    from loop.model import build_model
    from loop.train import build_optimizer

    def step(model, optimizer, head, rows: int, tokens: int, seed: int) -> None:
        from loop.data.batches import Collator
        from loop.loss import summed_token_loss

        ids = torch.randint(0, 512, (rows, tokens), generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": ids, "labels": ids}
        if spec["settings"].get("data.packing"):  # examples of 128 tokens, as the loop's collator packs them
            batch = Collator(0, sequence_boundaries=True)([
                {"input_ids": row, "labels": row, "position_ids": [i % 128 for i in range(tokens)]}
                for row in ids.tolist()])
        losses, counts = summed_token_loss(model, batch, head)
        (losses.sum() / counts.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def trained(path: str):
        config = calibration_config(path, spec["settings"], spec["tokens"])
        model = build_model(config, AutoTokenizer.from_pretrained(path))
        model.train()
        head, _ = choose_loss_head(model, config, accelerator)
        return model, build_optimizer(model, config), head

    accelerator = Accelerator(cpu=True)
    # Warm-up on a tiny model with the same settings: the lazy imports, threads and allocator arenas a
    # first step creates are then in the baseline, not in the measured peak.
    step(*trained(warmup_dir), rows=1, tokens=16, seed=1)
    gc.collect()
    libc.malloc_trim(0)
    _populate_code(libc)
    baseline = _rss()
    model, optimizer, head = trained(model_dir)
    step(model, optimizer, head, rows=1, tokens=16, seed=2)  # a short step: gradients and optimizer states exist
    gc.collect()
    libc.malloc_trim(0)
    _page_out_checkpoints(libc)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current resident memory
    step(model, optimizer, head, rows=1, tokens=spec["tokens"], seed=3)
    return {"peak": _peak_rss() - baseline, "loss": "fused" if head is not None else "logits"}


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _mapped(predicate) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and predicate(fields[1], fields[5]):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end - start))
    return ranges


def _populate_code(libc) -> None:
    """Fault in every page of the loaded libraries' code, so that kernels first run during the measured
    step do not count (MADV_POPULATE_READ, Linux 5.14)."""
    for start, size in _mapped(lambda perms, path: "x" in perms and path.startswith("/")):
        libc.madvise(start, size, 22)


def _page_out_checkpoints(libc) -> None:
    """Drop the resident pages of memory-mapped checkpoints (those training touches fault back in)."""
    for start, size in _mapped(lambda perms, path: path.endswith(".safetensors")):
        libc.madvise(start, size, 21)  # MADV_PAGEOUT, Linux 5.4


if __name__ == "__main__":
    _measure_main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
