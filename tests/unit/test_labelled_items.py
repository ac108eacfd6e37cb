"""Labelled-items files: what a line may say, how each answer rule reads an answer, the split, and
that the task families' export asks and checks exactly what the families do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coolfusion.calibration.answers import AnswerRule, matches, read
from coolfusion.calibration.items import (
    HELD_OUT,
    MAX_NEW_TOKENS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    TUNING,
    ItemsError,
    hashed_split,
    load_items,
    parse_item,
    parse_items,
    write_items,
)
from coolfusion.cli import tasks
from coolfusion.cli.main import main as coolfusion
from coolfusion.cli.tasks.export import export
from coolfusion.orchestrator.settings import RequestLimits


def _line(**fields) -> str:
    return json.dumps(fields)


def test_the_minimal_line_is_a_prompt_and_its_answers() -> None:
    item = parse_item('{"prompt": "The capital of France is", "answers": ["Paris"]}', 1)
    assert (item.prompt, item.answers, item.rule, item.tag) == (
        "The capital of France is",
        ("Paris",),
        "first_phrase",
        "",
    )
    assert item.form == "plain" and item.request_prompt == "The capital of France is"
    assert item.max_new_tokens == 32 and item.stop == () and item.split in (TUNING, HELD_OUT)


def test_a_chat_item_is_sent_as_messages() -> None:
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Peru?"}]
    item = parse_item(_line(messages=messages, answers=["Lima"], tag="geo", split="held-out"), 1)
    assert item.form == "chat" and item.request_prompt == messages
    assert (item.tag, item.split) == ("geo", HELD_OUT)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"prompt": "2 + 2 ="}', "line 3: no `answers`"),
        ('{"prompt": "2 + 2 =", "answers": []}', "line 3: answers must be a non-empty list"),
        (
            '{"prompt": "x", "answers": ["4"], "rule": "exact"}',
            "line 3: unknown rule 'exact'; the rules are first_phrase",
        ),
        (
            '{"prompt": "x", "answers": ["(unclosed"], "rule": "regex"}',
            "line 3: answers[0] '(unclosed' is not a regular",
        ),
        ('{"prompt": "x", "answers": ["four"], "rule": "number"}', "line 3: answers[0] 'four' is not a number"),
        ('{"prompt": "x", "answers": ["Lima"], "rule": "json_field"}', "line 3: rule json_field needs `field`"),
        ('{"prompt": "x", "answers": ["a"], "field": "city"}', "line 3: `field` is read by rule json_field only"),
        ('{"prompt": "x", "answer": ["4"]}', "line 3: unknown field 'answer'"),
        ('{"prompt": "x", "messages": [], "answers": ["4"]}', "line 3: give either `prompt`"),
        ('{"messages": [{"role": "robot", "content": "hi"}], "answers": ["4"]}', "messages[0].role is 'robot'"),
        ('{"prompt": "x", "answers": ["4"], "split": "test"}', "line 3: split is 'test'"),
        ('{"prompt": "x", "answers": ["4"], "tag": "Extract"}', "line 3: tag 'Extract' must be lowercase"),
        ('{"prompt": "x", "answers": ["4"], "tag": "pooled"}', "tag 'pooled' is the fit over all items"),
        ('{"prompt": "x", "answers": ["4"], "max_new_tokens": 0}', "line 3: max_new_tokens is 0"),
        ('{"prompt": "x", "answers": ["4"], "stop": "\\n"}', "line 3: stop must be a list"),
        ('["prompt", "x"]', "line 3: must be a JSON object, not list"),
        ('{"prompt": "x", "answers": ["4"],}', "line 3: not JSON"),
        ('{"prompt": "x", "answers": ["4"], "json_schema": "object"}', "line 3: json_schema must be a JSON Schema"),
        (
            '{"prompt": "x", "answers": ["4"], "json_schema": {"type": "object", "if": {}}}',
            'line 3: json_schema: json_schema does not compile: Unimplemented keys: ["if"]',
        ),
    ],
)
def test_a_bad_line_fails_with_its_number_and_what_is_wrong(tmp_path: Path, line: str, says: str) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text('{"prompt": "a", "answers": ["b"]}\n\n' + line + "\n")
    with pytest.raises(ItemsError) as refused:
        load_items(path)
    assert str(refused.value).startswith(f"{path}: ") and says in str(refused.value)


def test_every_bad_line_is_listed_at_once_and_a_repeated_prompt_is_refused() -> None:
    lines = ['{"prompt": "a", "answers": ["b"]}', '{"prompt": "c"}', '{"prompt": "a", "answers": ["x"]}']
    with pytest.raises(ItemsError) as refused:
        parse_items(lines)
    said = str(refused.value).splitlines()
    assert said[0].startswith("line 2: no `answers`") and said[1].startswith("line 3: id ")
    assert "is also line 1's" in said[1]
    assert len(parse_items([lines[0], '{"id": "again", "prompt": "a", "answers": ["x"]}'])) == 2


def test_the_item_bounds_are_the_orchestrators_request_limits() -> None:
    limits = RequestLimits()
    assert (MAX_NEW_TOKENS, MAX_STOP_STRINGS, MAX_STOP_CHARS) == (
        limits.max_new_tokens, limits.max_stop_strings, limits.max_stop_chars,
    )  # fmt: skip


def test_without_a_split_field_an_item_keeps_its_part_however_the_file_grows() -> None:
    ids = [f"item-{n}" for n in range(400)]
    parts = [hashed_split(i) for i in ids]
    assert 160 <= parts.count(HELD_OUT) <= 240  # about half: a hash of each id
    lines = [_line(id=i, prompt=f"q{i}", answers=["a"]) for i in ids]
    shuffled = parse_items(list(reversed(lines)) + [_line(prompt="new", answers=["a"])])
    assert {item.id: item.split for item in shuffled if item.id != shuffled[-1].id} == dict(zip(ids, parts))
    assert parse_item(_line(id="item-0", prompt="q", answers=["a"], split=TUNING)).split == TUNING


@pytest.mark.parametrize(
    ("rule", "text", "answers", "right"),
    [
        ("first_phrase", " Brasília. It is the capital", ["Brasilia"], True),
        ("first_phrase", " F. Scott Fitzgerald.", ["F. Scott Fitzgerald", "Fitzgerald"], True),
        ("first_phrase", " London, Paris", ["Paris"], False),
        ("number", " 1,024 apples\n7", ["1024"], True),
        ("number", " about 12.0", ["12"], True),
        ("number", "\n\n7 then 8", ["8"], False),
        ("contains", "I think the answer is New York City, really.", ["new york"], True),
        ("contains", "concatenate", ["cat"], False),
        ("regex", "Total: #### 72", [r"####\s*72\b"], True),
        ("regex", "Total: 720", [r"####\s*72\b", r"^\s*72\b"], False),
    ],
)
def test_each_rule_reads_an_answer_as_documented(rule: str, text: str, answers: list[str], right: bool) -> None:
    assert matches(AnswerRule(rule), read(AnswerRule(rule), text, answers), answers) is right


def test_json_field_reads_the_first_object_and_compares_numbers_as_numbers() -> None:
    item = parse_item(_line(prompt="x", answers=["Lima"], rule="json_field", field="place.city"))
    assert item.correct(item.read('Sure: {"place": {"city": "lima"}} and {"place": {"city": "Quito"}}'))
    assert not item.correct(item.read('{"place": {"town": "Lima"}}')) and item.read("no JSON {here") is None
    count = parse_item(_line(prompt="x", answers=["3"], rule="json_field", field="items.1.n"))
    assert count.correct(count.read('{"items": [{"n": 1}, {"n": 3.0}]}'))


@pytest.mark.parametrize("family", list(tasks.FAMILIES))
def test_the_export_asks_and_reads_what_the_families_do(tmp_path: Path, family: str) -> None:
    path = tmp_path / f"{family}.jsonl"
    write_items(export([family]), path)
    exported = {item.id: item for item in load_items(path).items}
    spec = tasks.FAMILIES[family]
    for split in tasks.SPLITS:
        for item in tasks.items(family, split):
            same = exported[item.id]
            assert (same.tag, same.split, same.prompt, same.answers) == (family, split, item.prompt, item.answers)
            assert (same.max_new_tokens, same.stop) == (spec.max_new_tokens, spec.stop)
            for text in (f" {item.reference}.", f" {item.reference}\n", " something else", ""):
                assert same.read(text) == item.read(text)
                assert same.correct(same.read(text)) == item.correct(item.read(text))


def test_items_check_describes_the_file_and_export_writes_one(tmp_path: Path, capsys) -> None:
    path = tmp_path / "tasks.jsonl"
    assert coolfusion(["items", "export-tasks", str(path), "--tasks", "arithmetic", "--split", "tuning"]) == 0
    assert coolfusion(["items", "check", str(path)]) == 0
    said = capsys.readouterr().out
    assert "200 items" in said and "arithmetic: 200 tuning, 0 held-out; plain 200; number 200" in said
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(SystemExit, match="line 1: no `answers`"):
        coolfusion(["items", "check", str(path)])


def test_an_item_held_to_a_schema_asks_under_it_and_shares_its_question_with_the_texts_other_fields() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "age": {"type": "integer"}}}
    lines = [
        json.dumps({"id": f"t:{field}", "prompt": "Ann, 7, Oslo\nJSON:\n", "answers": [answer], "rule": "json_field",
                    "field": field, "json_schema": schema})
        for field, answer in (("city", "Oslo"), ("age", "7"))
    ]  # fmt: skip
    free_line = json.dumps({"id": "free", "prompt": "Ann, 7, Oslo\nJSON:\n", "answers": ["x"]})
    city, age, free = parse_items([*lines, free_line])
    assert city.answer_form == "json_schema" and free.answer_form == "text"
    assert json.loads(city.json_schema) == schema
    assert city.fingerprint == age.fingerprint != free.fingerprint  # one tree serves both fields
    assert city.correct(city.read('{"city": "Oslo", "age": 7}')) and age.correct(age.read('{"city": "Oslo", "age": 7}'))
