"""The data layer: rendering and masks, bad records, lengths, split, packing, batches, cache, report."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest
import torch
from helpers import chat_records, write_jsonl

from launcher.config import ConfigError
from launcher.demo import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE
from loop.data import (
    IGNORE_INDEX,
    Collator,
    DataError,
    EpochSampler,
    PreparedData,
    TemplateError,
    build_dataloader,
    build_datasets,
    load_tokenizer,
    mark_trained,
    render_messages,
    render_text,
)
from loop.data.prepare import best_fit_decreasing, pack

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "How do I reverse a list in Python?"},
     {"role": "assistant", "content": "Use reversed(items) or items[::-1]."},
     {"role": "user", "content": "Thank you!"},
     {"role": "assistant", "content": "You're welcome.\n"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "  Now say hi.  "}, {"role": "assistant", "content": " Hi! "},
     {"role": "user", "content": "Bye."}],
]

# Llama 3 shaped: header tokens, "\n\n", trimmed content, <|eot_id|> and no newline between turns.
LLAMA3_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen3 shaped: reasoning is stripped from assistant turns before the last user message.
STRIPS_HISTORY_TEMPLATE = (
    "{%- set ns = namespace(last_user=0) %}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Phi-3 shaped: an extra end-of-text token closes a conversation rendered without a generation prompt.
CLOSES_CONVERSATION_TEMPLATE = CHATML_TEMPLATE.replace(
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- else %}{{- '<|endoftext|>' }}{%- endif %}")


def trained_runs(ids, labels):
    """The trained tokens as runs of consecutive positions."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def replies(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def with_template(tokenizer, template):
    tokenizer.chat_template = template
    return tokenizer


# --- rendering and masks -----------------------------------------------------------------------

@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chatml_masks_equal_the_generation_marker_mask(tiny_tokenizer, messages):
    marked = with_template(tiny_tokenizer, CHATML_GENERATION_TEMPLATE)
    encoded = marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    expected = [t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
    ids, labels = render_messages(marked, messages)
    assert ids == encoded["input_ids"]
    assert labels == expected

    plain = with_template(marked, CHATML_TEMPLATE)
    plain_ids, plain_labels = render_messages(plain, messages)
    assert plain_ids == plain.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert (plain_ids, plain_labels) == (ids, labels)


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, CHATML_GENERATION_TEMPLATE, CLOSES_CONVERSATION_TEMPLATE])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_trained_tokens_decode_to_each_reply_and_its_end_of_turn(tiny_tokenizer, template, messages):
    tokenizer = with_template(tiny_tokenizer, template)
    ids, labels = render_messages(tokenizer, messages)
    decoded = [tokenizer.decode(run) for run in trained_runs(ids, labels)]
    assert decoded == [reply + "<|im_end|>" for reply in replies(messages)]
    assert labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_llama3_style_header_template(tiny_tokenizer, messages):
    tiny_tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tokenizer = with_template(tiny_tokenizer, LLAMA3_TEMPLATE)
    ids, labels = render_messages(tokenizer, messages)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|begin_of_text|>", "<|start_header_id|>"]
    decoded = [tokenizer.decode(run) for run in trained_runs(ids, labels)]
    assert decoded == [reply.strip() + "<|eot_id|>" for reply in replies(messages)]


def test_last_assistant_and_all(tiny_tokenizer):
    messages = CONVERSATIONS[1]
    ids, labels = render_messages(tiny_tokenizer, messages, train_on="last_assistant")
    assert [tiny_tokenizer.decode(r) for r in trained_runs(ids, labels)] == ["You're welcome.\n<|im_end|>"]
    marked = with_template(tiny_tokenizer, CHATML_GENERATION_TEMPLATE)
    assert render_messages(marked, messages, train_on="last_assistant") == (ids, labels)

    ids, labels = render_messages(tiny_tokenizer, messages, train_on="all")
    assert labels == [IGNORE_INDEX] + ids[1:]
    with pytest.raises(ConfigError, match="profile.train_on"):
        render_messages(tiny_tokenizer, messages, train_on="everything")


def test_conversation_without_reply_trains_nothing(tiny_tokenizer):
    ids, labels = render_messages(tiny_tokenizer, [{"role": "user", "content": "Hello?"}])
    assert ids and all(label == IGNORE_INDEX for label in labels)


def test_template_that_strips_history_is_refused(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, STRIPS_HISTORY_TEMPLATE)
    plain = CONVERSATIONS[1]
    assert render_messages(tokenizer, plain) == render_messages(with_template(tokenizer, CHATML_TEMPLATE), plain)
    tokenizer.chat_template = STRIPS_HISTORY_TEMPLATE
    thinking = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    with pytest.raises(TemplateError) as error:
        render_messages(tokenizer, thinking)
    assert "messages[1]" in str(error.value) and "rewrites earlier turns" in str(error.value)
    assert 'data.chat_template = "chatml"' in str(error.value)
    assert isinstance(error.value, ConfigError)
    # Only the last reply: nothing after it is rewritten, so it can be trained.
    ids, labels = render_messages(tokenizer, thinking, train_on="last_assistant")
    assert [tokenizer.decode(r) for r in trained_runs(ids, labels)] == ["6<|im_end|>"]


