"""Real chat templates through the renderer: masks, split replies, refusals, tools, dropped content.

The templates are the families' own (tests/templates/*.jinja; tests/templates/SOURCES.md says where
each came from). Each is paired with a tiny tokenizer holding that family's special tokens, built
offline from the demo's byte-level BPE. For every family and conversation the examples equal an
independent reference computed from transformers' own tokenization: the prompt before reply k
(messages[:k] with the generation prompt) must be a prefix of the conversation rendered through reply
k, whose trained tokens run to the family's end-of-turn token; a reply trains inside the whole
conversation where that conversation holds the same tokens, and in an example of its own where not.
Templates with `{% generation %}` markers are compared with transformers' assistant mask instead.
Each family also states what it must do (train, split, refuse), so the two cannot agree on a mistake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loop.data import IGNORE_INDEX, DataError, TemplateError, build_datasets, load_tokenizer, render_conversation
from loop.data.prepare import pack
from loop.data.templates import CHATML_GENERATION_TEMPLATE
from profiles import RecordError

TEMPLATES = Path(__file__).parent / "templates"
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|eom_id|>", "<|python_tag|>"]
MISTRAL_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                   "[/TOOL_RESULTS]"]
DEEPSEEK = ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>", "<｜tool▁sep｜>"]
PHI3 = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHATML = ["<|im_start|>", "<|endoftext|>"]


@dataclass(frozen=True)
class Family:
    eos: str
    """The eos token; also the end of a reply unless `end_of_turn` says otherwise."""
    reply: str
    """What a plain reply trains, `{}` standing for its content."""
    bos: str | None = None
    specials: tuple[str, ...] = ()
    end_of_turn: str = ""
    outcomes: dict[str, str] = field(default_factory=dict)
    """Conversation kind -> "split", "refused" (no rendering matches inference), "error" (the template
    raises), "no_tools" (the template cannot render tools); every other kind trains in one example."""
    drops: dict[str, str] = field(default_factory=lambda: dict(FIELD_DROPPED))
    """Conversation kind -> what the template drops of it (`Rendered.dropped`); "" for every other kind."""

    @property
    def end(self) -> str:
        return self.end_of_turn or self.eos


NO_TOOLS = {"tools": "no_tools"}
# Most templates know nothing of reasoning: a `reasoning_content` field is dropped (inline <think> is text).
FIELD_DROPPED = {"reasoning_field": "messages[1].reasoning_content (the template never reads it)"}
FAMILIES = {
    "llama-3": Family("<|eot_id|>", "{}<|eot_id|>", "<|begin_of_text|>", tuple(LLAMA3), outcomes=NO_TOOLS),
    "llama-3.1": Family("<|eot_id|>", "{}<|eot_id|>", "<|begin_of_text|>", tuple(LLAMA3)),
    "mistral-v0.1": Family("</s>", "{}</s>", "<s>", outcomes={"system": "error", **NO_TOOLS}),
    "mistral-v0.3": Family("</s>", " {}</s>", "<s>", tuple(MISTRAL_CONTROL), outcomes={"system": "refused"}),
    "mistral-v0.3-2024-05": Family("</s>", " {} </s>", "<s>", tuple(MISTRAL_CONTROL),
                                   drops={**FIELD_DROPPED, "system": "messages[0] (the system prompt)"}),
    "mistral-nemo": Family("</s>", "{}</s>", "<s>", tuple(MISTRAL_CONTROL), outcomes={"system": "refused"}),
    "mixtral": Family("</s>", " {}</s>", "<s>", outcomes=NO_TOOLS),
    "gemma-2": Family("<eos>", "{}<end_of_turn>", "<bos>", ("<start_of_turn>", "<end_of_turn>"),
                      end_of_turn="<end_of_turn>", outcomes={"system": "error", **NO_TOOLS}),
    "gemma-3": Family("<eos>", "{}<end_of_turn>", "<bos>", ("<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
                      end_of_turn="<end_of_turn>", outcomes=NO_TOOLS),
    "phi-3": Family("<|endoftext|>", "{}<|end|>", "<s>", tuple(PHI3), end_of_turn="<|end|>", outcomes=NO_TOOLS),
    "phi-3.5": Family("<|endoftext|>", "{}<|end|>", "<s>", tuple(PHI3), end_of_turn="<|end|>", outcomes=NO_TOOLS),
    "phi-4": Family("<|im_end|>", "{}<|im_end|>", None, ("<|im_start|>", "<|im_sep|>", "<|endoftext|>"),
                    outcomes=NO_TOOLS),
    "qwen2.5": Family("<|im_end|>", "{}<|im_end|>", None, tuple(CHATML)),
    # The final turn opens a <think> block that history turns lack: every earlier reply is split off.
    "qwen3": Family("<|im_end|>", "<think>\n\n</think>\n\n{}<|im_end|>", None, tuple(CHATML),
                    outcomes={"multi": "split", "system": "split", "reasoning": "split", "reasoning_field": "split",
                              "tools": "split"}, drops={}),
    "deepseek-v2": Family("<｜end▁of▁sentence｜>", " {}<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", outcomes=NO_TOOLS),
    "deepseek-v3": Family("<｜end▁of▁sentence｜>", "{}<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", tuple(DEEPSEEK),
                          outcomes=NO_TOOLS),
    # Keeps only what follows </think>, even in the final turn.
    "deepseek-r1-distill": Family("<｜end▁of▁sentence｜>", "{}<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>",
                                  tuple(DEEPSEEK), outcomes={"reasoning": "refused", "reasoning_field": "refused",
                                                             **NO_TOOLS}, drops={}),
    "command-r": Family("<|END_OF_TURN_TOKEN|>", "{}<|END_OF_TURN_TOKEN|>", "<BOS_TOKEN>",
                        ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"),
                        outcomes=NO_TOOLS),
    # Reads `tools` but never renders an assistant's `tool_calls`; asks for reasoning inline in <think>.
    "granite-3.3": Family("<|end_of_text|>", "{}<|end_of_text|>", None,
                          ("<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"), outcomes=NO_TOOLS, drops={}),
    "zephyr": Family("</s>", "{}</s>", "<s>", outcomes=NO_TOOLS),
    "smollm2": Family("<|im_end|>", "{}<|im_end|>", None, tuple(CHATML), outcomes=NO_TOOLS),
    # {% generation %} markers around the whole turn, header and closing newline included.
    "smollm3": Family("<|im_end|>", "<|im_start|>assistant\n{}<|im_end|>\n", None, tuple(CHATML), outcomes=NO_TOOLS,
                      drops={}),
    "olmo-2": Family("<|endoftext|>", "{}<|endoftext|>", "<|endoftext|>", outcomes=NO_TOOLS),
}

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
Q2 = {"role": "user", "content": "Thank you! Could you clarify?"}
A2 = {"role": "assistant", "content": "Sure, here is an example."}
THOUGHT1, THOUGHT2 = "The user asks about France.", "A polite follow-up."
R1 = {"role": "assistant", "content": f"<think>\n{THOUGHT1}\n</think>\n\n{A1['content']}"}
R2 = {"role": "assistant", "content": f"<think>\n{THOUGHT2}\n</think>\n\n{A2['content']}"}
F1 = {**A1, "reasoning_content": THOUGHT1}
F2 = {**A2, "reasoning_content": THOUGHT2}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}]
ASK = {"role": "user", "content": "What is the weather in Paris?"}
# OpenAI style: arguments as a JSON string (the renderer passes templates an object); a 9-character id
# because Mistral's templates require one.
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"temperature": 21}'}
ANSWER = {"role": "assistant", "content": "It is 21 degrees in Paris."}

CONVERSATIONS = {
    "single": ([Q1, A1], None),
    "multi": ([Q1, A1, Q2, A2], None),
    "system": ([SYSTEM, Q1, A1, Q2, A2], None),
    "reasoning": ([Q1, R1, Q2, R2], None),
    "reasoning_field": ([Q1, F1, Q2, F2], None),
    "tools": ([ASK, CALL, RESULT, ANSWER], TOOLS),
}


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    """The demo's byte-level BPE, without a template; each family adds its special tokens to a copy."""
    from launcher.demo import build_tokenizer

    folder = tmp_path_factory.mktemp("template-tokenizer")
    build_tokenizer(folder, chat_template=None)
    return folder


