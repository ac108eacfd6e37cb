"""A worker's constrained segments (docs/design.md section 9.2) equal the cache-free reference's, for
tokenizers of three families, and a session's place in the language follows its answer's text."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest

from coolfusion.constraints import Constraint, ConstraintKind
from coolfusion.worker.backend import Finish, PromptSpec
from coolfusion.worker.errors import InvalidRequest
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

from in_process import StoreDriver, tiny_backend
from reference import ReferenceModel, reference_fuse, regex_grammar, schema_grammar
from worker_probes import tiny_references

FAMILIES = ("bpe", "metaspace", "char")
PROMPT = "Tom has 3 apples and buys 4 more."
# Bounded strings and numbers: a random tiny model would otherwise write one string for ever.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
ANSWER = r"(yes|no), because [a-z ]{1,20}\."
CONSTRAINTS = {
    "schema": (Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(PERSON)), schema_grammar(PERSON)),
    "regex": (Constraint(ConstraintKind.REGEX, ANSWER), regex_grammar(ANSWER)),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def backend(family, tiny_model_dirs) -> Iterator[TransformersBackend]:
    running = tiny_backend(tiny_model_dirs[family], family)
    yield running
    running.shutdown()


@pytest.fixture(scope="module")
def reference(family, tiny_model_dirs) -> ReferenceModel:
    return tiny_references(tiny_model_dirs, [family])[family]


def store(backend: TransformersBackend) -> StoreDriver:
    return StoreDriver(SessionStore(backend, SessionLimits()))


def solo_answer(sessions: StoreDriver, session_id: str, constraint: Constraint, answer: str = "") -> tuple[str, bool]:
    """One model's answer through the store, its own segments appended (a fusion of one worker)."""
    opened = sessions.open(session_id, PromptSpec(text=PROMPT), answer, constraint)
    context, append = opened.context_tokens, ""
    for _ in range(48):
        generated = sessions.generate(session_id, Expectation(context, len(answer)), append, 16, ())
        answer, context, append = answer + append, generated.context_tokens, generated.segment.text
        if generated.segment.finish == Finish.EOS:
            return answer + append, True
    raise AssertionError(f"no end after 48 segments: {answer!r}")


@pytest.mark.parametrize("kind", CONSTRAINTS)
def test_constrained_segments_equal_the_cache_free_reference(backend, reference, kind):
    constraint, grammar = CONSTRAINTS[kind]
    answer, _ = solo_answer(store(backend), "s", constraint)
    expected, _ = reference_fuse([reference], PROMPT, max_new_tokens=200, grammar=grammar)
    # The reference ends the answer where the grammar allows nothing more; the worker ends it by
    # EOS, the only token then allowed, so the texts are the same.
    assert answer == expected
    if kind == "schema":
        assert set(json.loads(answer)) == {"name", "age", "pets"}


def test_a_reopened_session_follows_the_answer_it_was_given(backend):
    constraint, _ = CONSTRAINTS["schema"]
    sessions = store(backend)
    whole, _ = solo_answer(sessions, "first", constraint)
    cut = whole.index(",") + 1  # re-opened after other models' text, in the middle of the object
    assert solo_answer(sessions, "again", constraint, whole[:cut]) == (whole, True)


def test_an_append_that_leaves_the_language_is_refused_and_changes_nothing(backend):
    constraint, _ = CONSTRAINTS["schema"]
    sessions = store(backend)
    opened = sessions.open("s", PromptSpec(text=PROMPT), "", constraint)
    expected = Expectation(opened.context_tokens, 0)
    with pytest.raises(InvalidRequest, match="append_text leaves the constraint's language"):
        sessions.generate("s", expected, "[1", 16, ())
    generated = sessions.generate("s", expected, '{"name":', 16, ())  # the same call, now valid
    assert generated.segment.text.startswith(" ")
    with pytest.raises(InvalidRequest, match="answer_text"):
        sessions.open("t", PromptSpec(text=PROMPT), "nope", constraint)


def test_a_second_session_with_the_same_constraint_compiles_nothing(backend):
    constraint, _ = CONSTRAINTS["regex"]
    sessions = store(backend)
    sessions.open("a", PromptSpec(text=PROMPT), "", constraint)
    compiled = backend._vocabulary.compiles
    sessions.open("b", PromptSpec(text="Another prompt"), "", constraint)
    assert backend._vocabulary.compiles == compiled >= 1


def test_a_model_whose_tokenizer_the_grammar_engine_cannot_read_enforces_nothing(tiny_model_dirs, tmp_path):
    """Served all the same, without constraints: it says so in its description, refuses them."""
    folder = shutil.copytree(tiny_model_dirs["char"], tmp_path / "char")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["decoder"] = {"type": "Fuse"}  # decodes alike; llguidance reads no bare Fuse decoder
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    backend = tiny_backend(folder, "char")
    try:
        assert backend.description.constraint_kinds == ()
        with pytest.raises(InvalidRequest, match="does not enforce json_schema constraints"):
            store(backend).open("s", PromptSpec(text=PROMPT), "", CONSTRAINTS["schema"][0])
    finally:
        backend.shutdown()
