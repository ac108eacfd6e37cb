"""Continuous batching: concurrent calls of different sessions share forward passes, and answer as
they would alone; cancelled calls leave; closing and eviction never wait behind model work."""

from __future__ import annotations

import asyncio
import threading
import weakref

import pytest
import torch

from coolfusion.worker.backend import CandidateText, PromptSpec
from coolfusion.worker.errors import OverCapacity, SessionNotFound
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.hf.model import Feed
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import BatchLimits, SessionLimits

from in_process import tiny_backend

PROMPTS = [
    "Tom has 3 apples and buys 4 more.",
    "The weather today is",
    "Question: what is 19 and 23?\nAnswer:",
    "A train travels 60 miles per hour for 2 hours. How far does it go? It",
    "Every morning the baker makes 48 loaves",
    "x",
]


@pytest.fixture(params=["bpe", "metaspace", "char"])
def family(request) -> str:
    return request.param


def backend_for(tiny_model_dirs, family: str, **limits) -> TransformersBackend:
    return tiny_backend(tiny_model_dirs[family], family, BatchLimits(**limits))


async def segments_of(store: SessionStore, session_id: str, prompt: str, steps: int) -> list[str]:
    """A chain of segments, each appended before the next, as a fusion of one worker would."""
    opened = await store.open(session_id, PromptSpec(text=prompt), "")
    context_tokens, append, texts = opened.context_tokens, "", []
    for _ in range(steps):
        generated = await store.generate(session_id, Expectation(context_tokens), append, 16, ())
        context_tokens, append = generated.context_tokens, generated.segment.text
        texts.append(f"{generated.segment.text}|{generated.segment.finish.value}")
    return texts


def run_alone_and_together(backend: TransformersBackend, steps: int = 5) -> tuple[list, list, int, int]:
    async def alone() -> list[list[str]]:
        store = SessionStore(backend, SessionLimits())
        return [await segments_of(store, f"a{i}", p, steps) for i, p in enumerate(PROMPTS)]

    async def together() -> list[list[str]]:
        store = SessionStore(backend, SessionLimits())
        return list(await asyncio.gather(*(segments_of(store, f"t{i}", p, steps) for i, p in enumerate(PROMPTS))))

    before = backend.passes
    expected = asyncio.run(alone())
    alone_passes = backend.passes - before
    got = asyncio.run(together())
    return expected, got, alone_passes, backend.passes - before - alone_passes


def test_concurrent_sessions_share_passes_and_answer_as_alone(tiny_model_dirs, family):
    backend = backend_for(tiny_model_dirs, family)
    try:
        expected, got, alone_passes, together_passes = run_alone_and_together(backend)
    finally:
        backend.shutdown()
    assert got == expected
    # Six sessions decoding side by side need far fewer passes than one after another.
    assert together_passes < alone_passes / 2


def test_chunked_prefill_answers_as_one_pass(tiny_model_dirs, family):
    long_prompt = " ".join(PROMPTS * 3)
    answers = []
    for limits in ({"max_tokens": 4096}, {"max_tokens": 7}):
        backend = backend_for(tiny_model_dirs, family, **limits)
        try:
            store = SessionStore(backend, SessionLimits())
            answers.append(asyncio.run(segments_of(store, "s", long_prompt, 4)))
        finally:
            backend.shutdown()
    assert answers[0] == answers[1]


def test_a_session_copies_the_prompt_another_open_session_holds(tiny_model_dirs, family):
    backend = backend_for(tiny_model_dirs, family)
    fed: list[int] = []
    backend.observe_passes(lambda stats: fed.append(stats.tokens))
    prompt = " ".join(PROMPTS)

    async def scenario() -> tuple[list[str], list[str], int, int, int, int]:
        store = SessionStore(backend, SessionLimits())
        first = await segments_of(store, "first", prompt, 3)
        fed.clear()
        same = (await store.open("same", PromptSpec(text=prompt), "")).context_tokens
        same_fed = sum(fed)
        fed.clear()
        longer = (await store.open("longer", PromptSpec(text=prompt + " And then"), "")).context_tokens
        longer_fed = sum(fed)
        for session_id in ("first", "same", "longer"):
            store.close(session_id)
        fed.clear()
        alone = (await store.open("alone", PromptSpec(text=prompt), "")).context_tokens
        assert sum(fed) == alone  # the closed sessions' caches are gone: nothing left to copy
        again = await segments_of(store, "again", prompt, 3)
        return first, again, same, same_fed, longer, longer_fed

    try:
        first, again, same, same_fed, longer, longer_fed = asyncio.run(scenario())
    finally:
        backend.shutdown()
    assert same > 1 and same_fed == 1  # only the last token, for its logits
    assert 1 < longer_fed < longer  # the shared prompt copied, its new tail computed
    assert again == first  # "again" copied its prompt from "alone": the same answer