def family_tokenizer(base: Path, name: str):
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokens = {"eos_token": family.eos, "additional_special_tokens": list(family.specials)}
    if family.bos:
        tokens["bos_token"] = family.bos
    tokenizer.add_special_tokens(tokens)
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    return tokenizer


# --- the independent reference -----------------------------------------------------------------------

def reasoning_of(message: dict) -> str:
    if message.get("reasoning_content"):
        return message["reasoning_content"]
    content = message.get("content") or ""
    return content.split("</think>")[0].split("<think>")[-1].strip() if "</think>" in content else ""


def as_the_template_reads(messages: list[dict], template: str) -> list[dict]:
    """The documented passing rules: tool-call arguments as objects; reasoning given as a field moves into
    the content for a template that only splits it out of there."""
    def passed(message):
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [
                {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
                for call in message["tool_calls"]]}
        if message.get("reasoning_content") and "reasoning_content" not in template and "</think>" in template:
            message = {"role": message["role"],
                       "content": f"<think>\n{message['reasoning_content']}\n</think>\n\n{message['content']}"}
        return message

    return [passed(m) for m in messages]


def reference(tokenizer, messages, tools, end_of_turn: str):
    """The examples the renderer must give, or "refused", from token ids alone (see the module docstring)."""
    def ids(conversation, prompt=False):
        return list(tokenizer.apply_chat_template(conversation, tools=tools, add_generation_prompt=prompt,
                                                  tokenize=True)["input_ids"])

    template = tokenizer.chat_template
    messages = as_the_template_reads(messages, template)
    if "{% generation %}" in template:
        encoded = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        labels = [t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
        return [(list(encoded["input_ids"]), [IGNORE_INDEX] + labels[1:])]
    eot = tokenizer.convert_tokens_to_ids(end_of_turn)
    full = ids(messages)
    in_full, alone = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, final = ids(messages[:k], prompt=True), ids(messages[:k + 1])
        if final[:len(prompt)] != prompt:
            return "refused"
        end = final.index(eot, len(prompt)) + 1
        # Reasoning the template is given (inline, or a field it reads) must be in the reply it trains.
        thought = reasoning_of(message)
        given = "</think>" in (message.get("content") or "") or "reasoning_content" in template
        if thought and given and thought not in tokenizer.decode(final[len(prompt):end]):
            return "refused"
        if full[:end] == final[:end]:
            in_full.append((len(prompt), end))
        else:
            alone.append((final, [(len(prompt), end)]))
    examples = ([(full, in_full)] if in_full or not alone else []) + alone
    return [(tokens, with_spans(tokens, spans)) for tokens, spans in examples]


def with_spans(tokens, spans):
    labels = [IGNORE_INDEX] * len(tokens)
    for start, end in spans:
        labels[start:end] = tokens[start:end]
    return [IGNORE_INDEX] + labels[1:]


def trained_texts(tokenizer, examples) -> list[str]:
    """The decoded trained runs of every example, in order."""
    texts = []
    for ids, labels in examples:
        run = []
        for token, label in zip(ids + [None], labels + [IGNORE_INDEX]):
            if label != IGNORE_INDEX:
                run.append(token)
            elif run:
                texts.append(tokenizer.decode(run))
                run = []
    return texts


def outcome(tokenizer, messages, tools):
    try:
        return render_conversation(tokenizer, messages, tools=tools)
    except TemplateError as error:
        return ("refused", str(error))
    except RecordError as error:
        return ("no_tools" if "tool" in str(error) and "never" in str(error) else "error", str(error))


# --- every family, every conversation ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_trains_each_reply_as_generated_at_inference(base_tokenizer, name):
    family = FAMILIES[name]
    tokenizer = family_tokenizer(base_tokenizer, name)
    for kind, (messages, tools) in CONVERSATIONS.items():
        expected = family.outcomes.get(kind, "trained")
        result = outcome(tokenizer, messages, tools)
        if expected in ("refused", "error", "no_tools"):
            assert isinstance(result, tuple) and result[0] == expected, (kind, result)
            if expected == "refused":
                assert reference(tokenizer, messages, tools, family.end) == "refused", kind
            continue
        assert not isinstance(result, tuple), (kind, result)
        assert result.is_split == (expected == "split"), kind
        assert result.dropped == family.drops.get(kind, ""), kind
        assert result.examples == reference(tokenizer, messages, tools, family.end), kind
        if kind in ("single", "multi", "system"):
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            # Split replies come after the whole conversation (which keeps the last one).
            if result.is_split:
                replies = replies[-1:] + replies[:-1]
            assert trained_texts(tokenizer, result.examples) == [family.reply.format(r) for r in replies], kind


def test_every_listed_family_has_a_template_and_a_source():
    listed = {path.stem for path in TEMPLATES.glob("*.jinja")}
    assert listed == set(FAMILIES)
    sources = (TEMPLATES / "SOURCES.md").read_text(encoding="utf-8")
    assert all(f"`{name}.jinja`" in sources for name in listed)


# --- unstable turns: Qwen3 -----------------------------------------------------------------------------

def test_qwen3_trains_each_reply_with_the_think_block_inference_writes(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "qwen3")
    rendered = render_conversation(tokenizer, [Q1, R1, Q2, R2])
    assert trained_texts(tokenizer, rendered.examples) == [
        f"<think>\n{THOUGHT2}\n</think>\n\n{A2['content']}<|im_end|>",
        f"<think>\n{THOUGHT1}\n</think>\n\n{A1['content']}<|im_end|>"]
    whole, alone = (tokenizer.decode(ids) for ids, _ in rendered.examples)
    # The whole conversation shows reply 1 as history does at inference: without its reasoning.
    assert f"assistant\n{A1['content']}<|im_end|>" in whole and THOUGHT1 not in whole
    # Reply 1's own example is the prompt before it and the reply, nothing after.
    assert alone == tokenizer.apply_chat_template([Q1, R1], tokenize=False)
    # reasoning_content is passed as the field Qwen3 reads: the same examples.
    assert render_conversation(tokenizer, [Q1, F1, Q2, F2]).examples == rendered.examples


def test_refuse_policy_and_the_last_reply_alone(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "qwen3")
    with pytest.raises(TemplateError, match=r'messages\[1\] differently once later messages follow.*'
                                            r'profile.unstable_turns = "split"'):
        render_conversation(tokenizer, [Q1, R1, Q2, R2], unstable_turns="refuse")
    # The last reply is the final turn as it stands: nothing to split, but reply 1's reasoning is in no example.
    last = render_conversation(tokenizer, [Q1, R1, Q2, R2], train_on="last_assistant", unstable_turns="refuse")
    assert not last.is_split and last.dropped == "messages[1] (its reasoning)"


def test_a_conversation_ending_on_a_user_turn_keeps_only_the_split_replies(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "qwen3")
    rendered = render_conversation(tokenizer, [Q1, A1, Q2])
    assert rendered.is_split and len(rendered.examples) == 1
    assert trained_texts(tokenizer, rendered.examples) == [f"<think>\n\n</think>\n\n{A1['content']}<|im_end|>"]


# --- tools ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "llama-3.1", "mistral-v0.3", "mistral-nemo"])
def test_tool_calls_are_trained_and_tool_results_and_schemas_are_not(base_tokenizer, name):
    tokenizer = family_tokenizer(base_tokenizer, name)
    rendered = render_conversation(tokenizer, [ASK, CALL, RESULT, ANSWER], tools=TOOLS)
    trained = trained_texts(tokenizer, rendered.examples)
    call = next(text for text in trained if "get_weather" in text)
    assert '"city": "Paris"' in call and call.endswith(FAMILIES[name].end)
    everything = "".join(tokenizer.decode(ids) for ids, _ in rendered.examples)
    assert "Get the weather in a city." in everything and "temperature" in everything  # shown to the model
    assert not any("Get the weather" in text or "temperature" in text for text in trained)  # never trained
    assert FAMILIES[name].reply.format(ANSWER["content"]) in trained  # the answer after the result, too


def test_a_template_without_tool_support_refuses_tool_records_clearly(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "gemma-3")
    with pytest.raises(RecordError, match="never reads `tools`, so the tool schemas would be dropped"):
        render_conversation(tokenizer, [ASK, CALL, RESULT, ANSWER], tools=TOOLS)
    with pytest.raises(RecordError, match=r"messages\[1\] has `tool_calls`, but the chat template never renders"):
        render_conversation(family_tokenizer(base_tokenizer, "granite-3.3"), [ASK, CALL, RESULT, ANSWER], tools=TOOLS)


# --- what templates drop --------------------------------------------------------------------------------

def test_dropped_system_prompt_and_ignored_reasoning_field_are_named(base_tokenizer):
    silent = family_tokenizer(base_tokenizer, "mistral-v0.3-2024-05")
    assert render_conversation(silent, [SYSTEM, Q1, A1]).dropped == "messages[0] (the system prompt)"
    assert render_conversation(family_tokenizer(base_tokenizer, "gemma-3"), [SYSTEM, Q1, A1]).dropped == ""
    llama = family_tokenizer(base_tokenizer, "llama-3")
    assert render_conversation(llama, [Q1, F1]).dropped == FIELD_DROPPED["reasoning_field"]
    assert render_conversation(llama, [Q1, R1]).dropped == ""  # inline reasoning is plain text to Llama 3
    # With {% generation %} markers too.
    marked = family_tokenizer(base_tokenizer, "qwen2.5")
    marked.chat_template = CHATML_GENERATION_TEMPLATE
    assert render_conversation(marked, [Q1, F1]).dropped == FIELD_DROPPED["reasoning_field"]


def test_deepseek_r1_distill_refuses_reasoning_it_strips_but_trains_plain_replies(base_tokenizer):
    tokenizer = family_tokenizer(base_tokenizer, "deepseek-r1-distill")
    with pytest.raises(TemplateError, match=r"drops the reasoning of the assistant reply messages\[1\] even when it is "
                                            "the final turn"):
        render_conversation(tokenizer, [Q1, F1])  # the field is passed inside the content, then stripped
    assert trained_texts(tokenizer, render_conversation(tokenizer, [Q1, A1]).examples) == [
        f"{A1['content']}<｜end▁of▁sentence｜>"]


# --- through the data pipeline ----------------------------------------------------------------------------

QWEN3_RECORDS = [{"messages": [Q1, R1, Q2, R2]}, {"messages": [SYSTEM, Q1, A1, Q2, A2]}, {"messages": [Q1, A1]}]


def test_qwen3_multi_turn_data_trains_under_the_default_settings_packed(make_job, tmp_path):
    config = make_job(tmp_path, records=QWEN3_RECORDS * 2, **{"data.chat_template": str(TEMPLATES / "qwen3.jinja"),
                                                              "data.packing": True, "data.max_length": 256})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    report = data.report
    assert (report.num_split, report.num_split_examples) == (4, 8)
    assert report.num_train_examples + report.num_validation_examples == 10
    expected = [example for record in QWEN3_RECORDS * 2
                for example in render_conversation(tokenizer, record["messages"]).examples]
    assert report.num_trained_tokens == sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in expected)
    assert report.num_split_tokens - report.num_unsplit_tokens > 0
    assert "unstable turns: 4 record(s) became 8 examples" in report.format()
    packed = pack(data.train, 256)
    assert sum(len(row) for row in packed["input_ids"]) == report.num_tokens


