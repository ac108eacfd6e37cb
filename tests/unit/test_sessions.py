"""Session store bounds: token budget, LRU eviction, idle TTL, stale contexts, idempotent opens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coolfusion.worker.backend import PromptSpec
from coolfusion.worker.errors import InvalidRequest, OverCapacity, SessionConflict, SessionNotFound, StaleContext
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

from in_process import StoreDriver, tiny_backend

PROMPT = PromptSpec(text="Sam had 25 dollars and spent 9 dollars on lunch.")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def backend(tiny_model_dirs) -> Iterator[TransformersBackend]:
    backend = tiny_backend(tiny_model_dirs["bpe"], "bpe")
    yield backend
    backend.shutdown()


def driven_store(backend: TransformersBackend, limits: SessionLimits, **kwargs) -> StoreDriver:
    """A store over `backend`, driven synchronously."""
    return StoreDriver(SessionStore(backend, limits, **kwargs))


def test_least_recently_used_session_is_evicted_when_the_budget_is_full(backend):
    tokens = len(backend.tokenize(PROMPT.text, True))
    store = driven_store(backend, SessionLimits(token_budget=3 * tokens))
    for sid in ("a", "b", "c"):
        store.open(sid, PROMPT, "")
    store.generate("a", Expectation(tokens), "", 1, ())  # "a" becomes the most recently used
    store.open("d", PROMPT, "")
    assert store.load().open_sessions == 3
    with pytest.raises(SessionNotFound):
        store.generate("b", Expectation(tokens), "", 1, ())
    assert store.load().evicted_sessions == 1
    assert store.load().cached_tokens <= 3 * tokens


def test_max_sessions_evicts_the_oldest(backend):
    store = driven_store(backend, SessionLimits(max_sessions=2))
    for sid in ("a", "b", "c"):
        store.open(sid, PROMPT, "")
    assert store.load().open_sessions == 2
    with pytest.raises(SessionNotFound):
        store.close("a") or store.generate("a", Expectation(1), "", 1, ())


def test_idle_sessions_expire_after_the_ttl(backend):
    clock = FakeClock()
    store = driven_store(backend, SessionLimits(idle_ttl_s=60), clock=clock)
    store.open("old", PROMPT, "")
    clock.now += 30
    store.open("young", PROMPT, "")
    clock.now += 45
    assert store.evict_idle() == 1
    assert store.load().open_sessions == 1
    with pytest.raises(SessionNotFound, match="old"):
        store.generate("old", Expectation(1), "", 1, ())


def test_a_request_larger_than_the_whole_budget_is_refused(backend):
    store = driven_store(backend, SessionLimits(token_budget=8))
    with pytest.raises(OverCapacity, match="budget is 8"):
        store.open("big", PROMPT, "")
    assert store.load().open_sessions == 0


def test_a_prompt_over_the_model_context_names_both_numbers(backend):
    store = driven_store(backend, SessionLimits())
    long_prompt = PromptSpec(text="apples and pears " * 3000)
    with pytest.raises(InvalidRequest, match=rf"tokens; the model's limit is {backend.description.max_context_tokens}"):
        store.open("long", long_prompt, "")


def test_stale_context_length_is_refused_and_changes_nothing(backend):
    store = driven_store(backend, SessionLimits())
    opened = store.open("s", PROMPT, "")
    with pytest.raises(StaleContext, match=f"has {opened.context_tokens} context tokens"):
        store.generate("s", Expectation(opened.context_tokens + 1), " more", 4, ())
    assert store._sessions["s"].answer_text == ""
    generated = store.generate("s", Expectation(opened.context_tokens), "", 4, ())
    assert generated.context_tokens == opened.context_tokens


def test_retried_append_is_detected(backend):
    store = driven_store(backend, SessionLimits())
    opened = store.open("s", PROMPT, "")
    store.generate("s", Expectation(opened.context_tokens), " He", 4, ())
    with pytest.raises(StaleContext):
        store.generate("s", Expectation(opened.context_tokens), " He", 4, ())  # the same call, sent twice
    assert store._sessions["s"].answer_text == " He"


def test_open_is_idempotent_for_the_same_context_and_refuses_another(backend):
    store = driven_store(backend, SessionLimits())
    first = store.open("s", PROMPT, "")
    again = store.open("s", PROMPT, "")
    assert (again.session_id, again.prompt_tokens, again.context_tokens) == (
        first.session_id,
        first.prompt_tokens,
        first.context_tokens,
    )
    assert again.compute_ms == 0.0  # nothing was recomputed
    assert store.load().open_sessions == 1
    with pytest.raises(SessionConflict):
        store.open("s", PromptSpec(text="another prompt"), "")


def test_unknown_and_closed_sessions_are_not_found(backend):
    store = driven_store(backend, SessionLimits())
    store.open("s", PROMPT, "")
    assert store.close("s") is True
    assert store.close("s") is False
    with pytest.raises(SessionNotFound):
        store.score("s", Expectation(1), [])


def test_retried_append_that_keeps_the_token_count_is_caught_by_the_answer_length(backend):
    # For the byte-level BPE tokenizer " app" + "les" re-tokenizes into as many tokens as " app".
    store = driven_store(backend, SessionLimits())
    opened = store.open("s", PromptSpec(text="Tom has 3"), " app")
    before = Expectation(opened.context_tokens, answer_chars=4)
    store.generate("s", before, "les", 2, ())
    assert len(store._sessions["s"].context_ids) == opened.context_tokens  # the token count alone can't tell
    with pytest.raises(StaleContext, match="answer of 7 characters"):
        store.generate("s", before, "les", 2, ())
    assert store._sessions["s"].answer_text == " apples"


def test_generation_that_could_run_past_the_model_context_is_refused(backend):
    store = driven_store(backend, SessionLimits())
    text = "apples " * 2000
    prompt_tokens = len(backend.tokenize(text, True))
    budget = backend.description.max_context_tokens - prompt_tokens
    opened = store.open("s", PromptSpec(text=text), "")
    with pytest.raises(InvalidRequest, match="context \\+ segment cap"):
        store.generate("s", Expectation(opened.context_tokens), "", budget + 1, ())
