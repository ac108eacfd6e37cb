"""A FuseStream as OpenAI server-sent events: only text that no later cut can remove is sent."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from coolfusion.client import CoolfusionError, FuseOptions
from coolfusion.gateway.errors import from_orchestrator
from coolfusion.gateway.metrics import GatewayMetrics
from coolfusion.gateway.responses import FINISH_REASONS, Reply
from coolfusion.v1 import orchestrator_pb2

logger = logging.getLogger(__name__)

# The repetition guard cuts an answer where a repeat of at least 32 characters started
# (docs/design.md, 3.3 Repetition guard). Every earlier append passed the same check, so the cut
# never starts more than 31 characters before the segment whose append made the answer repeat
# (docs/design.md, 8.3 Streaming).
REPEAT_HOLD_CHARS = 31
DONE = "data: [DONE]\n\n"
Events = AsyncIterator[orchestrator_pb2.FuseStreamResponse]


def hold_chars(options: FuseOptions) -> int | None:
    """How far before a new segment's start its append may cut the answer, in characters; None
    when nothing is final before the end (Cool+R may return a solo answer instead)."""
    if options.rerank or _may_call_tools(options):
        return None
    stop = max((len(s) for s in options.stop), default=1) - 1  # a stop string may start that far back
    return max(stop, REPEAT_HOLD_CHARS if _may_guard(options) else 0)


def _may_guard(options: FuseOptions) -> bool:
    """Unless the request turns the repetition guard off, the orchestrator's default may guard."""
    strategy = options.strategy
    return strategy is None or strategy.repetition_guard != orchestrator_pb2.REPETITION_GUARD_OFF


def _may_call_tools(options: FuseOptions) -> bool:
    """An answer that may be tool calls is sent whole at the end: as calls, or as text."""
    return bool(options.tools) and options.tool_choice != "none"


def held_back_text(options: FuseOptions) -> HeldBackText:
    """The stream of one request's text; without stop strings or guard, nothing is ever cut."""
    never_cut = not (options.rerank or options.stop or _may_guard(options))
    return HeldBackText(hold_chars(options), newest_is_final=never_cut)


class HeldBackText:
    """The fused text as its segments are chosen, released once no stop rule can cut it any more.

    A step event comes before its segment is appended, and that append may cut the answer up to
    `hold_chars` characters before the segment's start; later appends cut later still. So when a
    segment arrives, the text before it, less its last `hold_chars` characters, is final; with no
    stop rule at all, the segment itself is final too."""

    def __init__(self, hold_chars: int | None, newest_is_final: bool = False):
        self._hold = hold_chars
        self._newest_is_final = newest_is_final
        self._text = ""  # every chosen segment, before any cut
        self._sent = 0  # characters released so far

    def add(self, segment: str) -> str:
        """Appends a chosen segment; returns the text that became safe to send ("" for none)."""
        final = -1 if self._hold is None else len(self._text) - self._hold
        self._text += segment
        if self._newest_is_final:
            final = len(self._text)
        end = max(self._sent, final)
        released, self._sent = self._text[self._sent : end], end
        return released

    def finish(self, final: str) -> str:
        """The rest of the final text, after what was released."""
        sent = self._text[: self._sent]
        if not final.startswith(sent):  # the hold above makes this impossible; say so if it happens
            logger.error("the streamed text is not a prefix of the final text; %d characters differ", len(sent))
            return ""
        return final[self._sent :]


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def completion_events(
    reply: Reply, first: orchestrator_pb2.FuseStreamResponse, events: Events, options: FuseOptions,
    metrics: GatewayMetrics, started: float,
) -> AsyncIterator[str]:  # fmt: skip
    """The SSE body: the role of each choice (chat), one chunk per segment released, the rest of
    each final text and its finish reason, the usage when asked for, then [DONE]. A client that
    goes away cancels the task iterating this, which cancels the FuseStream call and so the fusion
    and its sessions. `started` is the request's time.perf_counter(), for the time to the first text."""
    try:
        if reply.call.kind == "chat":
            for index in range(max(options.n, 1)):
                yield sse(reply.chunk(role=True, index=index))
        async for piece in _pieces(reply, first, events, options, metrics, started):
            yield piece
    except CoolfusionError as error:  # the orchestrator failed after the answer began: say so in-band
        logger.warning("stream failed: %s", error, extra={"request_id": reply.request_id})
        yield sse(from_orchestrator(error, reply.call.prompt_param).body())
        yield DONE
    except (asyncio.CancelledError, GeneratorExit):  # the client is gone
        metrics.disconnects.inc()
        logger.info("client went away; fusion cancelled", extra={"request_id": reply.request_id})
        raise


async def _pieces(
    reply: Reply, event: orchestrator_pb2.FuseStreamResponse | None, events: Events, options: FuseOptions,
    metrics: GatewayMetrics, started: float,
) -> AsyncIterator[str]:  # fmt: skip
    """Each choice's text as its segments come (choices interleave), and its end as its summary comes."""
    texts: dict[int, HeldBackText] = {}
    summaries: list[orchestrator_pb2.FuseResult] = []
    first_piece = True
    while event is not None:
        if event.HasField("step"):
            step = event.step
            text = texts.setdefault(step.choice, held_back_text(options))
            if piece := text.add(step.candidates[step.winner_index].text):
                if first_piece:
                    metrics.first_chunk_seconds.observe(time.perf_counter() - started)
                    first_piece = False
                yield sse(reply.chunk(piece, index=step.choice))
        else:
            summary = event.summary
            for piece in _ending(reply, summary, texts.setdefault(summary.choice, held_back_text(options))):
                yield piece
            metrics.count_tokens(summary)
            summaries.append(summary)
        event = await anext(events, None)
    if reply.call.include_usage:
        yield sse(reply.usage_chunk(sorted(summaries, key=lambda s: s.choice)))
    logger.info("fusion %s streamed", summaries[0].request_id, extra={"request_id": reply.request_id})
    yield DONE


def _ending(reply: Reply, summary: orchestrator_pb2.FuseResult, text: HeldBackText) -> list[str]:
    """What one choice sends once its answer is finished: its calls or the rest of its text, and
    its finish reason."""
    index = summary.choice
    pieces = []
    if summary.tool_calls:
        pieces.append(sse(reply.chunk(calls=summary.tool_calls, index=index)))
    elif rest := text.finish(summary.text):
        pieces.append(sse(reply.chunk(rest, index=index)))
    pieces.append(sse(reply.chunk(finish=FINISH_REASONS.get(summary.finish_reason, "stop"), index=index)))
    return pieces
