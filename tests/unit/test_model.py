"""The worker's cached generation and scoring equal uncached transformers computations."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coolfusion.worker.model import (
    CandidateText,
    Finish,
    KVState,
    LanguageModel,
    PromptSpec,
    common_prefix_length,
    segment_cut,
)
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

PROMPTS = ["Tom has 3 apples and buys 4 more.", "The weather today is", "Question: what is 19 and 23?\nAnswer:"]


@pytest.fixture(scope="module", params=["bpe", "metaspace", "char"])
def lm(request, tiny_model_dirs) -> LanguageModel:
    folder = tiny_model_dirs[request.param]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return LanguageModel(model, AutoTokenizer.from_pretrained(folder), request.param)


def uncached_segment(lm: LanguageModel, context_ids: list[int], cap: int) -> tuple[str, Finish]:
    """transformers' own greedy generate, without a cache, cut at the segment boundary."""
    input_ids = torch.tensor([context_ids])
    out = lm.model.generate(input_ids, max_new_tokens=cap, do_sample=False, use_cache=False, pad_token_id=lm.eos_id)
    new = out[0, len(context_ids) :].tolist()
    before = lm.decode(context_ids)
    text = ""
    for i, token in enumerate(new):
        if token in lm.stop_ids:
            return text, Finish.EOS
        text = lm.decode(context_ids + new[: i + 1])[len(before) :]
        cut = segment_cut(text, ())
        if cut:
            return text[: cut[0]], cut[1]
    return text, Finish.LENGTH


def full_log_prob(lm: LanguageModel, context_ids: list[int], row: list[int], eos: bool) -> tuple[float, int]:
    start = max(common_prefix_length(context_ids, row), 1)
    ids = row + [lm.eos_id] if eos else row
    with torch.no_grad():
        log_probs = torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(log_probs[j - 1, ids[j]]) for j in range(start, len(ids))), len(ids) - start


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_segments_equal_uncached_greedy_generate(lm: LanguageModel, prompt: str):
    store = SessionStore(lm, SessionLimits())
    opened = store.open("s", PromptSpec(text=prompt), "")
    context_tokens, append = opened.context_tokens, ""
    for _ in range(6):
        segment, context_tokens = store.generate("s", Expectation(context_tokens), append, 16, ())
        expected = uncached_segment(lm, store._sessions["s"].context_ids, 16)
        assert (segment.text, segment.finish) == expected
        if segment.finish is Finish.EOS:
            break
        append = segment.text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cached_scores_equal_full_recompute(lm: LanguageModel, prompt: str):
    store = SessionStore(lm, SessionLimits())
    opened = store.open("s", PromptSpec(text=prompt), " Tom")
    segment, context_tokens = store.generate("s", Expectation(opened.context_tokens), "", 16, ())
    candidates = [
        CandidateText(segment.text),
        CandidateText("s have 7"),  # likely merges with " Tom" across the join
        CandidateText(" apples", ends_with_eos=True),
        CandidateText("", ends_with_eos=True),
    ]
    scores, _ = store.score("s", Expectation(context_tokens), candidates)
    session = store._sessions["s"]
    for candidate, score in zip(candidates, scores):
        row = lm.tokenize(session.context_text + candidate.text, True)
        expected, count = full_log_prob(lm, session.context_ids, row, candidate.ends_with_eos)
        assert score.scored_tokens == count
        assert score.log_prob_sum == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_append_that_merges_across_the_join_recomputes_from_the_first_changed_token(lm: LanguageModel):
    store = SessionStore(lm, SessionLimits())
    opened = store.open("s", PromptSpec(text="Tom has 3 ap"), "")
    store.generate("s", Expectation(opened.context_tokens), "", 4, ())
    segment, _ = store.generate("s", Expectation(opened.context_tokens), "ples and 4 more", 4, ())
    session = store._sessions["s"]
    full_ids = lm.tokenize("Tom has 3 apples and 4 more", True)
    assert session.context_ids == full_ids
    assert session.kv.ids[: len(full_ids)] == full_ids
    # The cache must be usable: the next segment equals one from a fresh, uncached context.
    assert (segment.text, segment.finish) == uncached_segment(lm, full_ids, 4)


def test_merge_case_really_occurs_for_byte_level_bpe(tiny_model_dirs):
    # Guards the test above against silently testing nothing: for the BPE tokenizer the join
    # "ap" + "ples" must re-tokenize the context's last token.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["bpe"])
    before = tokenizer("Tom has 3 ap")["input_ids"]
    after = tokenizer("Tom has 3 apples and 4 more")["input_ids"]
    assert common_prefix_length(before, after) < len(before)


def test_sync_reuses_the_cache_and_rolls_back(lm: LanguageModel):
    kv = KVState()
    ids = lm.tokenize("The quick brown fox jumps over the lazy dog", True)
    reference = lm.sync(KVState(), ids).clone()
    lm.sync(kv, ids[:-3] + [5, 6, 7])  # a diverging tail that must be rolled back
    assert torch.allclose(lm.sync(kv, ids), reference, atol=1e-4)
    assert kv.ids == ids and kv.cache.get_seq_length() == len(ids)


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
