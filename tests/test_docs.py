"""The documentation stays true to itself: the generated reference is current, no Markdown file
repeats a heading, the README stays short, and relative links point at files that exist.

Fast and offline: reads Markdown files and calls `reference_markdown()`; nothing is trained.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
REFERENCE = DOCS / "reference.md"
README_MAX_LINES = 250

# Folders whose Markdown is not ours to keep tidy (virtual environment, caches, build outputs, runs).
SKIPPED_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", ".pytest_cache", "__pycache__",
                "outputs", "tiny-model"}
# Generated result files (bench/run_all.py and scripts/reliability_figures.py write them), not edited by hand.
SKIPPED_PATHS = {("bench", "results")}

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^\s{0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
# [text](target) or ![alt](target); the target ends at whitespace (an optional "title" follows) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


# --- helpers ---------------------------------------------------------------------------------------

def markdown_files() -> list[Path]:
    """Every Markdown file of the repository outside virtual environments, caches and build outputs."""
    found = []
    for path in sorted(REPO.rglob("*.md")):
        parts = path.relative_to(REPO).parts
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        if any(parts[:len(prefix)] == prefix for prefix in SKIPPED_PATHS):
            continue
        found.append(path)
    return found


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            continue
        if fence is not None:
            if match and match.group(1).startswith(fence):
                fence = None
            continue
        lines.append((number, line))
    return lines


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, text) of every ATX heading outside code blocks."""
    found = []
    for number, line in prose_lines(text):
        match = ATX_HEADING.match(line)
        if match:
            found.append((number, len(match.group(1)), (match.group(2) or "").strip()))
    return found


def duplicate_headings(text: str) -> list[str]:
    """Headings that occur twice or more at the same level, as `## text (lines a, b)`."""
    seen: dict[tuple[int, str], list[int]] = {}
    for number, level, title in headings(text):
        seen.setdefault((level, title), []).append(number)
    return [f"{'#' * level} {title} (lines {', '.join(map(str, numbers))})"
            for (level, title), numbers in seen.items() if len(numbers) > 1]


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of links that point into the repository (not web, mail or same-page)."""
    found = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if re.match(r"^(?:[a-z][a-z0-9+.-]*:|#|//)", target, flags=re.IGNORECASE):
                continue  # http:, https:, mailto:, ... and anchors within the page
            found.append((number, target))
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """`file:line: (target)` of each relative link in `path` whose file does not exist under `root`."""
    broken = []
    for number, target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:
            continue
        resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
        if not resolved.exists():
            broken.append(f"{path.relative_to(root)}:{number}: ({target})")
    return broken


def linked_docs() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --- the helpers catch what they should (so the checks below cannot pass vacuously) -----------------

def test_duplicate_headings_are_found_at_the_same_level_only_and_not_inside_code():
    text = ("# Title\n\n## Setup\n\ntext\n\n```toml\n# Setup\n## Setup\n```\n\n### Setup\n\n## Setup ##\n"
            "## Other\n")
    assert duplicate_headings(text) == ["## Setup (lines 3, 14)"]
    assert duplicate_headings("# A\n## B\n## C\n### B\n#hashtag\n#hashtag\n") == []


def test_relative_links_skip_the_web_mail_anchors_and_code():
    text = ("See [a](docs/a.md#part), ![img](demo.png \"title\"), [web](https://x.org/y), [mail](mailto:a@b),\n"
            "[here](#anchor) and `[not](a-link.md)`.\n\n```\n[also not](code.md)\n```\n")
    assert [target for _, target in relative_links(text)] == ["docs/a.md#part", "demo.png"]


def test_a_link_to_a_missing_file_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# There\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[ok](there.md#top) [up](../docs/there.md) [gone](missing.md#x)\n")
    assert broken_links(page, root=tmp_path) == ["docs/page.md:1: (missing.md#x)"]


# --- the documentation -------------------------------------------------------------------------------

def test_the_docs_reference_is_up_to_date():
    from launcher.cli import REFERENCE_END, REFERENCE_START
    from launcher.config import reference_markdown

    text = REFERENCE.read_text(encoding="utf-8")
    assert REFERENCE_START in text and REFERENCE_END in text, \
        f"docs/reference.md has no {REFERENCE_START} ... {REFERENCE_END} block"
    block = text.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0]
    assert block.strip() == reference_markdown().strip(), "run: python -m launcher reference --update docs/reference.md"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(REPO)))
def test_no_markdown_file_repeats_a_heading(path):
    duplicates = duplicate_headings(path.read_text(encoding="utf-8"))
    assert not duplicates, f"{path.relative_to(REPO)} repeats headings: {'; '.join(duplicates)}"


def test_the_markdown_files_include_the_readme_and_the_docs():
    files = markdown_files()
    assert README in files and REFERENCE in files
    assert not any(".venv" in path.parts or ".git" in path.parts for path in files)


def test_the_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       "move the detail into docs/")


def test_relative_links_point_at_files_that_exist():
    broken = [entry for path in linked_docs() for entry in broken_links(path)]
    assert not broken, "links to missing files:\n" + "\n".join(broken)
