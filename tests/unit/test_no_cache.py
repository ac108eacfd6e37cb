"""A `--no-cache` worker re-prefills every call yet answers exactly as a caching one does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coolfusion.worker.__main__ import parse_settings
from coolfusion.worker.backend import CandidateText, Finish, PromptSpec
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

from in_process import StoreDriver, tiny_backend

PROMPT = "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer:"
STEPS = 5


@pytest.fixture(scope="module", params=["bpe", "metaspace", "char"])
def backend(request, tiny_model_dirs) -> Iterator[TransformersBackend]:
    backend = tiny_backend(tiny_model_dirs[request.param], request.param)
    yield backend
    backend.shutdown()


def fusion_steps(
    backend: TransformersBackend, keep_kv_cache: bool
) -> list[tuple[str, Finish, list[tuple[int, float]]]]:
    """A fusion loop on one worker: generate a segment, score it against rivals, append it; repeat.

    After every call, checks that the store holds cached tokens exactly when it keeps caches.
    """
    store = StoreDriver(SessionStore(backend, SessionLimits(keep_kv_cache=keep_kv_cache)))
    opened = store.open("s", PromptSpec(text=PROMPT), "")
    context_tokens, append, steps = opened.context_tokens, "", []
    for _ in range(STEPS):
        generated = store.generate("s", Expectation(context_tokens), append, 8, ())
        segment, context_tokens = generated.segment, generated.context_tokens
        assert (store.load().cached_tokens > 0) == keep_kv_cache
        rivals = [CandidateText(segment.text), CandidateText(" 7 apples"), CandidateText("", ends_with_eos=True)]
        scores = store.score("s", Expectation(context_tokens), rivals).scores
        assert (store.load().cached_tokens > 0) == keep_kv_cache
        steps.append((segment.text, segment.finish, [(s.scored_tokens, s.log_prob_sum) for s in scores]))
        if segment.finish is Finish.EOS:
            break
        append = segment.text
    return steps


def test_no_cache_gives_the_same_segments_and_scores(backend: TransformersBackend) -> None:
    cached = fusion_steps(backend, keep_kv_cache=True)
    uncached = fusion_steps(backend, keep_kv_cache=False)
    assert [(text, finish) for text, finish, _ in uncached] == [(text, finish) for text, finish, _ in cached]
    assert any(text for text, _, _ in cached)  # the comparison covered real text, not only empty segments
    for (_, _, cached_scores), (_, _, uncached_scores) in zip(cached, uncached):
        assert [count for count, _ in uncached_scores] == [count for count, _ in cached_scores]
        # One full prefill and an incremental one differ only by float rounding.
        assert [lp for _, lp in uncached_scores] == pytest.approx([lp for _, lp in cached_scores], rel=1e-4, abs=1e-4)


def test_no_cache_flag_turns_the_cache_off() -> None:
    assert parse_settings(["--model", "m"]).limits.keep_kv_cache is True
    assert parse_settings(["--model", "m", "--no-cache"]).limits.keep_kv_cache is False