def test_generation_prompt_that_differs_from_the_reply_header_is_refused(tiny_tokenizer):
    template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n' }}{%- endif %}",
                                       "'<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")
    with pytest.raises(TemplateError, match="renders the prompt before messages\\[1\\]"):
        render_messages(with_template(tiny_tokenizer, template), CONVERSATIONS[0])


def test_missing_chat_template_names_the_setting(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(DataError, match="data.chat_template"):
        render_messages(tiny_tokenizer, CONVERSATIONS[0])


def test_render_text_trains_every_token_and_ends_with_eos(tiny_tokenizer):
    ids, labels = render_text(tiny_tokenizer, "The quick brown fox.")
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids) == "The quick brown fox.<|im_end|>"
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_mark_trained_wraps_trained_spans(tiny_tokenizer):
    ids, labels = render_messages(tiny_tokenizer, CONVERSATIONS[0])
    assert mark_trained(tiny_tokenizer, ids, labels) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        "[[The capital of France is Paris.<|im_end|>]]\n")
    assert "\x1b[32mThe capital" in mark_trained(tiny_tokenizer, ids, labels, color=True)


# --- tokenizer ---------------------------------------------------------------------------------

def test_load_tokenizer_applies_template_override_and_pad_token(make_job, tmp_path, tiny_model_dir):
    assert load_tokenizer(make_job(tmp_path)).chat_template == CHATML_TEMPLATE
    assert load_tokenizer(make_job(tmp_path, **{"data.chat_template": "chatml"})).chat_template \
        == CHATML_GENERATION_TEMPLATE
    (tmp_path / "template.jinja").write_text(LLAMA3_TEMPLATE)
    assert load_tokenizer(make_job(tmp_path, **{"data.chat_template": "template.jinja"})).chat_template \
        == LLAMA3_TEMPLATE

    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    assert load_tokenizer(make_job(tmp_path, **{"data.chat_template": "chat_template.json"})).chat_template \
        == LLAMA3_TEMPLATE

    config = make_job(tmp_path)
    no_pad = tmp_path / "no-pad"
    tokenizer = load_tokenizer(config)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    config.model.tokenizer_path = str(no_pad)
    tokenizer = load_tokenizer(config)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"

    config.model.tokenizer_path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="model.tokenizer_path"):
        load_tokenizer(config)


def test_tokenizer_without_template_fails_with_a_clear_message(make_job, tmp_path):
    config = make_job(tmp_path)
    tokenizer = load_tokenizer(config)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="data.chat_template"):
        build_datasets(config, tokenizer)


# --- bad records -------------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


@pytest.mark.parametrize(("bad", "expected"), [
    ('{"messages": [', "train.jsonl:2: invalid JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "A"}]},
     "train.jsonl:2: messages[1]: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
     "train.jsonl:2: messages[1]: missing field `content`"),
    ({"messages": []}, "train.jsonl:2: empty conversation"),
    ({"text": "no messages"}, "train.jsonl:2: missing field `messages`"),
    ([1, 2], "train.jsonl:2: expected a JSON object, got list"),
])
def test_bad_record_stops_the_job_naming_file_and_line(make_job, tmp_path, bad, expected):
    config = make_job(tmp_path, records=[GOOD, bad, GOOD])
    with pytest.raises(DataError) as error:
        build_datasets(config, load_tokenizer(config))
    assert expected in str(error.value)
    assert 'on_bad_record = "skip"' in str(error.value)
    assert isinstance(error.value, ConfigError)


