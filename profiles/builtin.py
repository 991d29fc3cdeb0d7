"""The built-in profiles: chat, alpaca, sharegpt, completion, text.

    from profiles import get_profile
    get_profile("alpaca").transform_example({"instruction": "Add 2 and 2.", "output": "4"}, 0, "")
    # {"messages": [{"role": "user", "content": "Add 2 and 2."}, {"role": "assistant", "content": "4"}]}
"""

from __future__ import annotations

from typing import Any

from profiles.base import Profile, RecordError


class ChatProfile(Profile):
    """`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}], "tools": optional}`
    (OpenAI style: assistant messages may carry `tool_calls`, answered by `tool` messages)."""

    def messages(self, example, index):
        if "messages" not in example:
            raise RecordError(f"missing field `messages` (fields present: {', '.join(example) or 'none'})")
        # Shallow copies, so adding a system prompt never edits the caller's record.
        messages = example["messages"]
        return [dict(m) if isinstance(m, dict) else m for m in messages] if isinstance(messages, list) else messages

    def tools(self, example, index):
        """The record's `tools` (JSON schemas, as OpenAI and `apply_chat_template` take them), if any."""
        return example.get("tools")


class AlpacaProfile(Profile):
    """`{"instruction": ..., "input": optional context, "output": ...}`; input follows the instruction."""

    def messages(self, example, index):
        instruction = self.field(example, "instruction")
        context = self.field(example, "input", required=False)
        prompt = f"{instruction}\n\n{context}" if context else instruction
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": self.field(example, "output")}]


class ShareGPTProfile(Profile):
    """`{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}], "system": optional}`."""

    role_names = {
        "system": "system",
        "human": "user", "user": "user",
        "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
        "bard": "assistant", "model": "assistant", "function_call": "assistant",
        "tool": "tool", "function": "tool", "observation": "tool", "function_response": "tool",
    }
    """ShareGPT `from` values and the chat role each becomes."""

    def messages(self, example, index):
        if "conversations" not in example:
            raise RecordError(f"missing field `conversations` (fields present: {', '.join(example) or 'none'})")
        turns = example["conversations"]
        if not isinstance(turns, list):
            raise RecordError(f"`conversations` must be a list, got {type(turns).__name__}")
        messages = [{"role": "system", "content": self.field(example, "system")}] if example.get("system") else []
        for position, turn in enumerate(turns):
            messages.append(self._message(turn, f"conversations[{position}]"))
        return messages

    def _message(self, turn: Any, where: str) -> dict[str, str]:
        if not isinstance(turn, dict):
            raise RecordError(f"{where}: expected an object with `from` and `value`, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise RecordError(f"{where}: missing field `{key}`")
        speaker = turn["from"]
        role = self.role_names.get(speaker.lower() if isinstance(speaker, str) else speaker)
        if role is None:
            raise RecordError(f"{where}: unknown `from` value {speaker!r}; expected one of "
                              + ", ".join(sorted(self.role_names)))
        if not isinstance(turn["value"], str):
            raise RecordError(f"{where}: `value` must be a string, got {type(turn['value']).__name__}")
        return {"role": role, "content": turn["value"]}


class CompletionProfile(Profile):
    """`{"prompt": ..., "completion": ...}`: the prompt becomes a user turn, the completion the reply."""

    def messages(self, example, index):
        return [{"role": "user", "content": self.field(example, "prompt")},
                {"role": "assistant", "content": self.field(example, "completion")}]


class TextProfile(Profile):
    """`{"text": ...}`: plain text, no chat template; every token is trained (continued pre-training)."""

    uses_chat_template = False

    def transform_example(self, example, index, system_prompt=""):
        return {"text": self.field(example, "text")}


BUILTIN_PROFILES: dict[str, type[Profile]] = {
    "chat": ChatProfile,
    "alpaca": AlpacaProfile,
    "sharegpt": ShareGPTProfile,
    "completion": CompletionProfile,
    "text": TextProfile,
}
