"""The locked-config guard: `[locked]` against the loaded model and tokenizer, and `output_dir/lock.json`
against a later run in the same folder."""

from __future__ import annotations

import json
import time

import pytest

from launcher.config import ConfigError, config_from_dict
from loop.lock import LOCK_FILE, LockError, check_lock, write_lock


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny Qwen3, loaded once; the guard only reads them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def job(tmp_path, model_path, **dotted):
    raw = {"model": {"model_path": str(model_path)}, "data": {"dataset_path": "train.jsonl", "max_length": 256},
           "output": {"output_dir": str(tmp_path / "out")}}
    for key, value in dotted.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, check_environment=False)


def test_an_unlocked_job_records_what_it_trains(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    started = time.perf_counter()
    record = check_lock(job(tmp_path, tiny_model_dir), model, tokenizer)
    assert time.perf_counter() - started < 0.5  # reads attributes only
    assert record == {"base_model": str(tiny_model_dir), "model_architecture": "Qwen3ForCausalLM",
                      "vocab_size": len(tokenizer), "max_context_length": 4096, "data_max_length": 256}
    assert not (tmp_path / "out").exists()  # checking writes nothing


def test_matching_locked_values_pass(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir, **{
        "locked.base_model": f"/elsewhere/{tiny_model_dir.name}",  # same folder name: the same model moved
        "locked.model_architecture": "Qwen3ForCausalLM", "locked.vocab_size": len(tokenizer),
        "locked.max_context_length": 256})
    check_lock(config, model, tokenizer)


def test_every_contradiction_is_named_with_expected_and_actual(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir, **{
        "locked.base_model": "/models/Llama-3-8B", "locked.model_architecture": "LlamaForCausalLM",
        "locked.vocab_size": 128256, "locked.max_context_length": 128})
    with pytest.raises(LockError) as raised:
        check_lock(config, model, tokenizer)
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
        check_lock(job(tmp_path, tiny_model_dir, **{"locked.vocab_size": value}), model, tiny_tokenizer)
    with pytest.raises(LockError, match="locked.vocab_size"):
        check_lock(job(tmp_path, tiny_model_dir, **{"locked.vocab_size": rows + 1}), model, tiny_tokenizer)


def test_a_lora_model_is_checked_by_its_base(tmp_path, tiny_model_dir, tiny_tokenizer):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                peft.LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    config = job(tmp_path, tiny_model_dir, **{"locked.model_architecture": "Qwen3ForCausalLM",
                                              "locked.vocab_size": len(tiny_tokenizer)})
    assert check_lock(config, model, tiny_tokenizer)["model_architecture"] == "Qwen3ForCausalLM"


# --- lock.json ------------------------------------------------------------------------------------

def test_a_later_run_with_other_values_is_refused(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    config = job(tmp_path, tiny_model_dir)
    record = check_lock(config, model, tokenizer)
    (tmp_path / "out").mkdir()
    path = write_lock(config.output_path, record)
    assert path == tmp_path / "out" / LOCK_FILE and json.loads(path.read_text()) == record

    check_lock(config, model, tokenizer)  # the same job continues
    longer = job(tmp_path, tiny_model_dir, **{"data.max_length": 512})
    with pytest.raises(LockError) as raised:
        check_lock(longer, model, tokenizer)
    message = str(raised.value)
    assert "data_max_length (data.max_length)" in message and "records 256" in message and "has 512" in message
    assert "new output.output_dir" in message
    moved = job(tmp_path, f"/mnt/copy/{tiny_model_dir.name}")  # same folder name elsewhere: the same model
    check_lock(moved, model, tokenizer)


def test_a_run_that_replaces_the_folder_records_anew(tmp_path, tiny_model_dir, tiny):
    model, tokenizer = tiny
    (tmp_path / "out").mkdir()
    write_lock(tmp_path / "out", check_lock(job(tmp_path, tiny_model_dir), model, tokenizer))
    replacing = job(tmp_path, tiny_model_dir, **{"data.max_length": 512, "output.resume": "never",
                                                 "output.overwrite": True})
    record = check_lock(replacing, model, tokenizer)
    write_lock(replacing.output_path, record)
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["data_max_length"] == 512


def test_a_different_model_cannot_continue_a_run(tmp_path, make_job, tiny_model_dir):
    """End to end: the first run records its model; a Llama in the same folder stops before training."""
    from launcher.demo import build_tiny_model
    from loop.train import train

    run = {"hyperparams.max_steps": 1, "hyperparams.fp_precision": "fp32", "data.max_length": 64}
    assert train(make_job(tmp_path, **run)).success
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["model_architecture"] == "Qwen3ForCausalLM"
    llama = build_tiny_model(tmp_path / "llama", architecture="llama")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(LockError, match=r"model_architecture .*'Qwen3ForCausalLM'.*'LlamaForCausalLM'"):
        train(make_job(tmp_path, **run, **{"model.model_path": str(llama)}))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