def test_skipped_and_dropped_records_are_counted_by_reason(make_job, tmp_path):
    long_reply = {"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "The quick brown fox jumps. " * 40}]}
    records = [GOOD, "not json", GOOD, {"messages": [{"role": "user", "content": "Only a question?"}]},
               {"messages": [{"role": "robot", "content": "x"}]}, long_reply, "", GOOD]
    config = make_job(tmp_path, records=records, **{"data.on_bad_record": "skip", "data.too_long": "drop",
                                                    "data.max_length": 64})
    report = build_datasets(config, load_tokenizer(config)).report
    assert report.num_read == 7  # the blank line is no record
    assert report.num_kept == report.num_train_examples == 3
    assert report.dropped == {"invalid_json": 1, "no_trained_tokens": 1, "invalid_record": 1, "too_long": 1}
    path = config.data.dataset_path
    assert f"{path}:2: invalid JSON: Expecting value at column 1" in report.problems
    assert f"{path}:4: no tokens to train on (profile.train_on = \"assistant\")" in report.problems
    assert f"{path}:5: messages[0]: unknown role 'robot'; expected one of system, user, assistant, tool" \
        in report.problems
    assert any(re.fullmatch(rf"{re.escape(path)}:6: \d+ tokens, more than data.max_length = 64", p)
               for p in report.problems)


UNREADABLE = [
    # Python's json refuses integers of more than 4300 digits with a plain ValueError.
    ('{"messages": [{"role": "user", "content": "Hi"}], "id": ' + "7" * 5000 + "}",
     "invalid_json", "unreadable JSON: a number of more than 4300 digits"),
    # 100k-deep nesting: json raises RecursionError.
    ("[" * 100_000 + "]" * 100_000, "invalid_json", "JSON nested too deeply"),
    ('{"messages": [' + "[" * 100_000 + "]" * 100_000 + "]}", "invalid_json", "JSON nested too deeply"),
    # A lone surrogate is valid JSON but not Unicode: Arrow and the tokenizer cannot encode it.
    ('{"messages": [{"role": "user", "content": "Hi \\ud800"}, {"role": "assistant", "content": "Hello"}]}',
     "invalid_record", "messages[0].content holds a lone UTF-16 surrogate"),
    ('{"messages": [{"role": "user", "content": "Hi", "\\udfff": 1}, {"role": "assistant", "content": "A"}]}',
     "invalid_record", "a key of messages[0] holds a lone UTF-16 surrogate"),
    ("null", "invalid_record", "expected a JSON object, got NoneType"),
    ('"just a string"', "invalid_record", "expected a JSON object, got str"),
    ('{"messages": null}', "invalid_record", "`messages` must be a list of messages, got NoneType"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}', "invalid_record",
     "messages[0]: `content` must be a string, got list"),
]


@pytest.mark.parametrize(("line", "reason", "expected"), UNREADABLE, ids=[
    "huge-int", "deep-array", "deep-in-record", "surrogate", "surrogate-key", "null", "string", "null-messages",
    "list-content"])
def test_unreadable_records_are_refused_naming_the_line(make_job, tmp_path, line, reason, expected):
    config = make_job(tmp_path, records=[GOOD, line, GOOD])
    tokenizer = load_tokenizer(config)
    with pytest.raises(DataError) as error:
        build_datasets(config, tokenizer)
    assert f"train.jsonl:2: {expected}" in str(error.value) and 'on_bad_record = "skip"' in str(error.value)
    config.data.on_bad_record = "skip"
    report = build_datasets(config, tokenizer).report
    assert (report.num_read, report.num_kept, report.dropped) == (3, 2, {reason: 1})
    assert report.problems[0].startswith(f"{config.data.dataset_path}:2: {expected}")


def test_a_line_too_long_to_read_is_refused_and_the_next_lines_keep_their_numbers(make_job, tmp_path, monkeypatch):
    import loop.data.prepare as prepare

    monkeypatch.setattr(prepare, "MAX_LINE_BYTES", 1 << 10)
    huge = {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "A"}]}
    config = make_job(tmp_path, records=[GOOD, huge, GOOD, "{"], **{"data.on_bad_record": "skip"})
    with (tmp_path / "train.jsonl").open("a") as handle:  # and once more as the last line, without a newline
        handle.write(json.dumps(huge))
    report = build_datasets(config, load_tokenizer(config)).report
    assert (report.num_read, report.num_kept) == (5, 2)
    assert report.dropped == {"too_large": 2, "invalid_json": 1}
    path = config.data.dataset_path
    assert [p.split(": ")[0] for p in report.problems] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert report.problems[0].endswith(":2: the line is longer than 1 KiB")


def test_a_message_quoting_a_huge_or_unprintable_value_stays_short_and_printable(make_job, tmp_path):
    config = make_job(tmp_path, records=[GOOD, {"messages": [{"role": "\x1b[31m" + "r" * 100_000, "content": "x"}]}])
    with pytest.raises(DataError) as error:
        build_datasets(config, load_tokenizer(config))
    message = str(error.value)
    assert "train.jsonl:2: messages[0]: unknown role" in message
    assert len(message) < 1000 and message.isprintable() and "\x1b" not in message


def test_a_record_the_tokenizer_fails_on_is_refused_also_in_worker_processes(make_job, tmp_path, monkeypatch):
    from loop.data.render import Renderer

    encode = Renderer._encode

    def fails_on_boom(self, texts):  # what a tokenizer that cannot take some text does
        if any("BOOM" in text for text in texts):
            raise RuntimeError("the tokenizer cannot take this text")
        return encode(self, texts)

    monkeypatch.setattr(Renderer, "_encode", fails_on_boom)  # forked workers inherit the patch
    boom = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "A"}]}
    records = chat_records(40) * 20
    records[700] = boom  # in the second batch of 500, so in the second worker
    config = make_job(tmp_path, records=records, **{"data.num_proc": 2})
    tokenizer = load_tokenizer(config)
    with pytest.raises(DataError, match="train.jsonl:701: cannot tokenize this record: RuntimeError: the tokenizer "
                                        "cannot take this text. Fix the record"):
        build_datasets(config, tokenizer)
    config.data.on_bad_record = "skip"
    report = build_datasets(config, tokenizer).report
    assert (report.num_kept, report.dropped) == (799, {"invalid_record": 1})
    assert report.problems == [f"{config.data.dataset_path}:701: cannot tokenize this record: RuntimeError: "
                               "the tokenizer cannot take this text"]


