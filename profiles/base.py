"""The profile base class: one JSONL record in, chat messages out.

A profile never touches a tokenizer or a file; it only reshapes a record. A custom one is a
subclass that implements `messages()` (10 lines, see `Profile`), referenced from the job file as
`[profile] name = "my_pkg.my_module:MyProfile"`.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class RecordError(ValueError):
    """A record the profile cannot turn into messages; the data loader adds the file and line."""


class Profile:
    """Turns one record into `{"messages": [{"role": ..., "content": ...}, ...]}`.

    Subclass it and implement `messages(example, index)`; the base class adds the configured
    system prompt. Randomness must come from a local RNG seeded by `index`, never the global one,
    so the same record always gives the same messages:

        import random
        from profiles import Profile

        class QuestionAnswer(Profile):
            '''Records like {"question": ..., "answer": ...}.'''
            greetings = ["Hi!", "Hello."]

            def messages(self, example, index):
                greeting = random.Random(index).choice(self.greetings)
                return [{"role": "user", "content": self.field(example, "question")},
                        {"role": "assistant", "content": greeting + " " + self.field(example, "answer")}]

    A profile may instead return `{"text": ...}` from `transform_example` (see `TextProfile`): the
    text is tokenized as is, without a chat template, and every token is trained.
    """

    override_system_prompt: bool = False
    """True: `profile.system_prompt` replaces a record's own system message; False: it fills in only
    where a record has none."""
    roles: tuple[str, ...] = ROLES
    """Roles a message may have; anything else is a bad record."""
    uses_chat_template: bool = True
    """False for profiles that return `{"text": ...}` (no chat template needed)."""

    def messages(self, example: dict[str, Any], index: int) -> list[dict[str, Any]]:
        """The record as a list of messages; raise `RecordError` for a malformed record."""
        raise NotImplementedError(f"{type(self).__name__} must implement messages(example, index)")

    def tools(self, example: dict[str, Any], index: int) -> list[dict[str, Any]] | None:
        """The JSON schemas of the tools the record's conversation may call, or None (the default: no tools).

        They reach the chat template as `apply_chat_template(..., tools=...)`; they are never trained.
        """
        return None

    def transform_example(self, example: dict[str, Any], index: int, system_prompt: str = "") -> dict[str, Any]:
        """`{"messages": [...]}` for one record, with `"tools": [...]` when it has tools; `index` is its
        position among the file's records (0-based)."""
        messages = self.messages(example, index)
        result = {"messages": with_system_prompt(messages, system_prompt, override=self.override_system_prompt)}
        tools = self.tools(example, index)
        if tools is not None:
            result["tools"] = tools
        return result

    # --- helpers for subclasses ---------------------------------------------------------------
    @staticmethod
    def field(example: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
        """`example[key]` as a string; a missing (when required) or non-string value is a `RecordError`."""
        if key not in example or example[key] is None:
            if required:
                present = ", ".join(f"`{k}`" for k in example) or "none"
                raise RecordError(f"missing field `{key}` (fields present: {present})")
            return default
        value = example[key]
        if not isinstance(value, str):
            raise RecordError(f"field `{key}` must be a string, got {type(value).__name__}")
        return value


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str, *, override: bool = False
                       ) -> list[dict[str, Any]]:
    """Put `system_prompt` first where there is no system message (or replace it when `override`)."""
    if not system_prompt or not isinstance(messages, list):
        return messages  # a malformed list is reported by `check_messages`, unchanged
    has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    if has_system and not override:
        return messages
    rest = messages[1:] if has_system else messages
    return [{"role": "system", "content": system_prompt}, *rest]


def check_messages(messages: Any, roles: tuple[str, ...] = ROLES) -> list[dict[str, Any]]:
    """Raise `RecordError` naming the message index unless `messages` is a usable conversation.

    Each message needs a known `role` and a string `content`; other keys (e.g. `tool_calls`) are kept
    for the chat template. An assistant message with `tool_calls` may have no content; each call is
    `{"function": {"name": ..., "arguments": {...} or a JSON string}}` (OpenAI style; `id` and `type` optional).
    """
    if not isinstance(messages, list):
        raise RecordError(f"`messages` must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RecordError("empty conversation: `messages` has no messages")
    for position, message in enumerate(messages):
        where = f"messages[{position}]"
        if not isinstance(message, dict):
            raise RecordError(f"{where}: expected an object with `role` and `content`, got {type(message).__name__}")
        if "role" not in message:
            raise RecordError(f"{where}: missing field `role`")
        role = message["role"]
        if role not in roles:
            raise RecordError(f"{where}: unknown role {role!r}; expected one of {', '.join(roles)}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None and calls != []:  # datasets often write an empty list on every message
            if role != "assistant":
                raise RecordError(f"{where}: only assistant messages may have `tool_calls`, not {role!r}")
            check_tool_calls(calls, where)
            if content is None:
                continue
        if "content" not in message:
            raise RecordError(f"{where}: missing field `content`")
        if not isinstance(content, str):
            raise RecordError(f"{where}: `content` must be a string, got {type(content).__name__}")
    return messages


def check_tool_calls(calls: Any, where: str) -> None:
    """Raise `RecordError` unless `calls` is a list of `{"function": {"name": str, "arguments": ...}}` (or of
    `{"name": str, "arguments": ...}`, which many templates also read)."""
    if not isinstance(calls, list):
        raise RecordError(f"{where}: `tool_calls` must be a list of calls, got {_kind(calls)}")
    for position, call in enumerate(calls):
        at = f"{where}.tool_calls[{position}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RecordError(f'{at}: expected {{"function": {{"name": ..., "arguments": ...}}}}, got {_kind(call)}')
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RecordError(f"{at}: the function's `name` must be a non-empty string")
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise RecordError(f"{at}: the function's `arguments` must be an object or a JSON string, "
                              f"got {_kind(function['arguments'])}")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """`tools` as a list of JSON-schema objects (a JSON string holding one is parsed); `RecordError` otherwise."""
    if isinstance(tools, str):  # many datasets store the schemas as a JSON string
        try:
            tools = json.loads(tools)
        except ValueError as error:
            raise RecordError(f"`tools` is a string but not JSON: {error}") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise RecordError(f"`tools` must be a list of JSON-schema objects, got {_kind(tools)}")
    return tools


def _kind(value: Any) -> str:
    return "a list of " + ", ".join(sorted({type(v).__name__ for v in value})) if isinstance(value, list) and value \
        else type(value).__name__
