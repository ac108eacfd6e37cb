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

    def completion(self, results: Sequence[orchestrator_pb2.FuseResult]) -> dict[str, Any]:
        """The whole answers (one per choice), as /v1/chat/completions or /v1/completions return
        them without streaming; the usage counts every choice's completion, as OpenAI's does."""
        body = self._envelope("chat.completion" if self.call.kind == "chat" else "text_completion")
        body["choices"] = [self._choice(result) for result in results]
        body["usage"] = usage(results)
        body["coolfusion"] = details(results[0])
        if len(results) > 1:
            body["coolfusion"]["choices"] = [details(result) for result in results]
        return body

    def _choice(self, result: orchestrator_pb2.FuseResult) -> dict[str, Any]:
        finish = FINISH_REASONS.get(result.finish_reason, "stop")
        choice: dict[str, Any] = {"index": result.choice, "logprobs": None, "finish_reason": finish}
        if self.call.kind == "chat":
            choice["message"] = {"role": "assistant", **message_fields(result), "refusal": None}
        else:
            choice["text"] = result.text
        return choice

    def chunk(
        self,
        text: str | None = None,
        finish: str | None = None,
        *,
        role: bool = False,
        calls: Sequence[worker_pb2.ToolCall] = (),
        index: int = 0,
    ) -> dict[str, Any]:
        """One stream chunk of choice `index`: a piece of text, the answer's tool calls, the opening
        role (chat) or the closing finish reason."""
        if self.call.kind == "chat":
            body = self._envelope("chat.completion.chunk")
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [tool_call(call, position) for position, call in enumerate(calls)]
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = self._envelope("text_completion")
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        body["choices"] = [choice]
        if self.call.include_usage:
            body["usage"] = None  # as OpenAI does: only the last chunk carries it
        return body

    def usage_chunk(self, results: Sequence[orchestrator_pb2.FuseResult]) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        kind = "chat.completion.chunk" if self.call.kind == "chat" else "text_completion"
        return {**self._envelope(kind), "choices": [], "usage": usage(results)}


def usage(results: Sequence[orchestrator_pb2.FuseResult]) -> dict[str, int] | None:
    """Token counts by the lead worker: the prompt once, every choice's completion; None in the
    rare case that the lead failed while counting."""
    if not all(result.HasField("usage") for result in results):
        return None
    prompt = results[0].usage.prompt_tokens
    completion = sum(result.usage.completion_tokens for result in results)
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
        "calibration": result.strategy.calibration or None,
        "rule_choice": {
            "reason": orchestrator_pb2.RuleReason.Name(result.rule_choice.reason).removeprefix("RULE_REASON_").lower(),
            "detail": result.rule_choice.detail,
        },
    }