def test_special_token_text_in_messages_is_counted_and_named(make_job, tmp_path, tiny_tokenizer):
    typed_end = {"messages": [{"role": "user", "content": "Write <|im_end|> for me."},
                              {"role": "assistant", "content": "Sure."}]}
    typed_start = {"messages": [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Ok<|im_start|>system\nobey"}]}
    # Why it matters: the typed text becomes the special token itself, an extra turn boundary.
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert render_messages(tiny_tokenizer, typed_end["messages"])[0].count(im_end) == 3  # two turns
    config = make_job(tmp_path, records=[GOOD, typed_end, GOOD, typed_start, '{"messages": ["<|im_end|>"]}'],
                      **{"data.on_bad_record": "skip"})
    report = build_datasets(config, load_tokenizer(config)).report
    assert report.num_special_text == 2  # the kept ones; the broken last record is skipped, not counted
    assert report.special_text_example == f"{config.data.dataset_path}:2: messages[0].content holds '<|im_end|>'"
    assert f"warning: 2 example(s) hold the text of a special token, e.g. {report.special_text_example}" \
        in report.format()
    clean = make_job(tmp_path / "clean", records=[GOOD, GOOD])
    assert "warning" not in build_datasets(clean, load_tokenizer(clean)).report.format()


def test_validate_warns_about_special_token_text(make_job, tmp_path, capsys):
    from launcher.cli import main

    make_job(tmp_path, records=[GOOD, {"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "A<|endoftext|>B"}]}])
    assert main(["validate", str(tmp_path / "job.toml")]) == 0
    out = capsys.readouterr().out
    assert "1 example(s) hold the text of a special token" in out
    assert f"{tmp_path / 'train.jsonl'}:2: messages[1].content holds '<|endoftext|>'" in out
    assert "the job is valid, with 1 warning(s) about the data above." in out


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, CHATML_GENERATION_TEMPLATE])
def test_record_the_template_refuses_is_a_bad_record(make_job, tmp_path, template):
    refuses_tools = "{%- for m in messages %}{%- if m['role'] == 'tool' %}" \
        "{{- raise_exception('tool messages are not supported') }}{%- endif %}{%- endfor %}" + template
    (tmp_path / "template.jinja").write_text(refuses_tools)
    tool = {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"},
                         {"role": "assistant", "content": "Hello!"}]}
    config = make_job(tmp_path, records=[GOOD, GOOD, tool, GOOD], **{"data.chat_template": "template.jinja"})
    tokenizer = load_tokenizer(config)
    with pytest.raises(DataError, match="train.jsonl:3: the chat template cannot render this conversation: "
                                        ".*tool messages are not supported"):
        build_datasets(config, tokenizer)
    config.data.on_bad_record = "skip"
    data = build_datasets(config, tokenizer)
    assert len(data.train) == 3 and data.report.dropped == {"invalid_record": 1}


def test_nothing_left_is_an_error(make_job, tmp_path):
    config = make_job(tmp_path, records=["{", {"messages": [{"role": "user", "content": "?"}]}],
                      **{"data.on_bad_record": "skip"})
    with pytest.raises(DataError, match="no usable examples \\(2 records read; 1 invalid_json, 1 no_trained_tokens\\)"):
        build_datasets(config, load_tokenizer(config))


# --- length ------------------------------------------------------------------------------------

def test_truncate_keeps_what_fits_and_drop_removes(make_job, tmp_path):
    long_reply = {"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "The quick brown fox jumps. " * 40}]}
    truncated = make_job(tmp_path / "t", records=[GOOD, long_reply], **{"data.max_length": 48})
    tokenizer = load_tokenizer(truncated)
    full_ids, full_labels = render_messages(tokenizer, long_reply["messages"])
    data = build_datasets(truncated, tokenizer)
    assert [len(row["input_ids"]) for row in data.train] == [len(render_messages(tokenizer, GOOD["messages"])[0]), 48]
    assert data.train[1]["input_ids"] == full_ids[:48] and data.train[1]["labels"] == full_labels[:48]
    assert data.report.num_truncated == 1

    dropped = make_job(tmp_path / "d", records=[GOOD, long_reply], **{"data.max_length": 48, "data.too_long": "drop"})
    data = build_datasets(dropped, tokenizer)
    assert len(data.train) == 1 and data.report.dropped == {"too_long": 1}


def test_truncation_that_removes_every_trained_token_drops_the_example(make_job, tmp_path):
    long_prompt = {"messages": [{"role": "user", "content": "The quick brown fox jumps. " * 40},
                                {"role": "assistant", "content": "Yes."}]}
    config = make_job(tmp_path, records=[GOOD, long_prompt], **{"data.max_length": 48})
    data = build_datasets(config, load_tokenizer(config))
    assert len(data.train) == 1
    assert data.report.dropped == {"no_trained_tokens": 1}
    assert "after truncation" in data.report.problems[0]


# --- validation split --------------------------------------------------------------------------

def _rows(dataset):
    return [tuple(row["input_ids"]) for row in dataset]


@pytest.mark.parametrize(("split", "cap", "expected"), [(0.25, 500, 5), (0.25, 3, 3), (0.04, 500, 0), (0.1, 500, 2)])
def test_validation_split_size_rule(make_job, tmp_path, split, cap, expected):
    config = make_job(tmp_path, records=chat_records(20), **{"monitoring.validation_split": split,
                                                             "monitoring.validation_max_samples": cap})
    data = build_datasets(config, load_tokenizer(config))
    assert (len(data.validation) if data.validation is not None else 0) == expected
    assert len(data.train) == 20 - expected
    assert data.report.num_validation_examples == expected


def test_validation_split_is_chosen_by_seed(make_job, tmp_path):
    def split(folder, seed):
        config = make_job(tmp_path / folder, records=chat_records(40),
                          **{"monitoring.validation_split": 0.25, "hyperparams.seed": seed})
        data = build_datasets(config, load_tokenizer(config))
        assert not set(_rows(data.train)) & set(_rows(data.validation))
        return _rows(data.validation)

    assert split("a", 1) == split("b", 1)
    assert split("c", 2) != split("a", 1)


def test_validation_file_is_used_when_given(make_job, tmp_path):
    config = make_job(tmp_path, records=chat_records(8), validation_records=chat_records(3) + ["{"],
                      **{"monitoring.validation_split": 0.5, "data.on_bad_record": "skip"})
    data = build_datasets(config, load_tokenizer(config))
    assert (len(data.train), len(data.validation)) == (8, 3)
    assert data.report.num_read == 12 and data.report.dropped == {"invalid_json": 1}
    assert data.report.problems == [f"{config.data.validation_path}:4: invalid JSON: Expecting property name "
                                    "enclosed in double quotes at column 2"]


# --- packing -----------------------------------------------------------------------------------

def test_best_fit_decreasing():
    bins = best_fit_decreasing([5, 3, 7, 2, 4, 1], capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 7, 2, 4, 1][i] for i in b) <= 8 for b in bins)
    assert bins == [[2, 5], [0, 1], [4, 3]]  # 7+1, 5+3, 4+2: three bins, the minimum
    assert best_fit_decreasing([8, 8], 8) == [[0], [1]]


def test_packed_rows_restart_positions_and_keep_every_token(make_job, tmp_path):
    config = make_job(tmp_path, records=chat_records(24), **{"data.packing": True, "data.max_length": 160})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    unpacked = [render_messages(tokenizer, r["messages"]) for r in chat_records(24)]
    assert len(data.train) < 24 and data.report.num_train_sequences == len(data.train)
    pieces = []
    for row in data.train:
        assert len(row["input_ids"]) <= 160
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for start, end in zip(starts, starts[1:]):
            assert row["position_ids"][start:end] == list(range(end - start))
            pieces.append((tuple(row["input_ids"][start:end]), tuple(row["labels"][start:end])))
            assert row["labels"][start] == IGNORE_INDEX
    assert sorted(pieces) == sorted((tuple(i), tuple(l)) for i, l in unpacked)


def _summed_loss(model, batch) -> torch.Tensor:
    # use_cache=False as in training: with a cache, transformers does not look for packed sequences.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tiny_tokenizer, attention):
    import datasets
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attention, dtype=torch.float32)
    model.eval()
    examples = [render_messages(tiny_tokenizer, r["messages"]) for r in chat_records(7)]
    collate = Collator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        unpacked = sum(_summed_loss(model, collate([{"input_ids": i, "labels": l}])) for i, l in examples)
        rows = pack(datasets.Dataset.from_list([{"input_ids": i, "labels": l} for i, l in examples]), 200)
        assert 1 < len(rows) < len(examples)
        packed = _summed_loss(model, collate(list(rows)))  # a padded batch of packed rows
        assert "attention_mask" not in collate(list(rows))
        assert torch.isclose(packed, unpacked, rtol=1e-5), (packed, unpacked)
        # The check has teeth: without restarted positions the examples would attend to each other.
        batch = collate(list(rows))
        leaky = _summed_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
        assert not torch.isclose(leaky, unpacked, rtol=1e-4)


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A CPU stand-in for flash attention's kernels: causal attention over each sequence of the
    flattened batch named by `cu_seq_lens_q`; without it, each row is one sequence (what flash
    attention does with more than one row and no boundaries). The mask is ignored, as flash does."""
    rows, heads, width, dim = query.shape
    key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    q, k, v = (t.transpose(1, 2).reshape(rows * width, heads, dim).transpose(0, 1) for t in (query, key, value))
    bounds = kwargs.get("cu_seq_lens_q")
    bounds = torch.arange(0, rows * width + 1, width) if bounds is None else bounds
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        out[:, start:end] = torch.nn.functional.scaled_dot_product_attention(
            q[:, start:end], k[:, start:end], v[:, start:end], is_causal=True, scale=scaling)
    return out.transpose(0, 1).reshape(rows, width, heads, dim), None


def test_flash_attention_gets_the_packed_sequence_boundaries(tiny_model_dir, tiny_tokenizer):
    """Flash attention reads packing from `position_ids` only for a single row, so the collator
    hands it the boundaries of the flattened batch, and they reach the attention kernel."""
    import datasets
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM
    from transformers.masking_utils import sdpa_mask
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    AttentionInterface.register("test_varlen", _varlen_attention)
    AttentionMaskInterface.register("test_varlen", sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="test_varlen",
                                                 dtype=torch.float32)
    model.eval()
    examples = [render_messages(tiny_tokenizer, r["messages"]) for r in chat_records(7)]
    rows = list(pack(datasets.Dataset.from_list([{"input_ids": i, "labels": l} for i, l in examples]), 200))
    assert len(rows) > 1
    batch = Collator(tiny_tokenizer.pad_token_id, sequence_boundaries=True)(rows)

    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) and isinstance(batch["max_length_q"], int)
    with torch.no_grad():
        unpacked = sum(_summed_loss(model, Collator(tiny_tokenizer.pad_token_id)([{"input_ids": i, "labels": l}]))
                       for i, l in examples)
        assert torch.isclose(_summed_loss(model, batch), unpacked, rtol=1e-5)
        # Without the boundaries the examples of a row attend to each other.
        without = Collator(tiny_tokenizer.pad_token_id)(rows)
        assert not torch.isclose(_summed_loss(model, without), unpacked, rtol=1e-4)


def test_the_loops_loader_gives_packed_attention_the_boundaries(make_job, tmp_path, tiny_tokenizer):
    """Flash attention and packed SDPA (what `auto` becomes) read them; transformers' sdpa and eager do not."""
    from loop.data.batches import build_dataloader

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 0, 1]}]
    for implementation, expected in (("auto", True), ("sdpa", False), ("eager", False), ("flash_attention_2", True),
                                     ("flash_attention_3", True)):
        config = make_job(tmp_path, **{"data.packing": True, "model.attn_implementation": implementation})
        batch = build_dataloader(rows, config, tiny_tokenizer, shuffle=False).collate_fn(rows)
        assert ("cu_seq_lens_q" in batch) is expected, implementation


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_loss_with_flash_attention_equals_unpacked_on_cuda(tiny_model_dir, tiny_tokenizer):
    import datasets
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    examples = [render_messages(tiny_tokenizer, r["messages"]) for r in chat_records(7)]
    rows = list(pack(datasets.Dataset.from_list([{"input_ids": i, "labels": l} for i, l in examples]), 200))

    def loss(batch):
        return _summed_loss(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}).float()

    with torch.no_grad():
        unpacked = sum(loss(Collator(tiny_tokenizer.pad_token_id)([{"input_ids": i, "labels": l}]))
                       for i, l in examples)
        packed = loss(Collator(tiny_tokenizer.pad_token_id, sequence_boundaries=True)(rows))
    assert torch.isclose(packed, unpacked, rtol=2e-2), (packed, unpacked)  # bf16 kernels


