"""Messages -> `input_ids` and `labels` through the tokenizer's own chat template.

    from loop.data import render_conversation
    rendered = render_conversation(tokenizer, messages, train_on="assistant", tools=None)
    for ids, labels in rendered.examples: ...

`labels` is `input_ids` with `IGNORE_INDEX` wherever no loss is taken. Labels are unshifted (the
Hugging Face convention: the loop compares logits[:, :-1] with labels[:, 1:]), and the first label
of every example is always ignored, so a packed example is never predicted from its neighbour.

Which tokens are trained (`train_on`): `assistant` trains every assistant reply including the
end-of-turn token the template writes after it (e.g. `<|im_end|>`), so the model learns to stop;
`last_assistant` only the last reply; `all` every token. A reply's tool calls are part of it;
tool results, tool schemas, system and user turns never are.

Two ways to find the assistant tokens:
- the template has `{% generation %}` markers: transformers returns the exact assistant mask;
- otherwise each reply is trained exactly as the model produces it at inference: the prompt before
  reply i (messages[:i] with the generation prompt) must be a prefix of the conversation rendered up
  to and including the reply (messages[:i+1], the reply as the final turn); the reply's span runs from
  the end of the prompt through its end-of-turn token, stopping before the newline or the next turn.
  Where no rendering matches inference (the prompt is not a prefix, as with a system prompt Mistral v0.3
  only writes into a conversation that ends on a user turn, or the template drops the reply's own
  reasoning, as DeepSeek-R1 distills do) the conversation is refused with a `TemplateError`.

Some templates render a reply differently once later turns follow (Qwen3 strips the reasoning of
earlier replies and writes a `<think>` block only into the final turn). Such a reply cannot be trained
inside the whole conversation; `unstable_turns = "split"` trains it in an example of its own, the
conversation rendered up to it (the prompt is not trained), and `"refuse"` refuses the conversation.
Replies the template renders the same either way are trained inside the whole conversation.

`Rendered.dropped` says what of a record no example holds (a system prompt, a reply's reasoning, a
`reasoning_content` field the template never reads). Reasoning is passed the way the template reads
it: as `reasoning_content` to templates that read that field, inside the content (`<think>...</think>`)
to templates that only split it out of the content.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launcher.config import ConfigError
from profiles.base import RecordError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that carries no loss (PyTorch's cross-entropy default)."""

TRAIN_ON = ("assistant", "last_assistant", "all")
UNSTABLE_TURNS = ("split", "refuse")

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_GENERATION_TAGS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_TEMPLATE_FIX = ('Set data.chat_template = "chatml", or to a Jinja file whose template marks replies with '
                 "{% generation %}...{% endgeneration %} (then the exact assistant mask is used).")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REASONING_FIELD_READ = re.compile(r"""(?:\.|\[["'])(?:reasoning_content|thinking)\b""")
"""Where a message's reasoning may be given; transformers passes any of them on as `reasoning_content`."""


class DataError(ConfigError):
    """Training data that cannot be used as configured; the message names the file, line and fix."""


class TemplateError(DataError):
    """The chat template cannot be used to locate the trained tokens (not a problem of one record)."""


Example = tuple[list[int], list[int]]


@dataclass
class Rendered:
    """The training examples of one conversation."""
    examples: list[Example]
    """The whole conversation first (left out when split replies leave it nothing to train), then one
    example per reply trained on its own."""
    is_split: bool = False
    """True when some reply is trained in an example of its own (`unstable_turns = "split"`)."""
    num_unsplit_tokens: int = 0
    """Tokens of the whole conversation rendered once, for the cost of splitting (0 when not split)."""
    dropped: str = ""
    """What of the record no example holds, e.g. "messages[0] (the system prompt)"; "" when nothing."""


def render_conversation(tokenizer, messages: list[dict[str, Any]], train_on: str = "assistant",
                        unstable_turns: str = "split", tools: list[dict] | None = None) -> Rendered:
    """The examples of one conversation; raises `RecordError` or `DataError`."""
    result = Renderer(tokenizer, train_on, unstable_turns).render_conversations([messages], [tools])[0]
    if isinstance(result, Exception):
        raise result
    return result


def render_messages(tokenizer, messages: list[dict[str, Any]], train_on: str = "assistant") -> Example:
    """`(input_ids, labels)` of one conversation as one example; raises `RecordError` or `DataError`
    (a `TemplateError` where the template would need several examples: use `render_conversation`)."""
    return render_conversation(tokenizer, messages, train_on, unstable_turns="refuse").examples[0]


