"""OpenAI response bodies and stream chunks built from a fusion's result."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from coolfusion.gateway.parsing import FusionCall
from coolfusion.gateway.structured import message_fields, tool_call
from coolfusion.v1 import orchestrator_pb2, worker_pb2

# The fusion's finish reasons in OpenAI's words: a loop cut by the repetition guard, like a stop
# string or EOS, ended the answer on purpose ("stop"); only the length limit is "length".
FINISH_REASONS = {
    worker_pb2.FINISH_REASON_EOS: "stop",
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_REPETITION: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
    worker_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass(frozen=True)
class Reply:
    """What every body of one answer repeats: its id, kind, creation time and model."""

    request_id: str
    call: FusionCall
    created: int  # Unix seconds

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.call.kind == 'chat' else 'cmpl'}-{self.request_id}"

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.call.model}

    def completion(self, result: orchestrator_pb2.FuseResult) -> dict[str, Any]:
        """The whole answer, as /v1/chat/completions or /v1/completions return it without streaming."""
        finish = FINISH_REASONS.get(result.finish_reason, "stop")
        if self.call.kind == "chat":
            body = self._envelope("chat.completion")
            message = {"role": "assistant", **message_fields(result), "refusal": None}
            body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
        else:
            body = self._envelope("text_completion")
            body["choices"] = [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}]
        body["usage"] = usage(result)
        body["coolfusion"] = details(result)
        return body

    def chunk(
        self,
        text: str | None = None,
        finish: str | None = None,
        *,
        role: bool = False,
        calls: Sequence[worker_pb2.ToolCall] = (),
    ) -> dict[str, Any]:
        """One stream chunk: a piece of text, the answer's tool calls, the opening role (chat) or
        the closing finish reason."""
        if self.call.kind == "chat":
            body = self._envelope("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [tool_call(call, index) for index, call in enumerate(calls)]
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = self._envelope("text_completion")
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body["choices"] = [choice]
        if self.call.include_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries it
        return body

    def usage_chunk(self, result: orchestrator_pb2.FuseResult) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.call.kind == "chat" else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": usage(result)}


def usage(result: orchestrator_pb2.FuseResult) -> dict[str, int] | None:
    """Token counts by the lead worker; None in the rare case that it failed while counting."""
    if not result.HasField("usage"):
        return None
    prompt, completion = result.usage.prompt_tokens, result.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def details(result: orchestrator_pb2.FuseResult) -> dict[str, Any]:
    """coolfusion's own account of the answer, beside the OpenAI fields (clients ignore it)."""
    return {
        "request_id": result.request_id,
        "finish_reason": worker_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower(),
        "source": result.source,
        "usage_counted_by": result.usage.worker if result.HasField("usage") else None,
        "shares": [{"worker": s.worker, "segments": s.segments, "chars": s.chars} for s in result.shares],
        "dropped": [{"worker": d.worker, "reason": d.reason, "step": d.step} for d in result.dropped],
    }
