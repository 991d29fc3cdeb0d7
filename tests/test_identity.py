"""The model identity guard: `[locked]` against the loaded model and tokenizer, and the identity a run
folder's marker records against a later run in the same folder."""

from __future__ import annotations

import pytest

from helpers import job_config
from launcher.config import ConfigError
from loop.identity import IdentityError, check_identity
from loop.run_dir import read_marker


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny Qwen3, loaded once; the guard only reads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def job(tmp_path, model_path, **dotted):
    """The job whose identity is checked: rows of 256 tokens unless `dotted` says otherwise."""
    return job_config(model_path, tmp_path / "out", **{"data.max_length": 256, **dotted})


def test_an_unlocked_job_records_what_it_trains(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    record = check_identity(job(tmp_path, tiny_model_dir), model, tokenizer, None)
    assert record == {"base_model": str(tiny_model_dir), "model_architecture": "Qwen3ForCausalLM",
                      "vocab_size": len(tokenizer), "max_context_length": 4096, "data_max_length": 256}
    assert not (tmp_path / "out").exists()  # checking writes nothing


def test_matching_locked_values_pass(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir, **{
        "locked.base_model": f"/elsewhere/{tiny_model_dir.name}",  # same folder name: the same model moved
        "locked.model_architecture": "Qwen3ForCausalLM", "locked.vocab_size": len(tokenizer),
        "locked.max_context_length": 256})
    check_identity(config, model, tokenizer, None)


def test_every_contradiction_is_named_with_expected_and_actual(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir, **{
        "locked.base_model": "/models/Llama-3-8B", "locked.model_architecture": "LlamaForCausalLM",
        "locked.vocab_size": 128256, "locked.max_context_length": 128})
    with pytest.raises(IdentityError) as raised:
        check_identity(config, model, tokenizer, None)
    assert isinstance(raised.value, ConfigError)  # refused before training: exit code 2
    message = str(raised.value)
    assert "locked.base_model: expected '/models/Llama-3-8B'" in message and str(tiny_model_dir) in message
    assert "locked.model_architecture: expected 'LlamaForCausalLM'" in message and "'Qwen3ForCausalLM'" in message
    assert f"locked.vocab_size: expected 128256, but the model has {len(tokenizer)}" in message
    assert "data.max_length: 256 exceeds locked.max_context_length = 128" in message


def test_vocab_size_may_name_the_embedding_rows_or_the_tokenizer_length(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Models often pad the embedding beyond the tokenizer (Qwen: 151936 rows, 151669 tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tiny_tokenizer), pad_to_multiple_of=64 * 9)
    rows = model.get_input_embeddings().num_embeddings
    assert rows > len(tiny_tokenizer)
    for value in (rows, len(tiny_tokenizer)):
        check_identity(job(tmp_path, tiny_model_dir, **{"locked.vocab_size": value}), model, tiny_tokenizer, None)
    with pytest.raises(IdentityError, match="locked.vocab_size"):
        check_identity(job(tmp_path, tiny_model_dir, **{"locked.vocab_size": rows + 1}), model, tiny_tokenizer, None)


def test_a_lora_model_is_checked_by_its_base(tmp_path, tiny_model_dir, tiny_tokenizer):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    config = job(tmp_path, tiny_model_dir, **{"locked.model_architecture": "Qwen3ForCausalLM",
                                              "locked.vocab_size": len(tiny_tokenizer)})
    assert check_identity(config, model, tiny_tokenizer, None)["model_architecture"] == "Qwen3ForCausalLM"


# --- the identity recorded in the run folder ----------------------------------------------------

def test_a_later_run_with_other_values_is_refused(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir)
    recorded = check_identity(config, model, tokenizer, None)

    check_identity(config, model, tokenizer, recorded)  # the same job continues
    longer = job(tmp_path, tiny_model_dir, **{"data.max_length": 512})
    with pytest.raises(IdentityError) as raised:
        check_identity(longer, model, tokenizer, recorded)
    message = str(raised.value)
    assert "data_max_length (data.max_length)" in message and "records 256" in message and "has 512" in message
    assert "new output.output_dir" in message
    moved = job(tmp_path, f"/mnt/copy/{tiny_model_dir.name}")  # same folder name elsewhere: the same model
    check_identity(moved, model, tokenizer, recorded)


def test_a_run_that_replaces_the_folder_records_anew(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    recorded = check_identity(job(tmp_path, tiny_model_dir), model, tokenizer, None)
    replacing = job(tmp_path, tiny_model_dir, **{"data.max_length": 512, "output.resume": "never",
                                                 "output.overwrite": True})
    assert check_identity(replacing, model, tokenizer, recorded)["data_max_length"] == 512


def test_a_different_model_cannot_continue_a_run(tmp_path, make_job, tiny_model_dir):
    """End to end: the first run records its model; a Llama in the same folder stops before training."""
    from launcher.demo import build_tiny_model
    from loop.train import train

    run = {"hyperparams.max_steps": 1, "hyperparams.fp_precision": "fp32", "data.max_length": 64}
    assert train(make_job(tmp_path, **run)).success
    assert read_marker(tmp_path / "out")["identity"]["model_architecture"] == "Qwen3ForCausalLM"
    llama = build_tiny_model(tmp_path / "llama", architecture="llama")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(IdentityError, match=r"model_architecture .*'Qwen3ForCausalLM'.*'LlamaForCausalLM'"):
        train(make_job(tmp_path, **run, **{"model.model_path": str(llama)}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
