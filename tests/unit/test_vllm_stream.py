"""The vLLM engine's session request (worker/vllm/backend.py's TokenStream): which contexts it
continues, how a segment waits for its tokens, and when it counts as run ahead; under a constraint,
what the request carries to the engine, how the engine's side follows it and when it serves the next
segment (worker/vllm/constraints.py); and where its CPU threads run. No vLLM needed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

from coolfusion.constraints import Constraint, ConstraintKind
from coolfusion.worker.constraints import ConstraintVocabulary
from coolfusion.worker.vllm.backend import TokenStream, bind_compute_threads_to_every_core, read_model_text
from coolfusion.worker.vllm.constraints import ConstrainedRequest, RequestConstraint, serves

PROMPT = [5, 6, 7]
QUANTITY = Constraint(ConstraintKind.REGEX, "[0-9]+ (apples|pears)")
RECORD = Constraint(
    ConstraintKind.JSON_SCHEMA, json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}})
)


def streamed(tokens: list[int], done: bool = False, ahead: int = 4) -> TokenStream:
    stream = TokenStream(PROMPT, ahead)
    stream.receive(tokens, done)
    return stream


def test_it_continues_its_prompt_plus_any_of_its_tokens() -> None:
    stream = streamed([8, 9])
    assert stream.continues(PROMPT)
    assert stream.continues(PROMPT + [8])  # a segment cut before its last token
    assert stream.continues(PROMPT + [8, 9])  # all received: the next token is still to come
    assert not stream.continues(PROMPT + [9])  # another worker's segment won
    assert not stream.continues(PROMPT[:2])  # rolled back before the prompt


def test_a_finished_stream_continues_only_where_it_has_tokens_left() -> None:
    stream = streamed([8, 9], done=True)
    assert stream.continues(PROMPT + [8])
    assert not stream.continues(PROMPT + [8, 9])


def test_a_segment_waits_for_its_token_and_gets_none_once_the_request_ended() -> None:
    async def scenario() -> tuple[int | None, int | None]:
        stream = TokenStream(PROMPT, 4)
        waiting = asyncio.create_task(stream.token_at(len(PROMPT)))
        await asyncio.sleep(0)
        assert not waiting.done()
        stream.receive([8], False)
        first = await waiting
        later = asyncio.create_task(stream.token_at(len(PROMPT) + 1))
        await asyncio.sleep(0)
        stream.end()
        return first, await later

    assert asyncio.run(scenario()) == (8, None)


def test_an_engine_error_reaches_the_waiting_segment() -> None:
    async def scenario() -> None:
        stream = TokenStream(PROMPT, 4)
        waiting = asyncio.create_task(stream.token_at(len(PROMPT)))
        await asyncio.sleep(0)
        stream.end(RuntimeError("engine died"))
        await waiting

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(scenario())


def test_it_runs_ahead_only_past_what_segments_read() -> None:
    stream = streamed([8, 9], ahead=2)
    assert not stream.ran_ahead  # 2 unread tokens
    stream.receive([10], False)
    assert stream.ran_ahead  # 3 unread
    asyncio.run(stream.token_at(len(PROMPT) + 1))  # a segment read up to token 9
    assert not stream.ran_ahead


def test_cpu_threads_are_bound_to_every_core_of_the_process_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3, 1, 2})
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    bind_compute_threads_to_every_core()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1,2,3"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    bind_compute_threads_to_every_core()
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ


@pytest.fixture(scope="module")
def vocabulary(tiny_model_dirs: dict[str, Path]) -> tuple[ConstraintVocabulary, frozenset[int]]:
    """A tiny byte-level BPE model's constraint vocabulary, read as both of the worker's processes
    read it, and its EOS ids."""
    text = read_model_text(tiny_model_dirs["bpe"], "tiny-bpe")
    return ConstraintVocabulary(text.tokenizer, len(text.tokenizer), text.stop_ids), text.stop_ids


def test_a_constraint_travels_to_the_engine_in_extra_args() -> None:
    wanted = RequestConstraint(RECORD, '{"n": ', (17, 4))
    assert RequestConstraint.of_extra_args(wanted.extra_args()) == wanted
    assert RequestConstraint.of_extra_args(None) is None
    assert RequestConstraint.of_extra_args({"other": 1}) is None
    fields = wanted.extra_args()["coolfusion_constraint"]
    for broken in ({**fields, "kind": "yaml"}, {**fields, "tokens": [-1]}, {**fields, "answer_text": 3}, {}):
        with pytest.raises(ValueError, match="coolfusion_constraint"):  # vLLM refuses the request
            RequestConstraint.of_extra_args({"coolfusion_constraint": broken})


def test_a_running_request_serves_the_next_segment_only_from_the_same_answer(
    vocabulary: tuple[ConstraintVocabulary, frozenset[int]],
) -> None:
    words, _ = vocabulary
    running = RequestConstraint(RECORD, '{"n": ')
    generated = words.spell("12")  # the segment "12" won and was appended as these very tokens
    assert serves(running, generated, RequestConstraint(RECORD, '{"n": 12'), words)
    assert not serves(running, generated, RequestConstraint(RECORD, '{"n": 13'), words)  # another segment won
    assert not serves(running, generated, RequestConstraint(QUANTITY, '{"n": 12'), words)
    assert not serves(running, generated, None, words)
    assert not serves(None, generated, RequestConstraint(RECORD, '{"n": 12'), words)
    assert serves(None, generated, None, None)
    # A request started mid-segment reads that segment's first tokens as its own.
    restarted = RequestConstraint(RECORD, '{"n": ', tuple(words.spell("1")))
    assert serves(restarted, words.spell("2"), RequestConstraint(RECORD, '{"n": 12'), words)


def _allows(request: ConstrainedRequest, words: ConstraintVocabulary, text: str) -> bool:
    (token,) = words.spell(text)
    return bool(request.allowed()[token])


def test_the_engine_follows_a_request_from_the_answer_through_its_own_tokens(
    vocabulary: tuple[ConstraintVocabulary, frozenset[int]],
) -> None:
    words, stop_ids = vocabulary
    output: list[int] = []  # vLLM's running list of the request's tokens
    eos_only = np.isin(np.arange(words.logits_width), list(stop_ids))
    request = ConstrainedRequest.start(
        words, RequestConstraint(QUANTITY, "4", tuple(words.spell("2"))), output, eos_only
    )
    assert _allows(request, words, "7") and _allows(request, words, " ")
    assert not _allows(request, words, "x")
    assert not request.allowed()[list(stop_ids)].any()  # "42" is not yet an answer
    output.extend(words.spell(" apples"))
    output.append(-1)  # async scheduling's placeholder for a token still being copied: not read
    assert request.allowed()[list(stop_ids)].all()  # "42 apples": complete, the answer may only end
    assert request.allowed().sum() == len(stop_ids)


def test_a_request_that_leaves_its_language_is_held_to_eos(
    vocabulary: tuple[ConstraintVocabulary, frozenset[int]],
) -> None:
    words, stop_ids = vocabulary
    eos_only = np.isin(np.arange(words.logits_width), list(stop_ids))
    output: list[int] = []
    request = ConstrainedRequest.start(words, RequestConstraint(QUANTITY, "4"), output, eos_only)
    output.extend(words.spell("x"))  # a token its mask did not allow: a bug, never the engine's crash
    assert (request.allowed() == eos_only).all()
    unreadable = ConstrainedRequest.start(words, RequestConstraint(QUANTITY, "apples"), [], eos_only)
    assert (unreadable.allowed() == eos_only).all()