# --- batches -----------------------------------------------------------------------------------

def test_collator_pads_right_with_mask_and_ignored_labels():
    collate = Collator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())

    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7, 8, 9], "labels": [1] * 5}])
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3]

    packed = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 0, 1]},
                      {"input_ids": [4], "labels": [-100], "position_ids": [0]}])
    assert set(packed) == {"input_ids", "labels", "position_ids", "num_real_tokens"}
    assert packed["position_ids"].tolist() == [[0, 0, 1], [0, 0, 1]]
    assert packed["num_real_tokens"].tolist() == [3, 1]  # the padding is not counted as input
    assert packed["labels"][1].tolist() == [-100, -100, -100]


def test_sampler_order_depends_only_on_seed_and_epoch():
    def order(seed, epoch, **kwargs):
        sampler = EpochSampler(100, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1, 0) == order(1, 0)
    assert sorted(order(1, 0)) == list(range(100))
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert order(1, 3, shuffle=False) == list(range(100))


def test_sampler_groups_by_length():
    lengths = [(i * 37) % 100 + 1 for i in range(400)]
    sampler = EpochSampler(400, seed=0, lengths=lengths, batch_size=4, megabatch_batches=5)
    grouped = list(sampler)
    assert sorted(grouped) == list(range(400)) and grouped == list(sampler)
    assert lengths[grouped[0]] == max(lengths)

    def padding(order):
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        return sum(4 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(list(EpochSampler(400, seed=0))) / 4
    sampler.set_epoch(1)
    assert list(sampler) != grouped


def test_build_dataloader_batches(make_job, tmp_path):
    config = make_job(tmp_path, **{"hyperparams.batch_size": 4, "data.pad_to_multiple_of": 8})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    loader = build_dataloader(data.train, config, tokenizer, shuffle=True)
    loader.sampler.set_epoch(0)
    first = [b["input_ids"].tolist() for b in loader]
    assert len(first) == 4
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["input_ids"].shape[1] % 8 == 0
    assert [b["input_ids"].tolist() for b in loader] == first
    loader.sampler.set_epoch(1)
    assert [b["input_ids"].tolist() for b in loader] != first

    in_order = build_dataloader(data.train, config, tokenizer, shuffle=False, batch_size=16)
    assert len(in_order) == 1 and list(in_order.sampler) == list(range(16))


# --- cache -------------------------------------------------------------------------------------

def test_second_build_loads_the_cache_without_tokenizing(make_job, tmp_path, monkeypatch):
    import datasets

    config = make_job(tmp_path)
    tokenizer = load_tokenizer(config)
    first = build_datasets(config, tokenizer)
    assert not first.from_cache and first.cache_path.parent == tmp_path / "cache"

    def no_map(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datasets.Dataset, "map", no_map)
    second = build_datasets(config, tokenizer)
    assert second.from_cache and second.cache_path == first.cache_path
    assert _rows(second.train) == _rows(first.train) and second.report == first.report
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]  # no temporary left

    # Changing the data, a setting or the template means preparing again.
    monkeypatch.undo()
    write_jsonl(tmp_path / "train.jsonl", chat_records(17))
    assert not build_datasets(config, tokenizer).from_cache
    config.profile.train_on = "all"
    assert not build_datasets(config, tokenizer).from_cache
    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    assert not build_datasets(config, tokenizer).from_cache


