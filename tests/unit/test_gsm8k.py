"""GSM8K-format data: the one answer parser and the one file reader that eval, demo and problems share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coolfusion.cli.gsm8k import Item, extract_answer, load_items


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 1,000 now.\n#### 1,234", "1234"),
        ("The ticket costs $5.", "5"),
        ("It drops to -7 degrees.\n#### -7", "-7"),
        ("Each costs 2.5, so 3 cost 7.5", "7.5"),
        ("#### $1,234.50", "1234.50"),
        ("I cannot tell.", None),
        ("#### 12\nQuestion: what is 3 + 99?", "12"),  # the marker wins over later numbers
        ("#### 12 then #### 13", "13"),  # the last marker wins
        ("7 - 3 = 4 and 5-3=2", "2"),  # subtraction, not a negative number
        ("The answer is #### (none)", None),
        ("So 4 apples.\n####", "4"),  # a marker without a number falls back to the last number
        ("so 9 * 2 = 18\n#### 18", "18"),
        ("#### $1,250.50 and later #### -3", "-3"),
        ("no marker 42", "42"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_an_answer_that_repeats_the_pattern_is_read_at_its_last_marker() -> None:
    text = "First try: 3 + 4 = 7\n#### 7\nWait, she also had 5, so 7 + 5 = 12.\n#### 12\n"
    assert extract_answer(text) == "12"


def test_load_items_takes_offset_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"question": f"q{i}", "answer": f"{i} + 1 = {i + 1}\n#### {(i + 1) * 1000:,}"} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    items = load_items(path, offset=1, limit=2)
    assert items == [Item(1, "q1", "2000"), Item(2, "q2", "3000")]


def test_load_items_refuses_a_missing_file_and_an_answer_without_a_number(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no GSM8K file"):
        load_items(tmp_path / "missing.jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no idea"}) + "\n")
    with pytest.raises(SystemExit, match=r"data.jsonl:1 has no `#### N` answer"):
        load_items(path)
