"""Profiles: each built-in's transform, system prompts, validation messages, the registry."""

from __future__ import annotations

import datetime
import sys

import pytest

from launcher.config import ConfigError
from profiles import (
    Profile,
    RecordError,
    available_profiles,
    check_messages,
    fill_system_prompt,
    get_profile,
    profile_fingerprint,
)


def transform(name: str, record: dict, system_prompt: str = "", index: int = 0) -> dict:
    return get_profile(name).transform_example(record, index, system_prompt)


# --- built-ins ---------------------------------------------------------------------------------

def test_chat_passes_messages_through_and_keeps_extra_keys():
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
                {"role": "tool", "content": "42"}]
    record = {"messages": messages, "id": 7}
    assert transform("chat", record) == {"messages": messages}


def test_alpaca_joins_instruction_and_input():
    assert transform("alpaca", {"instruction": "Add.", "input": "2 and 2", "output": "4"}) == {"messages": [
        {"role": "user", "content": "Add.\n\n2 and 2"}, {"role": "assistant", "content": "4"}]}
    assert transform("alpaca", {"instruction": "Say hi.", "input": "", "output": "Hi"})["messages"][0] == \
        {"role": "user", "content": "Say hi."}
    assert transform("alpaca", {"instruction": "Say hi.", "output": "Hi"})["messages"][0]["content"] == "Say hi."


def test_sharegpt_maps_speaker_names_and_top_level_system():
    record = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "user", "value": "Q2"}, {"from": "chatgpt", "value": "A2"},
        {"from": "Human", "value": "Q3"}, {"from": "assistant", "value": "A3"}]}
    assert transform("sharegpt", record)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A3"}]


def test_completion_is_one_exchange():
    assert transform("completion", {"prompt": "2+2=", "completion": "4"}) == {"messages": [
        {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]}


def test_text_returns_text_and_needs_no_template():
    assert transform("text", {"text": "Once upon a time."}, system_prompt="ignored") == {"text": "Once upon a time."}
    assert get_profile("text").uses_chat_template is False


# --- system prompt -----------------------------------------------------------------------------

def test_system_prompt_is_inserted_where_missing_and_kept_where_present():
    own = {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]}
    none = {"messages": [{"role": "user", "content": "Hi"}]}
    assert transform("chat", own, "Configured.")["messages"][0]["content"] == "Own."
    assert transform("chat", none, "Configured.")["messages"] == [
        {"role": "system", "content": "Configured."}, {"role": "user", "content": "Hi"}]
    assert transform("alpaca", {"instruction": "I", "output": "O"}, "Configured.")["messages"][0]["role"] == "system"
    assert transform("chat", none, "")["messages"] == none["messages"]


def test_override_system_prompt_replaces_the_records_own():
    class Strict(Profile):
        override_system_prompt = True

        def messages(self, example, index):
            return [dict(m) for m in example["messages"]]

    own = {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]}
    assert Strict().transform_example(own, 0, "Configured.")["messages"] == [
        {"role": "system", "content": "Configured."}, {"role": "user", "content": "Hi"}]


def test_transform_does_not_edit_the_record():
    record = {"messages": [{"role": "user", "content": "Hi"}]}
    transform("chat", record, "Configured.")
    assert record == {"messages": [{"role": "user", "content": "Hi"}]}


def test_date_is_filled_into_the_system_prompt():
    assert fill_system_prompt("Today is {date}. {json: 1}", datetime.date(2025, 1, 31)) == \
        "Today is 2025-01-31. {json: 1}"
    assert fill_system_prompt("{date}") == datetime.date.today().isoformat()


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "record", "expected"), [
    ("chat", {"conversation": []}, "missing field `messages`"),
    ("alpaca", {"instruction": "I"}, "missing field `output`"),
    ("alpaca", {"instruction": 3, "output": "O"}, "field `instruction` must be a string, got int"),
    ("completion", {"prompt": "P"}, "missing field `completion`"),
    ("text", {"body": "x"}, "missing field `text`"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]},
     "conversations[1]: unknown `from` value 'bot'"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "conversations[0]: missing field `value`"),
    ("sharegpt", {"conversations": "hi"}, "`conversations` must be a list"),
])
def test_bad_records_raise_record_errors_that_say_what_is_wrong(name, record, expected):
    with pytest.raises(RecordError, match=_literal(expected)):
        transform(name, record)


