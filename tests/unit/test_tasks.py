"""Task families: sizes, the fixed tuning/held-out split, prompts, answers and the answer rules."""

from __future__ import annotations

import operator
from collections import Counter

import pytest

from coolfusion.cli import tasks
from coolfusion.cli.tasks import arithmetic, facts, opposites
from coolfusion.cli.tasks.checks import Rule, first_line, matches, normalise, read

FAMILIES = list(tasks.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_at_least_300_items_split_into_two_disjoint_halves(family: str) -> None:
    tuning, held_out = (tasks.items(family, split) for split in tasks.SPLITS)
    assert len(tuning) + len(held_out) >= 300
    assert abs(len(tuning) - len(held_out)) <= len({i.kind for i in tuning})  # one per kind at most
    ids = [i.id for i in tuning + held_out]
    assert len(ids) == len(set(ids)) == len(tasks.FAMILIES[family].drafts())
    assert [i.index for i in tuning] == list(range(len(tuning)))
    assert {i.split for i in tuning} == {tasks.TUNING} and {i.split for i in held_out} == {tasks.HELD_OUT}


# The split was fixed before any tuning: a change to the data, the generator or the split rule
# moves items between the parts, and these pins fail.
PINNED = {
    ("facts", "tuning"): (266, ["capital:Togo", "currency:Kenya", "language:Canada"]),
    ("facts", "held-out"): (264, ["capital:Cambodia", "currency:Croatia", "language:Singapore"]),
    ("arithmetic", "tuning"): (200, ["add:29 + 23", "sub:15 - 12", "mul:4 * 6"]),
    ("arithmetic", "held-out"): (200, ["add:21 + 30", "sub:32 - 20", "mul:12 * 11"]),
    ("opposites", "tuning"): (248, ["opposite:tight", "opposite:unconscious", "opposite:alive"]),
    ("opposites", "held-out"): (248, ["opposite:artificial", "opposite:divide", "opposite:dead"]),
}


@pytest.mark.parametrize(("family", "split"), list(PINNED))
def test_the_split_is_pinned(family: str, split: str) -> None:
    count, first = PINNED[(family, split)]
    chosen = tasks.items(family, split)
    assert len(chosen) == count and [i.id for i in chosen[:3]] == first


def test_the_first_items_of_a_split_take_the_kinds_in_turn() -> None:
    kinds = [i.kind for i in tasks.items("facts", tasks.TUNING)[:50]]
    assert Counter(kinds) == {relation.name: 10 for relation in facts.RELATIONS}
    assert [i.kind for i in tasks.items("arithmetic", tasks.HELD_OUT)[:4]] == list(arithmetic.OPERATIONS)


def test_a_prompt_is_the_shots_then_the_asked_line_without_its_answer() -> None:
    item = tasks.items("facts", tasks.HELD_OUT)[0]
    assert isinstance(item.prompt, str)
    assert item.prompt.splitlines() == [
        "The capital of Italy is Rome.", "The capital of Japan is Tokyo.", "The capital of Kenya is Nairobi.",
        "The capital of Cambodia is",
    ]  # fmt: skip
    assert item.answers == ("Phnom Penh",) and item.rule == Rule.TEXT
    sums = tasks.items("arithmetic", tasks.TUNING)[0]
    assert sums.prompt == "3 + 4 = 7\n9 * 6 = 54\n20 - 8 = 12\n24 / 4 = 6\n29 + 23 ="


@pytest.mark.parametrize("family", FAMILIES)
def test_no_shot_is_asked(family: str) -> None:
    for item in tasks.items(family, tasks.TUNING) + tasks.items(family, tasks.HELD_OUT):
        assert isinstance(item.prompt, str)
        *shots, asked = item.prompt.splitlines()
        assert not any(shot.startswith(asked + " ") for shot in shots), item.id


_SYMBOLS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def test_arithmetic_answers_are_right_small_and_whole() -> None:
    for item in tasks.items("arithmetic", tasks.TUNING) + tasks.items("arithmetic", tasks.HELD_OUT):
        left, symbol, right = item.id.split(":", 1)[1].split()
        result = _SYMBOLS[symbol](int(left), int(right))
        assert result == int(item.reference) and 1 <= result <= 144, item.id
    assert arithmetic.items() == arithmetic.items()  # seeded


def test_tables_have_answers_for_every_subject_and_no_duplicate_subjects() -> None:
    for relation in facts.RELATIONS:
        rows = facts.parse_table(relation.table)
        subjects = [subject for subject, _ in rows]
        assert len(subjects) == len(set(subjects)), relation.name
        assert all(answers and all(normalise(a) for a in answers) for _, answers in rows), relation.name


def test_an_opposite_accepts_the_other_side_of_every_pair_it_appears_in() -> None:
    accepted = dict(opposites.items())
    assert accepted["light"] == ("dark", "heavy")
    assert accepted["old"] == ("young", "new")
    assert accepted["cold"] == ("hot", "warm")  # "cold" is only an alias in `warm = cool | cold`
    assert not {word for pair in opposites.SHOTS for word in pair} & set(accepted)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        (" Brasília.", "brasilia"),
        ("Washington, D.C.", "washington d c"),
        ("the Euro", "euro"),
        ("Saint-Exupéry", "saint exupery"),
        ("N'Djamena", "n djamena"),
        ("...", ""),
    ],
)
def test_normalise_drops_case_accents_punctuation_and_articles(text: str, normalised: str) -> None:
    assert normalise(text) == normalised


