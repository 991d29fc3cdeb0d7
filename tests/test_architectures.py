"""The architecture matrix: every family of `launcher.demo.ARCHITECTURES`, built tiny and offline,
trains with our loop to HF Trainer's per-step loss (the MoE router auxiliary loss included), resumes
to bit-identical weights, reloads its `final/` with transformers (and peft for adapters), and LoRA's
"all-linear" adapts the right modules. docs/models.md is the table of what this proves.

    pytest tests/test_architectures.py -m "not slow"     # the matrix without the LoRA training runs
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROUNDING_SAFE_ADAM, chat_records, job_config, read_metrics, small_job
from launcher.config import load_config
from launcher.demo import ARCHITECTURES, build_tiny_model
from loop.model import ModelLoadError, build_model
from loop.train import train

MOE = ("mixtral", "qwen3_moe")
TOLERANCE = 1e-4  # relative, per optimizer step

# What "all-linear" must adapt, from each family's published layout: the attention and MLP projections
# (Phi-3 fuses q/k/v and gate/up), and for MoE models the stacked experts but never the router.
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LORA_TARGETS = {arch: PROJECTIONS for arch in ARCHITECTURES}
LORA_TARGETS["phi3"] = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
for arch in MOE:
    LORA_TARGETS[arch] = {"q_proj", "k_proj", "v_proj", "o_proj", "experts"}

# 4 steps of 2 rows in file order, checkpoints at steps 2 and 4. Dense models accumulate 2
# micro-batches (token normalisation across them against Trainer's); MoE models take one, since
# Trainer counts the auxiliary loss once per micro-batch (see test_moe_accumulation_...).
STEPS = {"hyperparams.batch_size": 2, "hyperparams.max_steps": 4, "hyperparams.save_steps": 2,
         "hyperparams.save_total_limit": 5, "hyperparams.weight_decay": 0.0, "data.shuffle": False,
         **ROUNDING_SAFE_ADAM}
LORA = {"lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """`model_dir(arch)`: the tiny model folder of `arch`, built once per module."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(arch), architecture=arch)
        return built[arch]

    return get


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir):
    """`full_run(arch)`: (config, result) of a finished full fine-tuning run of `arch`, run once."""
    runs: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in runs:
            accumulation = 1 if arch in MOE else 2
            job = small_job(tmp_path_factory.mktemp(f"{arch}-run"), model_dir(arch), chat_records(16), **STEPS,
                            **{"hyperparams.gradient_accumulation": accumulation})
            config = load_config(job)
            result = train(config)
            assert result.success, result.error
            runs[arch] = config, result
        return runs[arch]

    return get