def render_text(tokenizer, text: str) -> Example:
    """`(input_ids, labels)` of plain text plus eos, every token trained (the `text` profile)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, _first_ignored(list(ids))


def chat_template_of(tokenizer) -> str:
    """The tokenizer's chat template; a `DataError` naming `data.chat_template` when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"data.chat_template: the tokenizer {name!r} has no chat template, so chat messages "
                        'cannot be rendered. Set data.chat_template = "chatml" or to a Jinja template file, '
                        'or use [profile] name = "text" for plain text.')
    return template


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_MARKER.search(template))


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching the text of any special token (None if the tokenizer has none)."""
    specials = {*tokenizer.all_special_tokens,
                *(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)}
    # Longest first, so a token that contains another (e.g. "</s>" in "</s></s>") wins.
    pattern = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True) if s)
    return re.compile(pattern) if pattern else None


class Renderer:
    """Renders many conversations with one tokenizer; built once per batch (it compiles a regex)."""

    def __init__(self, tokenizer, train_on: str = "assistant", unstable_turns: str = "split"):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"profile.train_on: expected one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        if unstable_turns not in UNSTABLE_TURNS:
            raise ConfigError(f"profile.unstable_turns: expected one of {', '.join(UNSTABLE_TURNS)}, "
                              f"got {unstable_turns!r}")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.unstable_turns = unstable_turns
        self.template = chat_template_of(tokenizer)
        self.uses_markers = has_generation_markers(self.template)
        self._special = special_token_pattern(tokenizer)
        self._end_of_turn: str | None | bool = False  # False: not probed yet
        variables = _template_variables(self.template)
        self.reads_tools = "tools" in variables
        self.reads_tool_calls = "tool_calls" in self.template
        # transformers passes a message's reasoning to the template as `reasoning_content` and `thinking`.
        self.reads_reasoning_field = bool(_REASONING_FIELD_READ.search(self.template))
        self.splits_reasoning = "</think>" in self.template

    def render_conversations(self, conversations: Sequence[list[dict]],
                             tools: Sequence[list[dict] | None] | None = None) -> list[Rendered | Exception]:
        """One `Rendered` per conversation, or the exception that conversation raised; `tools[i]` are
        the tool schemas of conversation i (None: no tools).

        A `RecordError` is a problem of that record; a `TemplateError` is one of the template.
        """
        tools = list(tools) if tools is not None else [None] * len(conversations)
        results: list[Any] = [None] * len(conversations)
        groups: dict[str, list[int]] = {}
        for position, (messages, schemas) in enumerate(zip(conversations, tools)):
            try:
                prepared = self._prepare(messages, schemas)
            except RecordError as error:
                results[position] = error
                continue
            results[position] = prepared
            # apply_chat_template takes one `tools` for a whole batch: render each set of tools together
            # (as given: the order of a schema's keys is part of what the template writes).
            groups.setdefault(json.dumps(schemas or None), []).append(position)
        for positions in groups.values():
            batch = [results[p] for p in positions]
            schemas = tools[positions[0]] or None
            rendered = self._with_markers(batch, schemas) if self.uses_markers else self._by_prefixes(batch, schemas)
            for position, result in zip(positions, rendered):
                results[position] = result
        return results

    # --- what the template is given ----------------------------------------------------------------
    def _prepare(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """The messages as this template reads them; a `RecordError` for tools it cannot render."""
        if tools and not self.reads_tools:
            raise RecordError("the record has `tools`, but the chat template never reads `tools`, so the tool "
                              "schemas would be dropped. Use a model whose template supports tools (e.g. Qwen2.5, "
                              "Qwen3, Llama 3.1), or remove them")
        prepared = []
        for position, message in enumerate(messages):
            message = dict(message)
            if message.get("tool_calls"):
                if not self.reads_tool_calls:
                    raise RecordError(f"messages[{position}] has `tool_calls`, but the chat template never renders "
                                      "`tool_calls`, so the calls would be dropped. Use a model whose template "
                                      "supports tools (e.g. Qwen2.5, Qwen3, Llama 3.1), or remove them")
                message["tool_calls"] = [_with_parsed_arguments(call) for call in message["tool_calls"]]
            if message.get("role") == "assistant":
                message = self._pass_reasoning(message)
            prepared.append(message)
        return prepared

    def _pass_reasoning(self, message: dict) -> dict:
        content = message.get("content") if isinstance(message.get("content"), str) else ""
        field_name = next((k for k in _REASONING_FIELDS if isinstance(message.get(k), str)), None)
        if field_name and self.splits_reasoning and not self.reads_reasoning_field and "</think>" not in content:
            # The template only finds reasoning inside the content (DeepSeek-R1 style).
            reasoning = message.pop(field_name)
            for key in _REASONING_FIELDS:
                message.pop(key, None)
            message["content"] = f"<think>\n{reasoning.strip()}\n</think>\n\n{content.lstrip()}"
        elif not field_name and "</think>" in content and self.reads_reasoning_field and not self.splits_reasoning:
            # The template reads the field, never the content's <think> block.
            reasoning, _, answer = content.partition("</think>")
            message["reasoning_content"] = reasoning.split("<think>")[-1].strip()
            message["content"] = answer.lstrip()
        return message

    # --- templates with {% generation %} markers --------------------------------------------------
    def _with_markers(self, conversations, tools):
        try:
            encoded = self._apply(list(conversations), tools, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
            # The text, for what the template drops: decoding is cheaper than rendering again.
            checked = [i for i, m in enumerate(conversations) if _droppable(m)]
            texts = dict(zip(checked, self.tokenizer.batch_decode([encoded["input_ids"][i] for i in checked])))
        except Exception as error:
            if len(conversations) == 1:
                return [_record_error(error)]
            # One conversation broke the batch: render each alone to find it.
            return [result for conversation in conversations for result in self._with_markers([conversation], tools)]
        pairs = zip(encoded["input_ids"], encoded["assistant_masks"])
        return [Rendered([self._labels_from_mask(list(ids), mask)],
                         dropped=_dropped(messages, [texts[i]], self.reads_reasoning_field) if i in texts else "")
                for i, (messages, (ids, mask)) in enumerate(zip(conversations, pairs))]

    def _labels_from_mask(self, ids: list[int], mask: list[int]) -> Example:
        if self.train_on == "all":
            return ids, _first_ignored(list(ids))
        runs = _runs_of_ones(mask)
        if self.train_on == "last_assistant":
            runs = runs[-1:]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in runs:
            labels[start:end] = ids[start:end]
        return ids, _first_ignored(labels)

    # --- templates without markers: each reply as the final turn ------------------------------------
    def _by_prefixes(self, conversations, tools):
        results: list[Any] = []
        planned = []  # per conversation: ([(text, char spans)], is_split, full text, dropped)
        for messages, rendering in zip(conversations, self._render_prefixes(conversations, tools)):
            try:
                if isinstance(rendering, Exception):
                    raise rendering
                pieces, is_split = self._examples(messages, *rendering)
            except TemplateError as error:
                results.append(error)
                continue
            except Exception as error:
                results.append(_record_error(error))
                continue
            results.append(None)
            full = rendering[0]
            planned.append((pieces, is_split, full, _dropped(messages, [text for text, _ in pieces],
                                                             self.reads_reasoning_field)))
        # One tokenizer call for every text of the batch; a split conversation's whole rendering is
        # encoded too, to report what splitting costs.
        encoded = iter(self._encode([text for pieces, is_split, full, _ in planned
                                     for text in [t for t, _ in pieces] + ([full] if is_split else [])]))
        out = []
        for pieces, is_split, _, dropped in planned:
            examples = [_labels_from_spans(next(encoded), spans) for _, spans in pieces]
            out.append(Rendered(examples, is_split=is_split, dropped=dropped,
                                num_unsplit_tokens=len(next(encoded)[0]) if is_split else 0))
        rendered = iter(out)
        return [next(rendered) if result is None else result for result in results]

    def _trained_replies(self, messages) -> list[int]:
        """Indices of the assistant messages whose spans are needed (none when every token is trained)."""
        if self.train_on == "all":
            return []
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        return replies[-1:] if self.train_on == "last_assistant" else replies

    def _render_prefixes(self, conversations, tools):
        """Per conversation, `(full rendering, {reply: prompt before it}, {reply: conversation through it})`
        (the last only for replies that later messages follow), or the `RecordError` of a conversation
        that cannot be rendered. Three template calls for the whole batch, not three per conversation.
        """
        try:
            plans = [self._trained_replies(messages) for messages in conversations]
            fulls = self._render(list(conversations), tools)
            heads = iter(self._render([m[:i] for m, replies in zip(conversations, plans) for i in replies],
                                      tools, add_generation_prompt=True))
            finals = iter(self._render([m[:i + 1] for m, replies in zip(conversations, plans) for i in replies
                                        if i < len(m) - 1], tools))
        except Exception as error:
            if len(conversations) == 1:
                return [_record_error(error)]
            # One conversation broke the batch: render each alone to find it.
            return [result for conversation in conversations
                    for result in self._render_prefixes([conversation], tools)]
        return [(full, {i: next(heads) for i in replies}, {i: next(finals) for i in replies if i < len(m) - 1})
                for m, replies, full in zip(conversations, plans, fulls)]

    def _examples(self, messages, full: str, heads: dict[int, str], finals: dict[int, str]):
        """`([(text, [char spans of trained replies])], is_split)`: the whole conversation with the replies
        it renders as at inference (left out if it has none while others are split off), then one text per
        reply that must be trained alone."""
        if self.train_on == "all":
            return [(full, [(0, len(full))])], False
        in_full, alone = [], []
        for i, head in heads.items():
            final = finals.get(i, full)
            if not final.startswith(head):
                raise TemplateError(
                    f"the chat template renders the prompt before messages[{i}] (add_generation_prompt=True) "
                    "differently from the conversation that continues with the reply (e.g. it writes the system "
                    "prompt only into a conversation that ends on a user turn, or opens a <think> block the "
                    "reply never has), so no rendering trains the reply as the model produces it at inference. "
                    f"{_TEMPLATE_FIX}")
            start = len(head)
            end = start + self._reply_length(final[start:], messages[i].get("content") or "")
            self._check_reasoning_kept(messages[i], final[start:end], i)
            if full[:end] == final[:end]:
                in_full.append((start, end))
            elif self.unstable_turns == "refuse":
                raise TemplateError(
                    f"the chat template renders the assistant reply messages[{i}] differently once later "
                    "messages follow (it rewrites earlier turns, e.g. strips reasoning from history), so "
                    "training it inside the conversation would not match what the model sees at inference. "
                    'Set profile.unstable_turns = "split" to train each such reply in an example of its own, '
                    f"or: {_TEMPLATE_FIX}")
            else:
                alone.append((final, [(start, end)]))
        return ([(full, in_full)] if in_full or not alone else []) + alone, bool(alone)

    def _check_reasoning_kept(self, message: dict, reply: str, i: int) -> None:
        """A `TemplateError` when the template drops the reasoning a reply carries even as the final turn."""
        reasoning = _reasoning(message, self.reads_reasoning_field)
        if reasoning and reasoning not in reply:
            raise TemplateError(
                f"the chat template drops the reasoning of the assistant reply messages[{i}] even when it is "
                "the final turn (e.g. DeepSeek-R1 distills keep only what follows </think>), so no rendering "
                "trains the reply as the model produces it at inference. Remove the reasoning from the data, "
                f"or: {_TEMPLATE_FIX}")

    def _reply_length(self, rendered: str, content: str) -> int:
        """Characters of `rendered` (a reply and what follows) that are trained: through the end-of-turn token."""
        content_end = 0
        for candidate in (content, content.strip()):
            position = rendered.find(candidate) if candidate else -1
            if position >= 0:
                content_end = position + len(candidate)
                break
        # The template's end-of-turn token, not just the first special token: a tool call may open with
        # one (Mistral's [TOOL_CALLS], Llama's <|python_tag|>).
        end_of_turn = self._probe_end_of_turn()
        if end_of_turn:
            position = rendered.find(end_of_turn, content_end)
            if position >= 0:
                return position + len(end_of_turn)
        match = self._special.search(rendered, content_end) if self._special else None
        if match:
            return match.end()
        _warn_once("the chat template writes no special end-of-turn token after assistant replies; "
                   "the model will not learn where a reply ends")
        return len(rendered.rstrip())

    def _probe_end_of_turn(self) -> str | None:
        """The special token the template writes right after a reply's content (None if it writes none)."""
        if self._end_of_turn is False:
            self._end_of_turn = None
            probe = "Probe reply."
            try:
                text = self._render([[{"role": "user", "content": "Probe question?"},
                                      {"role": "assistant", "content": probe}]], None)[0]
            except Exception:  # a template with requirements of its own: the first special token rule
                return None
            position = text.find(probe)
            match = self._special.search(text, position + len(probe)) if self._special and position >= 0 else None
            if match:
                self._end_of_turn = match.group()
        return self._end_of_turn

    # --- tokenizer calls ---------------------------------------------------------------------------
    def _apply(self, conversations, tools, **kwargs):
        return self.tokenizer.apply_chat_template(conversations, tools=tools or None, chat_template=self.template,
                                                  **kwargs)

    def _render(self, conversations, tools, add_generation_prompt: bool = False) -> list[str]:
        if not conversations:
            return []
        return self._apply(conversations, tools, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and character offsets, exactly as `apply_chat_template(tokenize=True)` tokenizes."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer directly: same ids as the Python wrapper, without its per-call overhead.
            return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
        try:
            out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError as error:
            raise TemplateError("this tokenizer cannot report token offsets, which are needed to find the "
                                f"assistant tokens of a template without markers. {_TEMPLATE_FIX}") from error
        return list(zip(out["input_ids"], out["offset_mapping"]))


def _template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from outside (e.g. `messages`, `tools`); empty if it cannot be parsed."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return frozenset(meta.find_undeclared_variables(environment.parse(_GENERATION_TAGS.sub("", template))))
    except Exception:  # a syntax error surfaces, with its record, when the template is applied
        return frozenset()


def _with_parsed_arguments(call: Any) -> Any:
    """A tool call whose `arguments` is a JSON string, with the object instead: templates (and transformers'
    documentation) expect an object, and most would write the string as a quoted JSON string."""
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    target = function if isinstance(function, dict) else call
    arguments = target.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return call
        if isinstance(parsed, dict):
            target = {**target, "arguments": parsed}
            return {**call, "function": target} if isinstance(function, dict) else target
    return call


def _reasoning(message: dict, reads_field: bool = True) -> str:
    """A reply's reasoning as the template was given it (a field it reads, or a <think> block), stripped."""
    if message.get("role") != "assistant":
        return ""
    if reads_field:
        for key in _REASONING_FIELDS:
            if isinstance(message.get(key), str) and message[key].strip():
                return message[key].strip()
    content = message.get("content")
    if isinstance(content, str) and "</think>" in content:
        return content.split("</think>")[0].split("<think>")[-1].strip()
    return ""


def _droppable(messages: list[dict]) -> bool:
    """Whether the conversation holds anything a template may drop: a system prompt or reasoning."""
    return any(m.get("role") == "system" or (m.get("role") == "assistant" and (
        any(isinstance(m.get(k), str) for k in _REASONING_FIELDS) or "</think>" in str(m.get("content") or "")))
        for m in messages)


def _dropped(messages: list[dict], texts: list[str], reads_reasoning_field: bool) -> str:
    """The first part of the conversation that none of `texts` holds, or ""."""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role == "system" and isinstance(content, str) and content.strip() \
                and not any(content.strip() in text for text in texts):
            return f"messages[{i}] (the system prompt)"
        if role != "assistant":
            continue
        unread = next((k for k in _REASONING_FIELDS if isinstance(message.get(k), str) and message[k].strip()), None)
        if unread and not reads_reasoning_field:
            return f"messages[{i}].{unread} (the template never reads it)"
        reasoning = _reasoning(message)
        if reasoning and not any(reasoning in text for text in texts):
            return f"messages[{i}] (its reasoning)"
    return ""


def _labels_from_spans(encoded, spans) -> Example:
    ids, offsets = list(encoded[0]), encoded[1]
    labels = [IGNORE_INDEX] * len(ids)
    token_ends = [end for _, end in offsets]
    token_starts = [start for start, _ in offsets]
    for start, end in spans:
        # Every token overlapping the span, the rule transformers uses for its assistant mask.
        first = bisect.bisect_right(token_ends, start)
        last = bisect.bisect_left(token_starts, end)
        labels[first:last] = ids[first:last]
    return ids, _first_ignored(labels)


def _first_ignored(labels: list[int]) -> list[int]:
    # The first token has no context in this example; with packing it would be predicted from the
    # previous example, so it is never a target.
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def _runs_of_ones(mask: Sequence[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for position, value in enumerate(mask):
        if value and start is None:
            start = position
        elif not value and start is not None:
            runs.append((start, position))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def _record_error(error: Exception) -> Exception:
    if isinstance(error, (RecordError, DataError)):
        return error
    return RecordError(f"the chat template cannot render this conversation: {type(error).__name__}: {error}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
