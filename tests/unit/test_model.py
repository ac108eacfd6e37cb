"""The transformers backend's cached, batched generation and scoring equal uncached transformers computations."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from coolfusion.worker.backend import CandidateText, Finish, PromptSpec
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.segments import segment_cut
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits
from coolfusion.worker.text import common_prefix_length

from in_process import StoreDriver, tiny_backend

PROMPTS = ["Tom has 3 apples and buys 4 more.", "The weather today is", "Question: what is 19 and 23?\nAnswer:"]


@dataclass
class Tiny:
    """A tiny model behind the backend, and a second copy with transformers' own attention."""

    backend: TransformersBackend
    plain: PreTrainedModel
    family: str

    @property
    def model(self):
        return self.backend._model

    def store(self, limits: SessionLimits | None = None) -> StoreDriver:
        return StoreDriver(SessionStore(self.backend, limits or SessionLimits()))


@pytest.fixture(scope="module", params=["bpe", "metaspace", "char"])
def tiny(request, tiny_model_dirs) -> Iterator[Tiny]:
    folder = tiny_model_dirs[request.param]
    backend = tiny_backend(folder, request.param)
    yield Tiny(backend, AutoModelForCausalLM.from_pretrained(folder).eval(), request.param)
    backend.shutdown()


def uncached_segment(tiny: Tiny, context_ids: list[int], cap: int) -> tuple[str, Finish]:
    """transformers' own greedy generate, without a cache, cut at the segment boundary."""
    model = tiny.model
    out = tiny.plain.generate(
        torch.tensor([context_ids]), max_new_tokens=cap, do_sample=False, use_cache=False, pad_token_id=model.eos_id
    )
    new = out[0, len(context_ids) :].tolist()
    before = model.decode(context_ids)
    text = ""
    for i, token in enumerate(new):
        if token in model.stop_ids:
            return text, Finish.EOS
        text = model.decode(context_ids + new[: i + 1])[len(before) :]
        cut = segment_cut(text, ())
        if cut:
            return text[: cut[0]], cut[1]
    return text, Finish.LENGTH


def full_log_prob(tiny: Tiny, context_ids: list[int], row: list[int], eos: bool) -> tuple[float, int]:
    start = max(common_prefix_length(context_ids, row), 1)
    ids = row + [tiny.model.eos_id] if eos else row
    with torch.no_grad():
        log_probs = torch.log_softmax(tiny.plain(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(log_probs[j - 1, ids[j]]) for j in range(start, len(ids))), len(ids) - start


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_segments_equal_uncached_greedy_generate(tiny: Tiny, prompt: str):
    store = tiny.store()
    opened = store.open("s", PromptSpec(text=prompt), "")
    context_tokens, append = opened.context_tokens, ""
    for _ in range(6):
        generated = store.generate("s", Expectation(context_tokens), append, 16, ())
        context_tokens, segment = generated.context_tokens, generated.segment
        expected = uncached_segment(tiny, store._sessions["s"].context_ids, 16)
        assert (segment.text, segment.finish) == expected
        if segment.finish is Finish.EOS:
            break
        append = segment.text


def test_segments_stay_exact_past_the_sliding_window(tiny: Tiny):
    # The metaspace model's first layer attends to a 32-token window; this context is far longer.
    store = tiny.store()
    prompt = " ".join(PROMPTS * 4)
    opened = store.open("s", PromptSpec(text=prompt), "")
    assert opened.context_tokens > 64
    context_tokens, append = opened.context_tokens, ""
    for _ in range(4):
        generated = store.generate("s", Expectation(context_tokens), append, 16, ())
        context_tokens = generated.context_tokens
        segment = generated.segment
        assert (segment.text, segment.finish) == uncached_segment(tiny, store._sessions["s"].context_ids, 16)
        append = segment.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_scores_equal_full_recompute(tiny: Tiny, prompt: str):
    store = tiny.store()
    opened = store.open("s", PromptSpec(text=prompt), " Tom")
    generated = store.generate("s", Expectation(opened.context_tokens), "", 16, ())
    candidates = [
        CandidateText(generated.segment.text),
        CandidateText("s have 7"),  # likely merges with " Tom" across the join
        CandidateText(" apples", ends_with_eos=True),
        CandidateText("", ends_with_eos=True),
    ]
    scored = store.score("s", Expectation(generated.context_tokens), candidates)
    session = store._sessions["s"]
    for candidate, score in zip(candidates, scored.scores):
        row = tiny.model.tokenize(session.context_text + candidate.text, True)
        expected, count = full_log_prob(tiny, session.context_ids, row, candidate.ends_with_eos)
        assert score.scored_tokens == count
        assert score.log_prob_sum == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_append_that_merges_across_the_join_recomputes_from_the_first_changed_token(tiny: Tiny):
    store = tiny.store()
    opened = store.open("s", PromptSpec(text="Tom has 3 ap"), "")
    store.generate("s", Expectation(opened.context_tokens), "", 4, ())
    generated = store.generate("s", Expectation(opened.context_tokens), "ples and 4 more", 4, ())
    session = store._sessions["s"]
    full_ids = tiny.model.tokenize("Tom has 3 apples and 4 more", True)
    assert session.context_ids == full_ids
    assert session.cache.ids[: len(full_ids)] == full_ids
    # The cache must be usable: the next segment equals one from a fresh, uncached context.
    assert (generated.segment.text, generated.segment.finish) == uncached_segment(tiny, full_ids, 4)


def test_merge_case_really_occurs_for_byte_level_bpe(tiny_model_dirs):
    # Guards the test above against silently testing nothing: for the BPE tokenizer the join
    # "ap" + "ples" must re-tokenize the context's last token.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["bpe"])
    before = tokenizer("Tom has 3 ap")["input_ids"]
    after = tokenizer("Tom has 3 apples and 4 more")["input_ids"]
    assert common_prefix_length(before, after) < len(before)


def test_sync_reuses_the_cache_and_rolls_back(tiny: Tiny):
    store = tiny.store()
    ids = tiny.model.tokenize("The quick brown fox jumps over the lazy dog", True)
    fresh, kv = SessionKV(), SessionKV()
    store._loop.run_until_complete(tiny.backend.sync(fresh, ids))
    store._loop.run_until_complete(tiny.backend.sync(kv, ids[:-3] + [5, 6, 7]))  # a tail to roll back
    passes = tiny.backend.passes
    store._loop.run_until_complete(tiny.backend.sync(kv, ids))
    assert tiny.backend.passes == passes + 1  # only the diverging tail was recomputed, in one pass
    assert kv.ids == ids
    assert kv.next_logits is not None and fresh.next_logits is not None
    assert torch.allclose(kv.next_logits, fresh.next_logits, atol=1e-4)


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        (" Hello world", (), (6, Finish.BOUNDARY)),
        ("  \n", (), None),
        ("12\n", (), (2, Finish.BOUNDARY)),
        ("a=b;", (";",), (4, Finish.STOP)),
        ("x ##", ("##",), (1, Finish.BOUNDARY)),
    ],
)
def test_segment_cut(text, stops, expected):
    assert segment_cut(text, stops) == expected