def test_a_split_conversation_is_held_out_whole_or_not_at_all(make_job, tmp_path):
    # Each reasoning record becomes 2 examples; a validation split chosen by example alone would train
    # on one half of some conversations and evaluate on the other.
    records = [{"messages": [Q1, {**R1, "content": R1["content"] + f" ({i})"}, Q2, R2]} for i in range(20)]
    config = make_job(tmp_path, records=records, **{"data.chat_template": str(TEMPLATES / "qwen3.jinja"),
                                                    "monitoring.validation_split": 0.3, "data.shuffle": False})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)

    def conversations(rows) -> list[str]:  # which record a row is from: its first reply's number
        return [tokenizer.decode(row["input_ids"]).split("Paris. (")[1].split(")")[0] for row in rows]

    trained, held_out = conversations(data.train), conversations(data.validation)
    assert len(trained) + len(held_out) == 40 and len(held_out) >= 12
    assert not set(trained) & set(held_out)
    assert all(held_out.count(i) == 2 for i in held_out)


def test_refuse_is_the_setting_s_clear_error(make_job, tmp_path):
    config = make_job(tmp_path, records=QWEN3_RECORDS, **{"data.chat_template": str(TEMPLATES / "qwen3.jinja"),
                                                          "profile.unstable_turns": "refuse"})
    with pytest.raises(DataError, match=r"train.jsonl:1: the chat template renders the assistant reply messages\[1\]"):
        build_datasets(config, load_tokenizer(config))