def test_scores_of_different_sessions_batched_together_equal_alone(tiny_model_dirs, family):
    backend = backend_for(tiny_model_dirs, family)
    candidates = [CandidateText(" apples"), CandidateText(" 7 more", ends_with_eos=True), CandidateText("")]

    async def scores(together: bool) -> list[list[tuple[int, float]]]:
        store = SessionStore(backend, SessionLimits())
        opened = [await store.open(f"s{i}", PromptSpec(text=p), "") for i, p in enumerate(PROMPTS)]
        calls = [store.score(o.session_id, Expectation(o.context_tokens), candidates) for o in opened]
        results = await asyncio.gather(*calls) if together else [await call for call in calls]
        return [[(s.scored_tokens, s.log_prob_sum) for s in r.scores] for r in results]

    try:
        alone, together = asyncio.run(scores(False)), asyncio.run(scores(True))
    finally:
        backend.shutdown()
    for alone_scores, batched_scores in zip(alone, together):
        assert [n for n, _ in batched_scores] == [n for n, _ in alone_scores]
        assert [lp for _, lp in batched_scores] == pytest.approx([lp for _, lp in alone_scores], abs=1e-4)


def test_batched_logits_differ_from_alone_only_by_float_rounding(tiny_model_dirs, family):
    """The batched-vs-alone logit error, measured: the margin a near-tie must fall within."""
    backend = backend_for(tiny_model_dirs, family)
    model = backend._model
    contexts = [model.tokenize(p, True) for p in PROMPTS]
    try:
        alone = [model.forward([Feed(SessionKV(), 0, ids, (len(ids) - 1,))])[0] for ids in contexts]
        together = model.forward([Feed(SessionKV(), 0, ids, (len(ids) - 1,)) for ids in contexts])
    finally:
        backend.shutdown()
    error = max(float((a - b).abs().max()) for a, b in zip(alone, together))
    assert error < 1e-3, f"batched logits of {family} differ from alone by {error}"


def test_a_cancelled_call_leaves_the_batch_and_the_session_stays_usable(tiny_model_dirs):
    backend = backend_for(tiny_model_dirs, "char")

    async def scenario() -> tuple[str, str]:
        store = SessionStore(backend, SessionLimits())
        opened = await store.open("s", PromptSpec(text=PROMPTS[0]), "")
        call = asyncio.create_task(store.generate("s", Expectation(opened.context_tokens), " and", 64, ()))
        await asyncio.sleep(0)  # submitted
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The append happened before the cancel; the caller knows the new length from its own text.
        session = store._sessions["s"]
        again = await store.generate("s", Expectation(len(session.context_ids)), "", 16, ())
        fresh = SessionStore(backend, SessionLimits())
        reopened = await fresh.open("f", PromptSpec(text=PROMPTS[0]), " and")
        expected = await fresh.generate("f", Expectation(reopened.context_tokens), "", 16, ())
        return again.segment.text, expected.segment.text

    try:
        got, expected = asyncio.run(scenario())
    finally:
        backend.shutdown()
    assert got == expected
    assert backend.queue_depth == 0


def test_calls_beyond_the_queue_bound_are_refused_at_once(tiny_model_dirs):
    backend = backend_for(tiny_model_dirs, "char", max_queued=2, max_sessions=1)

    async def scenario() -> list[object]:
        store = SessionStore(backend, SessionLimits())
        opened = [await store.open(f"s{i}", PromptSpec(text=p), "") for i, p in enumerate(PROMPTS[:4])]
        calls = [store.generate(o.session_id, Expectation(o.context_tokens), "", 64, ()) for o in opened]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    try:
        results = asyncio.run(scenario())
    finally:
        backend.shutdown()
    refused = [r for r in results if isinstance(r, OverCapacity)]
    assert len(refused) == 2 and "limit is 2" in str(refused[0])


class PassGate:
    """Once closed, holds the model thread inside its next forward pass until opened: the model is
    busy for as long as the test needs, however loaded the machine is. It starts open."""

    def __init__(self, backend: TransformersBackend):
        self._model = backend._model
        self._forward = self._model.forward
        self._opened = threading.Event()
        self._opened.set()
        self._entered = threading.Event()
        self._model.forward = self._held  # type: ignore[method-assign]

    def close(self) -> None:
        self._entered.clear()
        self._opened.clear()

    def _held(self, feeds: list[Feed]) -> list[torch.Tensor]:
        self._entered.set()
        self._opened.wait()
        return self._forward(feeds)

    async def entered(self) -> None:
        """Returns once the model thread is inside a pass (60 s only bounds a broken test's hang)."""
        assert await asyncio.to_thread(self._entered.wait, 60), "the model thread never started a pass"

    def open(self) -> None:
        self._opened.set()


