"""GSM8K-format data: reading question files, and the one rule that reads a number answer out of a text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# A number as GSM8K writes it: optional minus and dollar sign, thousands commas, decimals. A minus
# right after a word or digit is a hyphen or a subtraction ("5-3", "3-year"), not a sign.
_NUMBER = re.compile(r"(?:(?<!\w)-)?\$?\d[\d,]*(?:\.\d+)?")
_MARKER = "####"


@dataclass(frozen=True)
class Item:
    """One GSM8K question; `index` is its line number in the file, from 0."""

    index: int
    question: str
    reference: str


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, else the last number in the text; commas and `$` removed.

    GSM8K references hold one marker; a model answer that repeats the pattern gives its final answer last.
    """
    _, marker, after = text.rpartition(_MARKER)
    if marker and (found := _NUMBER.search(after)):
        return _clean(found.group())
    numbers = _NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def _clean(number: str) -> str:
    return number.replace(",", "").replace("$", "")


def load_items(path: Path, offset: int = 0, limit: int | None = None) -> list[Item]:
    """Lines [offset, offset + limit) of a GSM8K JSONL file; the reference is read by `extract_answer`."""
    if not path.is_file():
        raise SystemExit(f"coolfusion: no GSM8K file at {path}; run from the repository root or pass --gsm8k")
    items: list[Item] = []
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if index < offset:
                continue
            if limit is not None and len(items) >= limit:
                break
            record = json.loads(line)
            reference = extract_answer(record["answer"])
            if reference is None:
                raise SystemExit(f"coolfusion: {path}:{index + 1} has no `#### N` answer")
            items.append(Item(index, record["question"], reference))
    return items