def test_validate_warns_about_dropped_reasoning_and_reports_splits(make_job, tmp_path, capsys):
    from launcher.cli import main

    make_job(tmp_path, records=[{"messages": [Q1, F1]}, {"messages": [Q1, A1]}])
    assert main(["validate", str(tmp_path / "job.toml")]) == 0
    out = capsys.readouterr().out
    assert "1 record(s) hold content the chat template drops" in out
    assert f"{tmp_path / 'train.jsonl'}:1: messages[1].reasoning_content (the template never reads it)" in out
    assert "the job is valid, with 1 warning(s) about the data above." in out

    make_job(tmp_path / "qwen3", records=QWEN3_RECORDS, **{"data.chat_template": str(TEMPLATES / "qwen3.jinja")})
    assert main(["validate", str(tmp_path / "qwen3" / "job.toml")]) == 0
    assert "unstable turns: 2 record(s) became 4 examples" in capsys.readouterr().out


def test_tool_records_reach_the_template_from_the_chat_profile(make_job, tmp_path):
    record = {"messages": [ASK, CALL, RESULT, ANSWER], "tools": TOOLS}
    config = make_job(tmp_path, records=[record, record], **{"data.chat_template": str(TEMPLATES / "qwen2.5.jinja")})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    expected = render_conversation(tokenizer, record["messages"], tools=TOOLS).examples[0]
    rows = list(data.train) + (list(data.validation) if data.validation is not None else [])
    assert (rows[0]["input_ids"], rows[0]["labels"]) == expected
    assert "Get the weather in a city." in tokenizer.decode(expected[0])