@pytest.mark.parametrize(
    ("rule", "text", "prediction"),
    [
        (Rule.TEXT, " Phnom Penh.\nThe capital of", "phnom penh"),
        (Rule.TEXT, "\n", None),
        (Rule.NUMBER, " 52\n7 + 8 = 15", "52"),
        (Rule.NUMBER, " 1,200 apples", "1200"),
        (Rule.NUMBER, " -3", "-3"),
        (Rule.NUMBER, " twelve\n12", None),  # only the first line counts
        (Rule.GSM8K, "3 + 4 = 7\n#### 7", "7"),
    ],
)
def test_read_takes_the_answer_from_the_first_line(rule: Rule, text: str, prediction: str | None) -> None:
    assert read(rule, text) == prediction


def test_matches_compares_normalised_text_and_numbers_numerically() -> None:
    assert matches(Rule.TEXT, normalise("Washington D.C."), ("Washington, D.C.", "Washington"))
    assert not matches(Rule.TEXT, normalise("Santiago Chile"), ("Santiago",))
    assert matches(Rule.NUMBER, "12.0", ("12",)) and not matches(Rule.NUMBER, "12.5", ("12",))
    assert not matches(Rule.NUMBER, None, ("12",))


@pytest.mark.parametrize(
    ("text", "answers", "prediction"),
    [
        (" English. To determine the official language of ...", ("English",), "english"),  # a chat model talks on
        (" K. To determine the correct chemical symbol", ("K",), "k"),
        (" Santiago, Chile", ("Santiago",), "santiago"),  # the first phrase answers
        (" F. Scott Fitzgerald.", ("F. Scott Fitzgerald", "Fitzgerald"), "f scott fitzgerald"),  # initials kept whole
        (" Washington, D.C. is the capital", ("Washington, D.C.", "Washington"), "washington"),
        (" London, Paris", ("Paris",), "london"),  # only a first phrase counts, not a later one
        (" Kenya rupee. Let's analyze", ("Kenyan shilling",), "kenya rupee"),
        (" (Paris) is the answer", ("Paris",), "paris"),
    ],
)
def test_a_text_answer_is_its_first_phrase_whatever_follows(
    text: str, answers: tuple[str, ...], prediction: str
) -> None:
    assert read(Rule.TEXT, text, answers) == prediction
    assert matches(Rule.TEXT, prediction, answers) == (prediction != "london" and prediction != "kenya rupee")


def test_first_line_is_the_answer_before_the_continuation() -> None:
    assert first_line("  Rome.\nThe capital of Spain is Madrid.") == "Rome."