@pytest.mark.parametrize(("messages", "expected"), [
    ([], "empty conversation"),
    ("hi", "`messages` must be a list"),
    ([{"role": "user", "content": "Q"}, "A"], "messages[1]: expected an object"),
    ([{"content": "Q"}], "messages[0]: missing field `role`"),
    ([{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}], "messages[1]: unknown role 'bot'"),
    ([{"role": "user"}], "messages[0]: missing field `content`"),
    ([{"role": "user", "content": ["a"]}], "messages[0]: `content` must be a string, got list"),
])
def test_check_messages_names_the_message(messages, expected):
    with pytest.raises(RecordError, match=_literal(expected)):
        check_messages(messages)


def test_malformed_messages_are_reported_as_such_with_a_system_prompt():
    example = transform("chat", {"messages": "hi"}, "Configured.")
    with pytest.raises(RecordError, match="`messages` must be a list of messages, got str"):
        check_messages(example["messages"])


def test_check_messages_accepts_tool_calls_without_content():
    check_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}])


def _literal(text: str) -> str:
    import re

    return re.escape(text)


# --- registry ----------------------------------------------------------------------------------

def test_unknown_profile_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        get_profile("alpacca")
    message = str(error.value)
    assert "profile.name" in message and "'alpacca'" in message
    for name in ("chat", "alpaca", "sharegpt", "completion", "text"):
        assert f'"{name}"' in message
    assert available_profiles() == ["alpaca", "chat", "completion", "sharegpt", "text"]


USER_MODULE = '''
import random
from profiles import Profile

IMPORTED = True

class QuestionAnswer(Profile):
    greetings = ["Hi!", "Hello.", "Hey."]

    def messages(self, example, index):
        greeting = random.Random(index).choice(self.greetings)
        return [{"role": "user", "content": self.field(example, "question")},
                {"role": "assistant", "content": greeting + " " + self.field(example, "answer")}]
'''


def test_user_profile_from_module_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_profiles_a.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    profile = get_profile("my_profiles_a:QuestionAnswer")
    first = profile.transform_example({"question": "Q", "answer": "A"}, 3, "Sys.")
    assert first["messages"][0] == {"role": "system", "content": "Sys."}
    assert first["messages"][1] == {"role": "user", "content": "Q"}
    assert first["messages"][2]["content"].endswith(" A")
    # Deterministic per index, and the global RNG is untouched.
    import random

    state = random.getstate()
    assert profile.transform_example({"question": "Q", "answer": "A"}, 3, "Sys.") == first
    assert random.getstate() == state
    replies = {profile.transform_example({"question": "Q", "answer": "A"}, i, "")["messages"][1]["content"]
               for i in range(20)}
    assert len(replies) > 1
    with pytest.raises(RecordError, match="missing field `answer`"):
        profile.transform_example({"question": "Q"}, 0, "")


def test_user_profile_found_next_to_the_job_file(tmp_path):
    (tmp_path / "my_profiles_b.py").write_text(USER_MODULE)
    profile = get_profile("my_profiles_b:QuestionAnswer", search_paths=[tmp_path])
    assert type(profile).__name__ == "QuestionAnswer"
    assert str(tmp_path) not in sys.path


def test_user_profile_errors_name_profile_name(tmp_path, monkeypatch):
    (tmp_path / "my_profiles_c.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="profile.name: module 'my_profiles_c' has no class 'Missing'; "
                                          "profiles in it: QuestionAnswer"):
        get_profile("my_profiles_c:Missing")
    with pytest.raises(ConfigError, match="profile.name: cannot import 'no_such_module_xyz'"):
        get_profile("no_such_module_xyz:Profile")
    with pytest.raises(ConfigError, match="profile.name: 'my_profiles_c:IMPORTED' is not a profile class"):
        get_profile("my_profiles_c:IMPORTED")


# --- the profile's code in the data cache's key --------------------------------------------------

