"""Sample generations during training: prompts, greedy generation, and no trace left on the run.

    .venv/bin/pytest tests/test_preview.py -q
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from launcher.config import JobConfig
from loop.preview import IGNORE_INDEX, generate_previews, preview_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate's state is a process-wide singleton; start and leave it clean for other tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def model(tiny_model_dir, accelerator):
    """The tiny model as the loop holds it: prepared, in train mode, KV cache off."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model = accelerator.prepare(model)
    model.train()
    return model


def greedy_reference(model_dir, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """What transformers' own greedy `generate` continues `prompt_ids` with, on a fresh copy of the model."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    output = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


def row(tokenizer, turns: list[tuple[str, str]]) -> tuple[dict, list[int]]:
    """A tokenized training row of (user, assistant) turns, assistant replies trained; and the prompt
    a preview should cut from it (everything before the last reply)."""
    input_ids, labels = [], []
    for user, assistant in turns:
        prompt = chat_ids(tokenizer, [{"role": "user", "content": user}], add_generation_prompt=True)
        reply = tokenizer.encode(assistant + "<|im_end|>", add_special_tokens=False)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        expected = input_ids + prompt
        input_ids += prompt + reply + newline
        labels += [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(newline)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}, expected


# --- prompts -----------------------------------------------------------------------------------

def test_configured_prompts_are_rendered_with_the_system_prompt(tokenizer):
    config = JobConfig()
    config.monitoring.preview_prompts = ["What is the capital of France?", "Write a haiku."]
    config.profile.system_prompt = "Be brief. Today is {date}."
    prompts = preview_prompts(config, None, tokenizer)
    assert len(prompts) == 2
    text = tokenizer.decode(prompts[0])
    assert text.startswith("<|im_start|>system\nBe brief. Today is 20") and "{date}" not in text
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    config.profile.system_prompt = ""
    prompts = preview_prompts(config, None, tokenizer)
    haiku = [{"role": "user", "content": "Write a haiku."}]
    assert prompts[1] == chat_ids(tokenizer, haiku, add_generation_prompt=True)


def test_validation_rows_are_cut_before_their_last_reply(tokenizer):
    from datasets import Dataset

    config = JobConfig()
    config.monitoring.preview_num_prompts = 2
    single, single_prompt = row(tokenizer, [("Hi", "Hello!")])
    multi, multi_prompt = row(tokenizer, [("What is 2+2?", "4"), ("And 3+3?", "6")])
    everything_trained = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    nothing_trained = {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}
    rows = [everything_trained, nothing_trained, single, multi, single]

    prompts = preview_prompts(config, rows, tokenizer)
    assert prompts == [single_prompt, multi_prompt]  # skipped rows with no prompt, stopped at 2
    assert tokenizer.decode(prompts[1]).endswith("4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
                                                 "<|im_start|>assistant\n")

    packed = {key: single[key] + multi[key] for key in ("input_ids", "labels")}
    packed["position_ids"] = list(range(len(single["input_ids"]))) + list(range(len(multi["input_ids"])))
    assert preview_prompts(config, [packed], tokenizer) == [multi_prompt]  # not the example packed before it

    dataset = Dataset.from_list([single, multi]).with_format("torch")  # rows as tensors, as a loader sees them
    assert preview_prompts(config, dataset, tokenizer) == [single_prompt, multi_prompt]
    assert preview_prompts(config, None, tokenizer) == []


# --- generation --------------------------------------------------------------------------------

def test_generation_is_transformers_greedy_decoding_and_leaves_no_trace(model, tokenizer, accelerator,
                                                                        tiny_model_dir):
    config = JobConfig()
    config.monitoring.preview_prompts = ["What is the capital of France?", "Hi"]
    prompts = preview_prompts(config, None, tokenizer)
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    torch.manual_seed(1234)
    rng = torch.get_rng_state()

    samples = generate_previews(model, tokenizer, prompts, 8, accelerator)

    assert samples == [{"prompt": tokenizer.decode(ids),
                        "completion": greedy_reference(tiny_model_dir, tokenizer, ids, 8)} for ids in prompts]
    assert model.training and all(m.training for m in model.modules())
    assert model.config.use_cache is False
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, weights[name]) for name, p in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_generation_from_validation_prompts(model, tokenizer, accelerator, tiny_model_dir):
    config = JobConfig()
    validation = [row(tokenizer, [("What is the capital of France?", "Paris.")])[0]]
    prompts = preview_prompts(config, validation, tokenizer)
    samples = generate_previews(model, tokenizer, prompts, 4, accelerator)
    assert samples == [{"prompt": tokenizer.decode(prompts[0]),
                        "completion": greedy_reference(tiny_model_dir, tokenizer, prompts[0], 4)}]
    assert samples[0]["prompt"].endswith("<|im_start|>assistant\n")


def test_a_model_in_eval_mode_stays_in_eval_mode(model, tokenizer, accelerator):
    model.eval()
    generate_previews(model, tokenizer, [[1, 2, 3]], 2, accelerator)
    assert not model.training


def test_no_prompts_no_work(model, tokenizer, accelerator):
    assert generate_previews(model, tokenizer, [], 8, accelerator) == []


def fake_accelerator(*, is_main_process=True, distributed_type="MULTI_CPU", zero_stage=None, num_processes=2):
    """Just what generate_previews reads, for process layouts a CPU test cannot start."""
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(is_main_process=is_main_process, num_processes=num_processes,
                           distributed_type=DistributedType[distributed_type], device=torch.device("cpu"),
                           state=SimpleNamespace(deepspeed_plugin=plugin), unwrap_model=lambda m: m)


def test_only_the_main_process_generates_under_ddp(model, tokenizer):
    accelerator = fake_accelerator(is_main_process=False)
    assert generate_previews(model, tokenizer, [[1, 2, 3]], 2, accelerator) == []


@pytest.fixture
def one_process_group(tmp_path):
    """A real (gloo) process group of one, so that generation synchronised over processes can run."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
def test_every_process_generates_under_zero3(model, tokenizer, accelerator):
    """ZeRO-3 shards the weights: a process that is not the main one takes part and gets the samples too,
    the same the main process gets."""
    prompts = [[1, 2, 3], [4, 5]]
    expected = generate_previews(model, tokenizer, prompts, 3, accelerator)
    zero3 = fake_accelerator(is_main_process=False, distributed_type="DEEPSPEED", zero_stage=3)
    assert generate_previews(model, tokenizer, prompts, 3, zero3) == expected


def test_previews_are_skipped_under_fsdp(model, tokenizer, caplog):
    accelerator = fake_accelerator(distributed_type="FSDP")
    with caplog.at_level(logging.WARNING, logger="loop.preview"):
        assert generate_previews(model, tokenizer, [[1, 2, 3]], 2, accelerator) == []
    assert "FSDP" in caplog.text