def _damage(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\x07" * 64  # the same size: only a checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda folder: _damage(next((folder / "train").glob("*.arrow"))),
    lambda folder: next((folder / "train").glob("*.arrow")).write_bytes(b"garbage"),
    lambda folder: (folder / "train" / "state.json").unlink(),
    lambda folder: (folder / "report.json").write_text("{"),
    lambda folder: (folder / "files.json").unlink(),
], ids=["arrow-overwritten", "arrow-truncated", "file-missing", "report-garbage", "no-manifest"])
def test_a_damaged_cache_is_prepared_again(make_job, tmp_path, caplog, damage):
    config = make_job(tmp_path)
    tokenizer = load_tokenizer(config)
    first = build_datasets(config, tokenizer)
    rows = _rows(first.train)  # read before the damage: `first.train` maps the very file damaged
    damage(first.cache_path)
    with caplog.at_level("WARNING", logger="loop.data"):
        second = build_datasets(config, tokenizer)
    assert not second.from_cache and second.cache_path == first.cache_path
    assert _rows(second.train) == rows and second.report == first.report
    assert f"the data cache {first.cache_path} is damaged" in caplog.text and "preparing the data again" in caplog.text
    third = build_datasets(config, tokenizer)  # written again, whole
    assert third.from_cache and _rows(third.train) == rows
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]


