"""FuseResult.usage counts the returned text in the lead worker's tokens, exactly, whatever ended it."""

from __future__ import annotations

import pytest

from coolfusion.client import FuseOptions, FusionClient, chat
from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import worker_pb2

from reference import PAPER_STRATEGY, ReferenceModel
from worker_probes import tiny_references

FAMILIES = ("bpe", "metaspace", "char")
TEXT = "Tom has 3 apples and buys 4 more."
CHAT = chat("What is 100 minus 37?")
LOOPING = "a b a b a b a b a b a b"  # the metaspace model loops after it (see test_fusion_service.py)


@pytest.fixture(scope="module")
def client(tiny_trio):
    with FusionClient(tiny_trio.address, timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def references(tiny_model_dirs) -> dict[str, ReferenceModel]:
    return tiny_references(tiny_model_dirs, FAMILIES)


def assert_exact(result: opb.FuseResult, references: dict[str, ReferenceModel], prompt) -> None:
    """The usage equals the counting worker's own tokenization of its rendered prompt and of the text."""
    assert result.HasField("usage")
    model = references[result.usage.worker]
    rendered, special = model.render(prompt)
    expected = (len(model.ids(rendered, special)), model.answer_tokens(rendered, special, result.text))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == expected


def options(**kwargs) -> FuseOptions:
    return FuseOptions(strategy=PAPER_STRATEGY, **kwargs)


@pytest.mark.parametrize("lead", FAMILIES)
@pytest.mark.parametrize("prompt", [TEXT, CHAT], ids=["text", "chat"])
def test_the_first_worker_counts_an_answer_ended_by_length(client, references, lead, prompt):
    workers = (lead, *(f for f in FAMILIES if f != lead))
    result = client.fuse(prompt, options(workers=workers, max_new_tokens=20))
    assert result.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert result.usage.worker == lead
    assert result.usage.completion_tokens >= 20
    assert_exact(result, references, prompt)


def _free_answer(client, max_new_tokens=40) -> tuple[str, list[str]]:
    result = client.fuse(TEXT, options(max_new_tokens=max_new_tokens, trace=True))
    return result.text, [step.candidates[step.winner_index].text for step in result.trace]


def test_a_stop_string_inside_the_last_segment(client, references):
    text, winners = _free_answer(client)
    last = len(text) - len(winners[-1])
    stop = next(text[i : i + 2] for i in range(last + 1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    result = client.fuse(TEXT, options(max_new_tokens=40, stop=(stop,)))
    assert result.finish_reason == worker_pb2.FINISH_REASON_STOP and result.text == text[: text.find(stop)]
    assert_exact(result, references, TEXT)


def test_a_stop_string_across_two_segments_is_counted_afresh(client, references):
    # The cut lands before the last winner's start, in text the lead's session already holds.
    text, winners = _free_answer(client)
    joins = [sum(map(len, winners[: k + 1])) for k in range(len(winners) - 1)]
    at = next(j for j in joins if 0 < j < len(text) and text.find(text[j - 1 : j + 1]) == j - 1)
    result = client.fuse(TEXT, options(max_new_tokens=40, stop=(text[at - 1 : at + 1],)))
    assert result.finish_reason == worker_pb2.FINISH_REASON_STOP and result.text == text[: at - 1]
    assert_exact(result, references, TEXT)


def test_a_repetition_cut(client, references):
    guard = opb.FusionStrategy(repetition_guard=opb.REPETITION_GUARD_STOP)
    result = client.fuse(LOOPING, FuseOptions(workers=("metaspace",), max_new_tokens=100, strategy=guard))
    assert result.finish_reason == worker_pb2.FINISH_REASON_REPETITION
    assert_exact(result, references, LOOPING)


def test_cool_r_counts_the_answer_it_returns(client, references):
    result = client.fuse(TEXT, options(max_new_tokens=12, rerank=True))
    assert len(result.rerank) == len(FAMILIES) + 1
    assert result.usage.worker == FAMILIES[0]
    assert_exact(result, references, TEXT)


def test_the_stream_summary_carries_the_same_usage(client):
    request = options(max_new_tokens=16)
    summaries = [e.summary for e in client.fuse_stream(CHAT, request) if e.HasField("summary")]
    assert [s.usage for s in summaries] == [client.fuse(CHAT, request).usage]