def buffers_of(kv: SessionKV) -> list[weakref.ref]:
    return [weakref.ref(buffer) for buffers in (kv._keys, kv._values) for buffer in buffers.values()]


def test_closing_or_evicting_frees_the_cache_before_returning_while_the_model_thread_is_busy(tiny_model_dirs, family):
    backend = backend_for(tiny_model_dirs, family)
    fed: list[int] = []
    backend.observe_passes(lambda stats: fed.append(stats.tokens))
    prompt = " ".join(PROMPTS)
    now = [0.0]
    gate = PassGate(backend)

    async def scenario() -> tuple[int, int]:
        store = SessionStore(backend, SessionLimits(idle_ttl_s=10), clock=lambda: now[0])
        for session_id, text in (("closed", prompt), ("evicted", prompt + " And then"), ("busy", PROMPTS[1])):
            await store.open(session_id, PromptSpec(text=text), "")
        closed, evicted = store._sessions["closed"].cache, store._sessions["evicted"].cache
        closed_buffers, evicted_buffers = buffers_of(closed), buffers_of(evicted)
        assert closed_buffers and evicted_buffers
        gate.close()  # the next pass holds the model thread
        busy = store._sessions["busy"]
        call = asyncio.create_task(store.generate("busy", Expectation(len(busy.context_ids)), " and", 16, ()))
        await gate.entered()
        assert store.close("closed")
        now[0] += 11  # past the idle TTL: "evicted" goes, "busy" is spared while its call runs
        assert store.evict_idle() == 1 and list(store._sessions) == ["busy"]
        # Released before close and eviction returned, while the model thread is inside a pass:
        for kv, buffers in ((closed, closed_buffers), (evicted, evicted_buffers)):
            assert kv.cached_tokens == 0 and kv not in backend._donors
            assert all(buffer() is None for buffer in buffers)  # no reference is left anywhere
        gate.open()
        await call
        fed.clear()
        alone = await store.open("alone", PromptSpec(text=prompt), "")
        return alone.context_tokens, sum(fed)

    try:
        alone, alone_fed = asyncio.run(scenario())
    finally:
        gate.open()
        backend.shutdown()
    assert alone_fed == alone  # nothing was left to copy the prompt from


def test_a_call_in_flight_on_a_closed_session_ends_at_its_next_pass_and_frees_the_cache(tiny_model_dirs):
    backend = backend_for(tiny_model_dirs, "char", max_tokens=4)  # the append below takes many passes
    gate = PassGate(backend)

    async def scenario() -> None:
        store = SessionStore(backend, SessionLimits(max_sessions=1))
        opened = await store.open("busy", PromptSpec(text=PROMPTS[0]), "")
        kv = store._sessions["busy"].cache
        gate.close()
        call = asyncio.create_task(
            store.generate("busy", Expectation(opened.context_tokens), " and then some more apples", 16, ())
        )
        await gate.entered()
        with pytest.raises(OverCapacity, match="busy sessions"):
            await store.open("other", PromptSpec(text=PROMPTS[1]), "")  # would need to evict "busy"
        assert store.close("busy") is True  # at once, while the model thread runs this very call
        assert store.load().open_sessions == 0 and kv not in backend._donors
        gate.open()
        with pytest.raises(SessionNotFound, match="closed"):
            await call
        assert kv.cached_tokens == 0 and not kv._keys  # freed as the call left
        with pytest.raises(SessionNotFound):
            await store.generate("busy", Expectation(opened.context_tokens), "", 4, ())

    try:
        asyncio.run(scenario())
    finally:
        gate.open()
        backend.shutdown()
    assert backend.queue_depth == 0


def test_ragged_views_do_not_copy_session_caches():
    kv = SessionKV()
    keys = torch.randn(2, 5, 4)
    kv.write(0, 0, keys, keys)
    view, _ = kv.view(0, 0, 5)
    assert view.data_ptr() == kv.view(0, 0, 1)[0].data_ptr()  # a view of the buffer, not a copy
    assert torch.equal(view, keys)
    kv.ids = [1, 2, 3, 4, 5]
    kv.crop(2)
    assert kv.cached_tokens == 2


def test_a_cache_that_holds_buffers_copies_a_donors_prompt():
    # A session re-opened after a cancelled open keeps the buffers its forward passes made.
    donor, kv = SessionKV(), SessionKV()
    with torch.inference_mode():
        donor.write(0, 0, torch.arange(40.0).reshape(2, 5, 4), -torch.arange(40.0).reshape(2, 5, 4))
        kv.write(0, 0, torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))
    donor.ids, kv.ids = [7, 8, 9, 10, 11], [7, 8]
    kv.extend_from(donor, 4)
    assert kv.ids == [7, 8, 9, 10]
    keys, values = kv.view(0, 2, 4)
    assert torch.equal(keys, donor.view(0, 2, 4)[0]) and torch.equal(values, donor.view(0, 2, 4)[1])