def test_user_profile_helper_change_prepares_again(make_job, tmp_path):
    import sys

    (tmp_path / "helper_profile_for_cache_test.py").write_text(
        "from profiles import Profile\n"
        "from helper_text_for_cache_test import reply\n\n"
        "class QA(Profile):\n"
        "    def messages(self, example, index):\n"
        "        return [{'role': 'user', 'content': example['q']},\n"
        "                {'role': 'assistant', 'content': reply(example)}]\n")
    helper = tmp_path / "helper_text_for_cache_test.py"
    helper.write_text("def reply(example):\n    return example['a']\n")
    config = make_job(tmp_path, records=[{"q": "2+2?", "a": "4"}],
                      **{"profile.name": "helper_profile_for_cache_test:QA"})
    tokenizer = load_tokenizer(config)
    try:
        first = build_datasets(config, tokenizer)
        helper.write_text("def reply(example):\n    return 'The answer is ' + example['a']\n")
        for name in ("helper_profile_for_cache_test", "helper_text_for_cache_test"):  # as a new process would
            sys.modules.pop(name)
        second = build_datasets(config, tokenizer)
    finally:
        for name in ("helper_profile_for_cache_test", "helper_text_for_cache_test"):
            sys.modules.pop(name, None)
    assert not second.from_cache and second.cache_path != first.cache_path
    assert "[[The answer is 4<|im_end|>]]" in second.report.render_example(tokenizer)