def _fresh_profile(name: str, folder):
    """Import `name` again from `folder`, as a new process would after files changed."""
    import importlib

    importlib.invalidate_caches()
    for module in [m for m in sys.modules if m.split(".")[0] in ("fp_profile", "fp_helper", "fp_pkg")]:
        del sys.modules[module]
    return get_profile(name, search_paths=[folder])


@pytest.fixture
def forget_fingerprint_modules():
    yield
    for module in [m for m in sys.modules if m.split(".")[0] in ("fp_profile", "fp_helper", "fp_pkg")]:
        del sys.modules[module]


PROFILE_WITH_HELPER = (
    "from profiles import Profile\n"
    "from fp_helper import reply\n\n"
    "class QA(Profile):\n"
    "    def messages(self, example, index):\n"
    "        return [{'role': 'user', 'content': example['q']}, {'role': 'assistant', 'content': reply(example)}]\n")


def test_fingerprint_covers_a_helper_module_beside_the_profile(tmp_path, forget_fingerprint_modules):
    (tmp_path / "fp_profile.py").write_text(PROFILE_WITH_HELPER)
    (tmp_path / "fp_helper.py").write_text("def reply(example):\n    return example['a']\n")
    before = profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path))
    assert profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path)) == before  # stable
    (tmp_path / "fp_helper.py").write_text("def reply(example):\n    return 'A: ' + example['a']\n")
    assert profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path)) != before


def test_fingerprint_covers_a_helper_imported_only_when_called(tmp_path, forget_fingerprint_modules):
    (tmp_path / "fp_profile.py").write_text(PROFILE_WITH_HELPER.replace("from fp_helper import reply\n", "").replace(
        "        return", "        from fp_helper import reply\n        return"))
    (tmp_path / "fp_helper.py").write_text("def reply(example):\n    return example['a']\n")
    before = profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path))
    (tmp_path / "fp_helper.py").write_text("def reply(example):\n    return example['a'].upper()\n")
    assert profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path)) != before


def test_fingerprint_covers_a_package_and_a_helper_elsewhere(tmp_path, monkeypatch, forget_fingerprint_modules):
    package = tmp_path / "project" / "fp_pkg"
    (package / "profiles_of_mine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "profiles_of_mine" / "__init__.py").write_text("")
    (package / "text.py").write_text("SUFFIX = '!'\n")
    (package / "profiles_of_mine" / "qa.py").write_text(PROFILE_WITH_HELPER.replace(
        "from fp_helper import reply", "from fp_helper import reply\nfrom fp_pkg import text"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "fp_helper.py").write_text("def reply(example):\n    return example['a']\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    name = "fp_pkg.profiles_of_mine.qa:QA"
    before = profile_fingerprint(_fresh_profile(name, tmp_path / "project"))
    (package / "text.py").write_text("SUFFIX = '?'\n")  # a sibling module of the package
    after_sibling = profile_fingerprint(_fresh_profile(name, tmp_path / "project"))
    (elsewhere / "fp_helper.py").write_text("def reply(example):\n    return example['a'] + '.'\n")
    after_helper = profile_fingerprint(_fresh_profile(name, tmp_path / "project"))
    assert len({before, after_sibling, after_helper}) == 3


def test_fingerprint_ignores_location_and_files_that_are_no_code_of_the_profile(tmp_path, forget_fingerprint_modules):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "fp_profile.py").write_text(PROFILE_WITH_HELPER)
        (tmp_path / folder / "fp_helper.py").write_text("def reply(example):\n    return example['a']\n")
    before = profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path / "a"))
    # A moved project keeps its cache and its runs' data digest.
    assert profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path / "b")) == before
    # A run's output beside the job (a saved model with remote code), caches and hidden folders are no code of it.
    for folder in ("out/final", "cache/x", ".venv/lib"):
        (tmp_path / "a" / folder).mkdir(parents=True)
        (tmp_path / "a" / folder / "modeling_custom.py").write_text("x = 1\n")
    assert profile_fingerprint(_fresh_profile("fp_profile:QA", tmp_path / "a")) == before


def test_builtin_fingerprints_do_not_depend_on_files():
    assert profile_fingerprint(get_profile("chat")) == profile_fingerprint(get_profile("chat"))
    assert profile_fingerprint(get_profile("chat")) != profile_fingerprint(get_profile("alpaca"))