def trainer_losses(config, model_dir: Path, output_dir: Path) -> list[float]:
    """HF Trainer's logged loss of each optimizer step, trained as `config` says on the rows our
    loop prepares for it (same order, same padding), with the model's own loss."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from loop.data import build_datasets, load_tokenizer
    from loop.data.batches import Collator

    h = config.hyperparams
    tokenizer = load_tokenizer(config)
    rows = build_datasets(config, tokenizer).train
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # attention: transformers' default
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=h.batch_size,
        gradient_accumulation_steps=h.gradient_accumulation, learning_rate=h.learning_rate,
        lr_scheduler_type=h.lr_scheduler, warmup_steps=h.warmup_steps, max_steps=h.max_steps,
        max_grad_norm=h.max_grad_norm, weight_decay=h.weight_decay, adam_beta1=h.adam_betas[0],
        adam_beta2=h.adam_betas[1], adam_epsilon=h.adam_epsilon, seed=h.seed, logging_steps=1, report_to="none",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=True, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=Collator(tokenizer.pad_token_id))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def relative_differences(ours: list[float], theirs: list[float]) -> list[float]:
    assert len(ours) == len(theirs) > 0
    return [abs(a - b) / abs(b) for a, b in zip(ours, theirs)]


def interrupt_after_step_2(output_dir: Path) -> None:
    """Leave `output_dir` as a run killed after its step-2 checkpoint would."""
    for path in (output_dir / "checkpoints").iterdir():
        if path.name != "step_000002":
            shutil.rmtree(path)
    shutil.rmtree(output_dir / "final")
    (output_dir / "result.json").unlink()


# --- full fine-tuning: loss, resume, reload ------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_step_loss_equals_trainers(arch, full_run, model_dir, tmp_path):
    config, _ = full_run(arch)
    ours = read_metrics(config.output_path)
    theirs = trainer_losses(config, model_dir(arch), tmp_path / "trainer")
    differences = relative_differences([r["loss"] for r in ours], theirs)
    print(f"{arch}: max relative difference to Trainer {max(differences):.2e}")
    assert max(differences) < TOLERANCE, (arch, differences)
    if arch in MOE:
        # The auxiliary term is material at this tolerance: without it our loss would be far off.
        coef = ARCHITECTURES[arch][1]["router_aux_loss_coef"]
        without = relative_differences([r["loss"] - coef * r["aux_loss"] for r in ours], theirs)
        assert min(without) > 10 * TOLERANCE
    else:
        assert not any("aux_loss" in r for r in ours)


@pytest.mark.parametrize("arch", MOE)
def test_logged_aux_loss_is_the_models_own(arch, full_run, model_dir):
    """Step 1's `aux_loss` is what the untrained model itself returns for the first batch."""
    from transformers import AutoModelForCausalLM

    from loop.data import build_dataloader, build_datasets, load_tokenizer

    config, _ = full_run(arch)
    tokenizer = load_tokenizer(config)
    first = next(iter(build_dataloader(build_datasets(config, tokenizer).train, config, tokenizer, shuffle=False,
                                       batch_size=config.hyperparams.batch_size)))
    model = AutoModelForCausalLM.from_pretrained(model_dir(arch))
    with torch.no_grad():
        expected = model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).aux_loss
    assert read_metrics(config.output_path)[0]["aux_loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resume_from_a_mid_checkpoint_ends_with_identical_weights(arch, full_run, tmp_path):
    config, _ = full_run(arch)
    whole = config.output_path
    # The same job in a copy of its folder (job file, data, cache, output), cut back to step 2.
    job = Path(shutil.copytree(whole.parent, tmp_path / "job")) / "job.toml"
    parted = load_config(job).output_path
    interrupt_after_step_2(parted)
    resumed = train(load_config(job))
    assert resumed.success, resumed.error
    assert resumed.summary["resumed_from"].endswith("step_000002")
    expected = load_file(whole / "final" / "model.safetensors")
    actual = load_file(parted / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert [r["loss"] for r in read_metrics(parted)] == [r["loss"] for r in read_metrics(whole)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_reloads_with_transformers_as_trained(arch, full_run):
    """`final/` loads with AutoModelForCausalLM (default attention) and holds the weights of the last
    step checkpoint, which Accelerate wrote by another path."""
    from transformers import AutoModelForCausalLM

    config, _ = full_run(arch)
    reloaded = AutoModelForCausalLM.from_pretrained(config.output_path / "final")
    assert reloaded.config.model_type == ARCHITECTURES[arch][0]
    checkpoint = load_file(config.output_path / "checkpoints" / "step_000004" / "model.safetensors")
    state = reloaded.state_dict()
    assert set(state) - set(checkpoint) <= {"lm_head.weight"}  # tied to the embeddings, saved once
    for name, tensor in checkpoint.items():
        assert torch.equal(state[name], tensor), name


# --- MoE: the auxiliary loss under accumulation and in evaluation --------------------------------

@pytest.mark.parametrize("arch", MOE)
def test_accumulating_a_batch_twice_is_the_step_of_that_batch(arch, model_dir, tmp_path):
    """Two micro-batches holding the same rows make the step of those rows once: the auxiliary loss
    enters as its mean over the window's micro-batches, as for a single forward (Trainer's reference
    without accumulation). A sum over micro-batches would double it."""
    records = chat_records(8)
    doubled = [record for pair in zip(records[0::2], records[1::2]) for record in (*pair, *pair)]
    ours = load_config(small_job(tmp_path / "ours", model_dir(arch), doubled, **STEPS, **{
        "hyperparams.gradient_accumulation": 2}))
    assert train(ours).success
    reference = load_config(small_job(tmp_path / "reference", model_dir(arch), records, **STEPS, **{
        "hyperparams.gradient_accumulation": 1}))
    theirs = trainer_losses(reference, model_dir(arch), tmp_path / "trainer")
    differences = relative_differences([r["loss"] for r in read_metrics(ours.output_path)], theirs)
    print(f"{arch} accumulating: max relative difference to Trainer {max(differences):.2e}")
    assert max(differences) < TOLERANCE, differences


@pytest.mark.parametrize("arch", MOE)
def test_validation_loss_adds_the_aux_term_as_trainer_does(arch, model_dir, tmp_path):
    """One validation batch: Trainer's eval_loss (the model's own loss) equals ours."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from loop.data import build_dataloader, build_datasets, load_tokenizer
    from loop.data.batches import Collator
    from loop.train import build_accelerator, evaluate

    config = load_config(small_job(tmp_path, model_dir(arch), validation_records=chat_records(4, 100), **{
        "hyperparams.batch_size": 4, "hyperparams.fp_precision": "fp32"}))
    tokenizer = load_tokenizer(config)
    validation = build_datasets(config, tokenizer).validation
    model = AutoModelForCausalLM.from_pretrained(model_dir(arch))
    accelerator = build_accelerator(config)
    ours = evaluate(model, accelerator.prepare(build_dataloader(validation, config, tokenizer, shuffle=False,
                                                                batch_size=4)), accelerator)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=4, report_to="none",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, data_collator=Collator(tokenizer.pad_token_id))
    assert ours == pytest.approx(trainer.evaluate(validation)["eval_loss"], rel=1e-5)


# --- defaults load every architecture -----------------------------------------------------------

def test_auto_attention_takes_sdpa_where_supported_and_eager_for_gemma2(model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    chosen = {}
    for arch in ("llama", "gemma2"):
        config = job_config(model_dir(arch), tmp_path / "out")
        assert config.model.attn_implementation == "auto"
        with caplog.at_level(logging.INFO, logger="loop.model"):
            model = build_model(config, AutoTokenizer.from_pretrained(model_dir(arch)))
        chosen[arch] = model.config._attn_implementation
        assert f"attention: {chosen[arch]} (model.attn_implementation = 'auto')" in caplog.text
    assert chosen == {"llama": "sdpa", "gemma2": "eager"}
    # Asked for by name, sdpa is refused for Gemma 2 with the key to change.
    config = job_config(model_dir("gemma2"), tmp_path / "out", **{"model.attn_implementation": "sdpa"})
    with pytest.raises(ModelLoadError, match=r"model.attn_implementation.*auto"):
        build_model(config, AutoTokenizer.from_pretrained(model_dir("gemma2")))


# --- LoRA ---------------------------------------------------------------------------------------

def adapted(model) -> dict[str, set[str]]:
    """{leaf name: module paths} of the modules holding a LoRA adapter."""
    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and not name.endswith(".base_layer"):
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    return found


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_all_linear_adapts_the_projections_and_experts_but_not_routers(arch, model_dir, tmp_path):
    from transformers import AutoTokenizer

    config = job_config(model_dir(arch), tmp_path / "out", **LORA)
    model = build_model(config, AutoTokenizer.from_pretrained(model_dir(arch)))
    found = adapted(model)
    assert set(found) == LORA_TARGETS[arch]
    num_layers = model.get_base_model().config.num_hidden_layers
    assert all(len(paths) == num_layers for paths in found.values()), found
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert not any(".gate." in name or name.endswith(".gate") for name in trained)  # MoE routers stay frozen


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_run_resumes_exactly_and_its_adapter_reloads_with_peft(arch, model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accumulation = 1 if arch in MOE else 2
    config = load_config(small_job(tmp_path, model_dir(arch), chat_records(16), **STEPS, **LORA, **{
        "hyperparams.gradient_accumulation": accumulation}))
    first = train(config)
    assert first.success, first.error
    output_dir = config.output_path
    adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    losses = [r["loss"] for r in read_metrics(output_dir)]

    interrupt_after_step_2(output_dir)
    resumed = train(config)
    assert resumed.success and resumed.summary["resumed_from"].endswith("step_000002")
    assert [r["loss"] for r in read_metrics(output_dir)] == losses
    resumed_adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    assert adapter.keys() == resumed_adapter.keys()
    for key in adapter:
        assert torch.equal(resumed_adapter[key], adapter[key]), key

    # The adapter on its base gives the logits of the model as the last step checkpoint holds it.
    inputs = torch.randint(0, len(AutoTokenizer.from_pretrained(model_dir(arch))), (2, 24),
                           generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir(arch)), output_dir / "final")
    checkpointed = build_model(config, AutoTokenizer.from_pretrained(model_dir(arch)))
    load_model(checkpointed, output_dir / "checkpoints" / "step_000004" / "model.safetensors")
    with torch.no_grad():
        expected = checkpointed.eval()(input_ids=inputs).logits
        torch.testing.assert_close(reloaded.eval()(input_ids=inputs).logits, expected, rtol=0, atol=1e-6)
        untrained = AutoModelForCausalLM.from_pretrained(model_dir(arch)).eval()(input_ids=inputs).logits
    assert not torch.allclose(untrained, expected, atol=1e-4)  # the adapter changed the model


@pytest.mark.slow
def test_two_processes_accumulating_the_same_batch_make_its_step(model_dir, tmp_path):
    """The auxiliary weighting composes with DDP: 2 processes x 2 micro-batches, all four holding the
    same row, make the step of that row once (Trainer, one process, no accumulation)."""
    from launcher.run import run_job

    records = chat_records(4)
    quadrupled = [record for record in records for _ in range(4)]
    settings = {**STEPS, "hyperparams.batch_size": 1, "hyperparams.save_steps": 0}
    ours = load_config(small_job(tmp_path / "ours", model_dir("mixtral"), quadrupled, **settings, **{
        "hyperparams.gradient_accumulation": 2, "launch.num_processes": 2}))
    result = run_job(ours)
    assert result.success, result.error
    assert result.summary["world_size"] == 2
    reference = load_config(small_job(tmp_path / "reference", model_dir("mixtral"), records, **settings, **{
        "hyperparams.gradient_accumulation": 1}))
    theirs = trainer_losses(reference, model_dir("mixtral"), tmp_path / "trainer")
    differences = relative_differences([r["loss"] for r in read_metrics(ours.output_path)], theirs)
    print(f"mixtral on 2 processes: max relative difference to Trainer {max(differences):.2e}")
    assert max(differences) < TOLERANCE, differences