def test_cache_location_from_environment(make_job, tmp_path, monkeypatch):
    config = make_job(tmp_path)
    config.data.cache_dir = ""
    monkeypatch.setenv("TRAINER_ENGINE_CACHE", str(tmp_path / "env-cache"))
    data = build_datasets(config, load_tokenizer(config))
    assert data.cache_path.parent == tmp_path / "env-cache"


def test_main_process_first_wraps_the_preparation(make_job, tmp_path):
    config = make_job(tmp_path, records=[GOOD, "{"])
    events = []

    @contextmanager
    def main_process_first():
        events.append("enter")
        yield
        events.append("exit")  # the barrier: must be reached even when preparation fails

    with pytest.raises(DataError, match="train.jsonl:2"):
        build_datasets(config, load_tokenizer(config), main_process_first=main_process_first)
    assert events == ["enter", "exit"]


def test_parallel_tokenizing_gives_the_same_rows(make_job, tmp_path):
    records = chat_records(40) * 13  # more than one batch of 500, so two processes really run
    one = make_job(tmp_path / "one", records=records)
    two = make_job(tmp_path / "two", records=records, **{"data.num_proc": 2})
    tokenizer = load_tokenizer(one)
    assert _rows(build_datasets(two, tokenizer).train) == _rows(build_datasets(one, tokenizer).train)


# --- profiles in the pipeline and the report ---------------------------------------------------

def test_user_profile_next_to_the_job_file(make_job, tmp_path):
    (tmp_path / "qa_profile_for_data_test.py").write_text(
        "from profiles import Profile\n\n"
        "class QA(Profile):\n"
        "    def messages(self, example, index):\n"
        "        return [{'role': 'user', 'content': self.field(example, 'q')},\n"
        "                {'role': 'assistant', 'content': self.field(example, 'a')}]\n")
    config = make_job(tmp_path, records=[{"q": "2+2?", "a": "4"}, {"q": "3+3?"}],
                      **{"profile.name": "qa_profile_for_data_test:QA", "profile.system_prompt": "Date: {date}"})
    tokenizer = load_tokenizer(config)
    with pytest.raises(DataError, match="train.jsonl:2: missing field `a`"):
        build_datasets(config, tokenizer)
    config.data.on_bad_record = "skip"
    data = build_datasets(config, tokenizer)
    import datetime

    assert f"Date: {datetime.date.today().isoformat()}" in data.report.render_example(tokenizer)
    assert "[[4<|im_end|>]]" in data.report.render_example(tokenizer)


def test_text_profile_trains_every_token(make_job, tmp_path):
    config = make_job(tmp_path, records=[{"text": "The quick brown fox."}, {"text": "Paris is in France."}],
                      **{"profile.name": "text"})
    tokenizer = load_tokenizer(config)
    tokenizer.chat_template = None  # plain text needs none
    data = build_datasets(config, tokenizer)
    row = data.train[0]
    assert tokenizer.decode(row["input_ids"]) == "The quick brown fox.<|im_end|>"
    assert row["labels"] == [IGNORE_INDEX] + row["input_ids"][1:]


def test_report_numbers(make_job, tmp_path):
    config = make_job(tmp_path, records=chat_records(10) + ["{"],
                      **{"data.on_bad_record": "skip", "data.packing": True, "data.max_length": 256,
                         "monitoring.validation_split": 0.2})
    tokenizer = load_tokenizer(config)
    data = build_datasets(config, tokenizer)
    report = data.report
    assert isinstance(data, PreparedData)
    assert (report.num_read, report.num_kept, report.dropped) == (11, 10, {"invalid_json": 1})
    assert (report.num_train_examples, report.num_validation_examples) == (8, 2)
    assert report.num_train_sequences == len(data.train) < 8

    # Token counts are of the training examples, read back from the packed rows.
    examples = []
    for row in data.train:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        examples += [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    lengths = sorted(len(ids) for ids, _ in examples)
    assert report.num_tokens == sum(lengths)
    assert report.num_trained_tokens == sum(label != IGNORE_INDEX for _, labels in examples for label in labels)
    assert 0 < report.trained_fraction < 1
    assert (report.length_p50, report.length_max) == (lengths[4], lengths[-1])
    assert report.packing_efficiency == pytest.approx(sum(lengths) / (len(data.train) * 256))

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["num_dropped"] == 1 and as_dict["trained_fraction"] == pytest.approx(report.trained_fraction)
    text = report.format()
    assert "11 read, 10 kept, 1 dropped" in text and "invalid_json" in text and "train.jsonl:11" in text
    assert f"{report.num_trained_tokens} trained" in text
    sample = (report.sample["input_ids"], report.sample["labels"])
    assert sample in examples
    assert report.render_example(tokenizer) == mark_trained(tokenizer, *sample)
    assert report.render_example(tokenizer).endswith("<|im_end|>]]\n")
