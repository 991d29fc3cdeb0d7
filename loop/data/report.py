"""What data preparation kept, dropped and why; printed by `python -m launcher validate`.

    data = build_datasets(config, tokenizer)
    print(data.report.format())                   # counts, tokens, lengths
    print(data.report.render_example(tokenizer))  # one example, trained spans in [[ ]]
    json.dumps(data.report.to_dict())
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from loop.data.render import IGNORE_INDEX

DROP_REASONS = {
    "invalid_json": "line is not valid JSON",
    "invalid_record": "record does not fit the profile",
    "too_large": "line too long to read",
    "too_long": "longer than data.max_length (too_long = \"drop\")",
    "no_trained_tokens": "no tokens left to train on",
}
MAX_PROBLEMS = 20
"""How many dropped or skipped records are listed by file and line."""


@dataclass
class DataReport:
    num_read: int = 0
    """Records read (non-blank lines), training and validation files together."""
    num_kept: int = 0
    """Examples left after skipping bad records and dropping unusable ones."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Records skipped or dropped, by reason (see DROP_REASONS)."""
    num_truncated: int = 0
    """Examples cut to data.max_length (too_long = "truncate")."""
    num_train_examples: int = 0
    num_validation_examples: int = 0
    num_train_sequences: int = 0
    """Rows the training loader sees: packed sequences with packing, else examples."""
    num_tokens: int = 0
    """Tokens of the training examples (no padding)."""
    num_trained_tokens: int = 0
    """Training tokens that carry loss."""
    length_p50: int = 0
    length_p95: int = 0
    length_max: int = 0
    max_length: int = 0
    packing: bool = False
    problems: list[str] = field(default_factory=list)
    """The first dropped or skipped records as "file:line: what is wrong"."""
    num_special_text: int = 0
    """Kept examples whose text holds a special token's text (e.g. a literal "<|im_end|>" in a reply):
    the tokenizer reads it as that token, which changes the conversation's structure."""
    special_text_example: str = ""
    """One of them as "file:line: where"."""
    num_split: int = 0
    """Kept records with replies the chat template renders differently once later turns follow, each
    such reply trained in an example of its own (`profile.unstable_turns = "split"`)."""
    num_split_examples: int = 0
    """Examples those records became."""
    num_split_tokens: int = 0
    """Tokens of those examples."""
    num_unsplit_tokens: int = 0
    """Tokens of those records rendered once each, as whole conversations."""
    num_dropped_content: int = 0
    """Kept records part of which no example holds because the chat template drops it: a system prompt,
    a reply's reasoning, a `reasoning_content` field it never reads."""
    dropped_content_example: str = ""
    """One of them as "file:line: what"."""
    sample: dict[str, list[int]] | None = None
    """The first training example (unpacked), for `render_example`."""

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def trained_fraction(self) -> float:
        return self.num_trained_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def packing_efficiency(self) -> float | None:
        """Share of packed positions holding a token; None without packing."""
        if not self.packing or not self.num_train_sequences:
            return None
        return self.num_tokens / (self.num_train_sequences * self.max_length)

    def warnings(self) -> list[str]:
        """What in the kept data will likely train something unintended."""
        warnings = []
        if self.num_special_text:
            warnings.append(
                f"{self.num_special_text} example(s) hold the text of a special token, e.g. "
                f"{self.special_text_example}. The tokenizer turns such text into the special token itself, "
                "so the model sees a turn end or begin where the data has plain text; remove or rewrite it.")
        if self.num_dropped_content:
            warnings.append(
                f"{self.num_dropped_content} record(s) hold content the chat template drops, so no example "
                f"trains on it or shows it, e.g. {self.dropped_content_example}. Check that the template is "
                "the model's own, or remove that content.")
        return warnings

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(num_dropped=self.num_dropped, trained_fraction=self.trained_fraction,
                    packing_efficiency=self.packing_efficiency)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def format(self) -> str:
        lines = [
            f"examples: {self.num_read} read, {self.num_kept} kept, {self.num_dropped} dropped or skipped"
            + (f", {self.num_truncated} truncated to {self.max_length} tokens" if self.num_truncated else ""),
        ]
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            lines.append(f"  {count:>8}  {reason}: {DROP_REASONS.get(reason, reason)}")
        lines.append(f"split: {self.num_train_examples} train, {self.num_validation_examples} validation")
        lines.append(f"tokens: {self.num_tokens} train, {self.num_trained_tokens} trained "
                     f"({self.trained_fraction:.1%})")
        lines.append(f"length: p50 {self.length_p50}, p95 {self.length_p95}, max {self.length_max} "
                     f"(max_length {self.max_length})")
        if self.num_split:
            extra = self.num_split_tokens - self.num_unsplit_tokens
            lines.append(f"unstable turns: {self.num_split} record(s) became {self.num_split_examples} examples, "
                         f"{self.num_split_tokens} tokens ({extra:+} over rendering each once), because the "
                         "chat template renders their earlier replies differently once later turns follow "
                         "(profile.unstable_turns = \"split\")")
        if self.packing:
            lines.append(f"packing: {self.num_train_examples} examples in {self.num_train_sequences} sequences, "
                         f"{self.packing_efficiency:.1%} of positions filled")
        lines += [f"warning: {warning}" for warning in self.warnings()]
        if self.problems:
            more = self.num_dropped - len(self.problems)
            lines.append("dropped or skipped records" + (f" (first {len(self.problems)}):" if more > 0 else ":"))
            lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)

    def render_example(self, tokenizer, color: bool | None = False) -> str:
        """The first training example with its trained spans marked (see `mark_trained`)."""
        if not self.sample:
            return "(no example)"
        return mark_trained(tokenizer, self.sample["input_ids"], self.sample["labels"], color=color)


def mark_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool | None = False) -> str:
    """Decode an example, trained text in `[[ ]]` (or green when `color`; None: when stdout is a tty)."""
    if color is None:
        color = sys.stdout.isatty()
    opening, closing = ("\x1b[32m", "\x1b[0m") if color else ("[[", "]]")
    pieces, start = [], 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or _is_trained(labels[end]) != _is_trained(labels[start]):
            text = tokenizer.decode(input_ids[start:end], skip_special_tokens=False)
            pieces.append(f"{opening}{text}{closing}" if _is_trained(labels[start]) else text)
            start = end
    return "".join(pieces)


def _is_trained(label: int) -> bool:
    return label != IGNORE_INDEX
