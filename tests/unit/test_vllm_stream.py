"""The vLLM engine's session request (worker/vllm/backend.py's TokenStream): which contexts it
continues, how a segment waits for its tokens, and when it counts as run ahead; and where its CPU
threads run. No vLLM needed."""

from __future__ import annotations

import asyncio
import os

import pytest

from coolfusion.worker.vllm.backend import TokenStream, bind_compute_threads_to_every_core

PROMPT = [5, 6, 7]


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
