"""Every relative link and anchor in the README and the pages under docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_SKIPPED_DIRS = {
    ".git",
    ".venv",
    ".venv-vllm",
    ".tools",
    "node_modules",
    "eval-results",
    ".pytest_cache",
    ".mypy_cache",
}
_FENCE = re.compile(r"^(```|~~~)")
_INLINE_CODE = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    """The project's own Markdown: the README, docs/ and the READMEs beside the code."""
    found = []
    for path in sorted(root.rglob("*.md")):
        if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            found.append(path)
    return found


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        anchor = heading_anchor(match.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def dead_links(path: Path) -> list[str]:
    """The relative links of `path` whose file or anchor does not exist, as 'file: target (why)'."""
    problems = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(_INLINE_CODE.sub("", line)):
            if _SCHEME.match(target) or target.startswith("//"):
                continue
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                problems.append(f"{path.name}: {target} (no such heading in {linked.name})")
    return problems


def test_the_readme_and_docs_are_checked():
    checked = {str(p.relative_to(ROOT)) for p in markdown_files(ROOT)}
    assert {"README.md", "docs/design.md", "docs/operations.md", "docs/results.md"} <= checked


@pytest.mark.parametrize("path", markdown_files(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path: Path):
    assert dead_links(path) == []


def test_the_readme_stays_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 210
    # A fresh reader's first two commands, before anything else.
    assert lines[2] == "```sh" and lines[3].startswith("make demo") and lines[4].startswith("make test")


def test_a_dead_file_or_anchor_is_reported(tmp_path: Path):
    (tmp_path / "page.md").write_text("# A page\n\n## Flags and `limits`\n\n## Flags and `limits`\n")
    (tmp_path / "index.md").write_text(
        "See [flags](page.md#flags-and-limits), [again](page.md#flags-and-limits-1), [here](#top).\n"
        "Also [gone](missing.md), [nowhere](page.md#no-such-heading) and [web](https://example.org/x#y).\n"
        "```sh\n[not a link](missing-in-code.md)\n```\n"
        "# Top\n"
    )
    assert dead_links(tmp_path / "index.md") == [
        "index.md: missing.md (no such file)",
        "index.md: page.md#no-such-heading (no such heading in page.md)",
    ]
