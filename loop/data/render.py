"""Messages -> `input_ids` and `labels` through the tokenizer's own chat template.

    from loop.data import render_messages
    ids, labels = render_messages(tokenizer, messages, train_on="assistant")

`labels` is `input_ids` with `IGNORE_INDEX` wherever no loss is taken. Labels are unshifted (the
Hugging Face convention: the loop compares logits[:, :-1] with labels[:, 1:]), and the first label
of every example is always ignored, so a packed example is never predicted from its neighbour.

Which tokens are trained (`train_on`): `assistant` trains every assistant reply including the
end-of-turn token the template writes after it (e.g. `<|im_end|>`), so the model learns to stop;
`last_assistant` only the last reply; `all` every token.

Two ways to find the assistant tokens:
- the template has `{% generation %}` markers: transformers returns the exact assistant mask;
- otherwise: the prompt before reply i (messages[:i] with the generation prompt) and the
  conversation up to reply i (messages[:i+1]) are rendered too, and must be prefixes of the full
  rendering. The reply's span starts where the generation prompt ends and runs through the first
  special token after its content (the end-of-turn token), stopping before the newline or the next
  turn. A template that renders history differently from the live turn (e.g. one that strips
  reasoning from earlier assistant turns) is refused with a `DataError` saying how to supply one.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Sequence
from typing import Any

from launcher.config import ConfigError
from profiles.base import RecordError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that carries no loss (PyTorch's cross-entropy default)."""

TRAIN_ON = ("assistant", "last_assistant", "all")

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_TEMPLATE_FIX = ('Set data.chat_template = "chatml", or to a Jinja file whose template marks replies with '
                 "{% generation %}...{% endgeneration %} (then the exact assistant mask is used).")


class DataError(ConfigError):
    """Training data that cannot be used as configured; the message names the file, line and fix."""


class TemplateError(DataError):
    """The chat template cannot be used to locate the trained tokens (not a problem of one record)."""


Example = tuple[list[int], list[int]]


def render_messages(tokenizer, messages: list[dict[str, Any]], train_on: str = "assistant") -> Example:
    """`(input_ids, labels)` of one conversation; raises `RecordError` or `DataError`."""
    result = Renderer(tokenizer, train_on).render_conversations([messages])[0]
    if isinstance(result, Exception):
        raise result
    return result


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

    def __init__(self, tokenizer, train_on: str = "assistant"):
        if train_on not in TRAIN_ON:
            raise ConfigError(f"profile.train_on: expected one of {', '.join(TRAIN_ON)}, got {train_on!r}")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.template = chat_template_of(tokenizer)
        self.uses_markers = has_generation_markers(self.template)
        self._special = special_token_pattern(tokenizer)

    def render_conversations(self, conversations: Sequence[list[dict]]) -> list[Example | Exception]:
        """One `(input_ids, labels)` per conversation, or the exception that conversation raised.

        A `RecordError` is a problem of that record; a `TemplateError` is one of the template.
        """
        if not conversations:
            return []
        if self.uses_markers:
            return self._with_markers(conversations)
        return self._by_prefixes(conversations)

    # --- templates with {% generation %} markers --------------------------------------------------
    def _with_markers(self, conversations):
        try:
            encoded = self._apply(list(conversations), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
        except Exception as error:
            if len(conversations) == 1:
                return [_record_error(error)]
            # One conversation broke the batch: render each alone to find it.
            return [result for conversation in conversations for result in self._with_markers([conversation])]
        pairs = zip(encoded["input_ids"], encoded["assistant_masks"])
        return [self._labels_from_mask(list(ids), mask) for ids, mask in pairs]

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

    # --- templates without markers: locate replies by rendering prefixes ---------------------------
    def _by_prefixes(self, conversations):
        results: list[Any] = []
        texts, spans = [], []
        for messages, rendering in zip(conversations, self._render_prefixes(conversations)):
            if isinstance(rendering, Exception):
                results.append(rendering)
                continue
            try:
                char_spans = self._reply_spans(messages, *rendering)
            except TemplateError as error:
                results.append(error)
                continue
            except Exception as error:
                results.append(_record_error(error))
                continue
            results.append(None)
            texts.append(rendering[0])
            spans.append(char_spans)
        rendered = iter(zip(self._encode(texts), spans))
        return [_labels_from_spans(*next(rendered)) if result is None else result for result in results]

    def _trained_replies(self, messages) -> list[int]:
        """Indices of the assistant messages whose spans are needed (none when every token is trained)."""
        if self.train_on == "all":
            return []
        replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        return replies[-1:] if self.train_on == "last_assistant" else replies

    def _render_prefixes(self, conversations):
        """Per conversation, `(full rendering, {reply: prompt before it}, {reply: conversation through it})`
        (the last only for replies that later messages follow), or the `RecordError` of a conversation
        that cannot be rendered. Three template calls for the whole batch, not three per conversation.
        """
        try:
            plans = [self._trained_replies(messages) for messages in conversations]
            fulls = self._render(list(conversations))
            heads = iter(self._render([m[:i] for m, replies in zip(conversations, plans) for i in replies],
                                      add_generation_prompt=True))
            turns = iter(self._render([m[:i + 1] for m, replies in zip(conversations, plans) for i in replies
                                       if i < len(m) - 1]))
        except Exception as error:
            if len(conversations) == 1:
                return [_record_error(error)]
            # One conversation broke the batch: render each alone to find it.
            return [result for conversation in conversations for result in self._render_prefixes([conversation])]
        return [(full, {i: next(heads) for i in replies}, {i: next(turns) for i in replies if i < len(m) - 1})
                for m, replies, full in zip(conversations, plans, fulls)]

    def _reply_spans(self, messages, full: str, heads: dict[int, str], turns: dict[int, str]) -> list[tuple[int, int]]:
        """The character span of each trained reply in the full rendering."""
        if self.train_on == "all":
            return [(0, len(full))]
        spans = []
        for i, head in heads.items():
            turn = turns.get(i, full)
            if not (full.startswith(head) and turn.startswith(head)):
                raise TemplateError(
                    f"the chat template renders the prompt before messages[{i}] (add_generation_prompt=True) "
                    "differently from the conversation that continues with the reply, so the reply's tokens "
                    f"cannot be located. {_TEMPLATE_FIX}")
            start = len(head)
            end = start + self._reply_length(turn[start:], messages[i].get("content") or "")
            if full[start:end] != turn[start:end]:
                raise TemplateError(
                    f"the chat template renders the assistant reply messages[{i}] differently once later "
                    "messages follow (it rewrites earlier turns, e.g. strips reasoning from history), so "
                    f"training would not match what the model sees at inference. {_TEMPLATE_FIX}")
            spans.append((start, end))
        return spans

    def _reply_length(self, rendered: str, content: str) -> int:
        """Characters of `rendered` (a reply and what follows) that are trained: through the end-of-turn token."""
        content_end = 0
        for candidate in (content, content.strip()):
            position = rendered.find(candidate) if candidate else -1
            if position >= 0:
                content_end = position + len(candidate)
                break
        match = self._special.search(rendered, content_end) if self._special else None
        if match:
            return match.end()
        _warn_once("the chat template writes no special end-of-turn token after assistant replies; "
                   "the model will not learn where a reply ends")
        return len(rendered.rstrip())

    # --- tokenizer calls ---------------------------------------------------------------------------
    def _apply(self, conversations, **kwargs):
        return self.tokenizer.apply_chat_template(conversations, chat_template=self.template, **kwargs)

    def _render(self, conversations, add_generation_prompt: bool = False) -> list[str]:
        if not conversations:
            return []
        return self._apply(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)

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
