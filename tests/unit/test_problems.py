"""`coolfusion problems`: seeded arithmetic word problems that `coolfusion eval` reads as GSM8K."""

from __future__ import annotations

import json
import operator
import random
import re
from collections import defaultdict
from pathlib import Path

import pytest

from coolfusion.cli import main as cli
from coolfusion.cli import problems
from coolfusion.cli.gsm8k import extract_answer, load_items
from coolfusion.cli.problems import KINDS, Problem, generate, repeats_example, write_jsonl
from coolfusion.cli.prompts import EXAMPLES


def _exact_division(left: int, right: int) -> int:
    quotient, remainder = divmod(left, right)
    assert remainder == 0, f"{left} / {right} leaves {remainder}"
    return quotient


# The test's own arithmetic, so that a slip in problems.OPERATIONS cannot hide itself.
ARITHMETIC = {
    "add": ("+", operator.add),
    "sub": ("-", operator.sub),
    "mul": ("*", operator.mul),
    "div": ("/", _exact_division),
}


@pytest.fixture(scope="module")
def many() -> list[Problem]:
    return generate(7, 500)


def test_the_same_seed_writes_the_same_file(tmp_path: Path) -> None:
    random.seed(1)  # the global RNG, which the generator must not read
    write_jsonl(generate(3, 100), tmp_path / "first.jsonl")
    random.seed(2)
    write_jsonl(generate(3, 100), tmp_path / "second.jsonl")
    assert (tmp_path / "first.jsonl").read_bytes() == (tmp_path / "second.jsonl").read_bytes()


def test_generating_leaves_the_global_rng_alone() -> None:
    state = random.getstate()
    generate(3, 20)
    assert random.getstate() == state


def test_different_seeds_give_different_problems() -> None:
    first, second = ({p.question for p in generate(seed, 100)} for seed in (1, 2))
    assert len(first & second) < 10


def test_a_shorter_set_is_a_prefix_of_a_longer_one(many: list[Problem]) -> None:
    assert generate(7, 40) == many[:40]


def test_answers_follow_from_the_stated_operands(many: list[Problem]) -> None:
    for problem in many:
        assert len(problem.operands) == len(problem.ops) + 1
        value = problem.operands[0]
        for op, right in zip(problem.ops, problem.operands[1:]):
            symbol, apply = ARITHMETIC[op]
            step = f"{value} {symbol} {right} = {apply(value, right)}"
            assert step in problem.solution, problem
            value = apply(value, right)
            assert 2 <= value <= 999, problem  # every intermediate too: positive and modest
        assert problem.answer == value


def test_the_question_states_exactly_the_operands(many: list[Problem]) -> None:
    for problem in many:
        stated = sorted(int(number) for number in re.findall(r"\d+", problem.question))
        assert stated == sorted(problem.operands), problem


def test_the_final_line_is_what_eval_extracts(many: list[Problem]) -> None:
    for problem in many:
        assert problem.solution.endswith(f"\n#### {problem.answer}")
        assert extract_answer(problem.solution) == str(problem.answer)


def test_kinds_name_the_steps_and_operations(many: list[Problem]) -> None:
    for problem in many:
        steps = {1: "one", 2: "two"}[len(problem.ops)]
        assert problem.kind == f"{steps}-step:{','.join(problem.ops)}"


def test_every_kind_appears_in_the_first_len_kinds_problems() -> None:
    assert len(set(KINDS)) == len(KINDS)
    for seed in range(5):
        assert {p.kind for p in generate(seed, len(KINDS))} == set(KINDS)


def test_all_four_operations_alone_and_in_two_steps() -> None:
    head = generate(7, len(KINDS))
    one_step = {p.ops[0] for p in head if len(p.ops) == 1}
    two_step = {op for p in head if len(p.ops) == 2 for op in p.ops}
    assert one_step == two_step == {"add", "sub", "mul", "div"}


def test_each_kind_has_several_phrasings(many: list[Problem]) -> None:
    """Phrasing: the question with its numbers, names, pronouns and objects blanked out."""
    fillers = {word for person in problems.NAMES for word in person} | set(problems.THINGS)
    blank = re.compile(r"\d+|\b(?:" + "|".join(sorted(fillers)) + r")\b", re.IGNORECASE)
    phrasings = defaultdict(set)
    for problem in many:
        phrasings[problem.kind].add(blank.sub("_", problem.question))
    assert {kind: len(found) >= 2 for kind, found in phrasings.items()} == dict.fromkeys(KINDS, True)


def test_no_duplicate_questions(many: list[Problem]) -> None:
    assert len({p.question for p in many}) == len(many)


def test_no_problem_repeats_a_worked_example(many: list[Problem]) -> None:
    example_questions = {question for question, _ in EXAMPLES}
    assert not [p for p in many if p.question in example_questions or repeats_example(p)]


def test_the_gardener_examples_arithmetic_counts_as_a_repeat() -> None:
    gardener = Problem("q", "s", ("mul", "sub"), (7, 8, 13), 43)
    assert repeats_example(gardener)
    assert not repeats_example(Problem("q", "s", ("mul", "sub"), (7, 8, 12), 44))


def test_a_written_file_loads_with_eval(tmp_path: Path) -> None:
    written = generate(7, 30)
    path = tmp_path / "problems.jsonl"
    write_jsonl(written, path)
    items = load_items(path)
    assert [(item.question, item.reference) for item in items] == [(p.question, str(p.answer)) for p in written]
    kinds = [json.loads(line)["kind"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert kinds == [p.kind for p in written]


def test_the_command_writes_the_seeded_set(tmp_path: Path) -> None:
    out = tmp_path / "sets" / "problems.jsonl"
    assert cli.main(["problems", "--seed", "5", "--count", "26", "--out", str(out)]) == 0
    write_jsonl(generate(5, 26), tmp_path / "expected.jsonl")
    assert out.read_bytes() == (tmp_path / "expected.jsonl").read_bytes()


def test_the_command_defaults_to_the_documented_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["problems", "--count", "13"]) == 0
    write_jsonl(generate(problems.DEFAULT_SEED, 13), tmp_path / "expected.jsonl")
    assert (tmp_path / "problems.jsonl").read_bytes() == (tmp_path / "expected.jsonl").read_bytes()
