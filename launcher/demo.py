"""Build a tiny random causal LM and a byte-level BPE chat tokenizer offline.

    python -m launcher demo            # builds examples/tiny-model, then trains examples/demo_job.toml

Nothing can come from a model hub on our CI machines, so tests and the demo use a model made here:
a 2-layer Qwen3 with random weights and a ChatML tokenizer trained in milliseconds on a few KB of text.
It learns nothing useful, but every code path (templates, masks, training, saving, loading) is real.

`build_tiny_model(folder, architecture="gemma2")` builds any family of `ARCHITECTURES` the same way
(tests/test_architectures.py trains each of them; docs/models.md lists what that proves).
"""

from __future__ import annotations

import json
from pathlib import Path

from loop.data.templates import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE  # noqa: F401 (re-exported)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. You are a helpful assistant.
How do I reverse a list in Python? Use reversed(items) or items[::-1].
What is the capital of France? The capital of France is Paris.
Explain gradient descent in one sentence. It moves the weights a small step against the gradient.
Write a haiku about autumn. Red leaves drift and fall / the river carries their light / evening comes early.
Translate 'good morning' into Spanish. Buenos dias.
Summarise the plot of a heist film: a team plans, things go wrong, and they improvise to win.
def add(a, b):\n    return a + b\n
SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;
The mitochondria is the powerhouse of the cell. Photosynthesis turns light into sugar.
1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.718 42
Thank you! You're welcome. Could you clarify what you mean? Sure, here is an example.
"""


# Router auxiliary loss on, at 20x the usual coefficient of 0.001: dropping or mis-weighting the term
# then moves the loss far beyond the 1e-4 tolerance of the architecture tests.
_MOE = {"output_router_logits": True, "router_aux_loss_coef": 0.02}
# Sliding windows shorter than the training rows (45 to 128 tokens), so that the window really masks.
_WINDOW = 16

# The architectures the matrix test proves: our name -> (transformers model_type, config values beyond
# the shared tiny shape of `build_model`, whose default 2 layers and head size 16 the Gemma entries
# assume). Each override makes the tiny model exercise what sets the family apart at full size.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # Llama 3.x: rotary scaling of type "llama3" at theta 500,000.
    "llama": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 1024}}),
    "mistral": ("mistral", {"sliding_window": _WINDOW}),
    "qwen2": ("qwen2", {}),  # biases on the q, k and v projections
    "qwen3": ("qwen3", {}),  # norms on queries and keys
    # Soft-capping of the attention scores (50) and the final logits (30); no sdpa in transformers.
    "gemma2": ("gemma2", {"query_pre_attn_scalar": 16, "sliding_window": _WINDOW,
                          "layer_types": ["sliding_attention", "full_attention"]}),
    # The text model of Gemma 3: local and global layers with their own rotary bases.
    "gemma3": ("gemma3_text", {"query_pre_attn_scalar": 16, "sliding_window": _WINDOW,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {}),  # fused qkv_proj and gate_up_proj
    "olmo2": ("olmo2", {}),  # norms after attention and MLP, and on queries and keys
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),  # the second layer without rotary embeddings
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, **_MOE}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, **_MOE}),
}


def build_tokenizer(output_dir: str | Path, *, vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE,
                    extra_text: str = ""):
    """Train a byte-level BPE tokenizer with ChatML special tokens and save it to `output_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_CORPUS, extra_text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(output_dir)
    return fast


def build_model(output_dir: str | Path, tokenizer, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, intermediate_size: int = 128, max_position_embeddings: int = 4096,
                seed: int = 0, architecture: str = "qwen3"):
    """A randomly initialised causal LM sized for CPU tests, saved as safetensors.

    `architecture`: a name of `ARCHITECTURES`, or any other transformers `model_type` (built with the
    shared shape only).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = ARCHITECTURES.get(architecture, (architecture, {}))
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        head_dim=hidden_size // num_heads, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    return model


def build_tiny_model(output_dir: str | Path, *, chat_template: str | None = CHATML_TEMPLATE,
                     extra_text: str = "", **model_kwargs) -> Path:
    """Tokenizer and model together in one folder that `from_pretrained` loads."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(output_dir, chat_template=chat_template, extra_text=extra_text)
    build_model(output_dir, tokenizer, **model_kwargs)
    return output_dir


def corpus_from_jsonl(path: str | Path, limit: int = 200) -> str:
    """Some text of a chat JSONL file, to give the tokenizer merges that fit the demo data."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number >= limit:
                break
            record = json.loads(line)
            texts += [m.get("content", "") for m in record.get("messages", [])]
    return "\n".join(texts)
