"""Calls one worker over gRPC and checks every answer: the orchestrator does not trust workers."""

from __future__ import annotations

import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.constraints import Constraint
from coolfusion.constraints.protocol import constraint_proto
from coolfusion.orchestrator.domain import CandidateScore, GeneratedSegment, OpenedSession, Prompt
from coolfusion.orchestrator.observer import current_observer
from coolfusion.orchestrator.sampling import Draw
from coolfusion.serving.security import TokenFile
from coolfusion.v1 import worker_pb2, worker_pb2_grpc

# Statuses that mean "this session's cache is gone or out of step": re-open it with the full text.
_SESSION_LOST = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
# A log-probability is <= 0; allow float rounding of a probability of ~1.
_LOG_PROB_SLACK = 1e-4
# Characters per generated token a sane tokenizer can produce (long whitespace or code tokens).
_MAX_CHARS_PER_TOKEN = 64
_WORKER_SERVICE = "/coolfusion.v1.WorkerService/"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _prompt_proto(prompt: Prompt) -> worker_pb2.Prompt:
    """The protocol's form of a prompt."""
    if prompt.text is not None:
        return worker_pb2.Prompt(text=prompt.text)
    messages = [
        worker_pb2.ChatMessage(
            role=t.role,
            content=t.content,
            tool_calls=[worker_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in t.tool_calls],
            tool_call_id=t.tool_call_id,
        )
        for t in prompt.chat
    ]
    tools = [
        worker_pb2.ToolDefinition(name=t.name, description=t.description, parameters=t.parameters) for t in prompt.tools
    ]
    return worker_pb2.Prompt(chat=worker_pb2.ChatConversation(messages=messages, tools=tools))


def _sampling_proto(draw: Draw | None) -> worker_pb2.SegmentSampling | None:
    if draw is None:
        return None
    plan = draw.plan
    return worker_pb2.SegmentSampling(temperature=plan.temperature, top_p=plan.top_p, top_k=plan.top_k, seed=draw.seed)


class WorkerFailed(Exception):
    """The worker cannot serve this request any more (unreachable, timed out, or answered nonsense)."""


class WorkerUnavailable(WorkerFailed):
    """The worker's process cannot be reached (UNAVAILABLE): gone, restarting or draining. Another
    replica of the same model may serve the session instead."""


class WorkerRejected(WorkerFailed):
    """The worker refused the request as invalid for its model (INVALID_ARGUMENT), for example a
    prompt longer than its context: retrying cannot help."""


class InvalidAnswer(WorkerFailed):
    """The worker answered something impossible (NaN scores, an oversized segment): it is broken."""


class WorkerBusy(Exception):
    """The worker refused a call for lack of room (RESOURCE_EXHAUSTED: its queue or memory is
    full). It is busy, not broken: the call changed nothing and may be retried later."""


class SessionLost(Exception):
    """The worker lost or desynchronised the session; re-opening it with the full text may help."""


class WorkerClient:
    """One registered worker (or one replica of it), as the fusion loop sees it."""

    def __init__(self, name: str, channel: grpc.aio.Channel, token: TokenFile | None = None, address: str = ""):
        self.name = name
        self.address = address  # the replica (pod) this client calls, for placement and logs
        self._channel = channel
        self._stub = worker_pb2_grpc.WorkerServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._token = token  # its first token is sent, read again when the file changes

    def _auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token.tokens()[0]}"),) if self._token is not None else ()

    async def disconnect(self) -> None:
        """Closes the channel: the replica left, or the orchestrator stops."""
        await self._channel.close()

    async def is_serving(self, timeout: float) -> bool:
        """Whether `grpc.health.v1` reports SERVING (not loading or draining)."""
        answer = await self._call(_HEALTH_CHECK, self._health.Check, health_pb2.HealthCheckRequest(), timeout)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    async def get_info(self, timeout: float) -> worker_pb2.GetInfoResponse:
        return await self._call(_WORKER_SERVICE + "GetInfo", self._stub.GetInfo, worker_pb2.GetInfoRequest(), timeout)

    async def open(
        self, session_id: str, prompt: Prompt, answer_text: str, timeout: float, constraint: Constraint | None = None
    ) -> OpenedSession:
        request = worker_pb2.OpenSessionRequest(
            session_id=session_id,
            prompt=_prompt_proto(prompt),
            answer_text=answer_text,
            constraint=constraint_proto(constraint),
        )
        response = await self._call(_WORKER_SERVICE + "OpenSession", self._stub.OpenSession, request, timeout)
        if not 0 < response.prompt_tokens <= response.context_tokens:
            raise InvalidAnswer(
                f"invalid answer: OpenSession token counts {response.prompt_tokens}/{response.context_tokens}"
            )
        return OpenedSession(response.prompt_tokens, response.context_tokens)

    async def generate(
        self,
        session_id: str,
        expected_context_tokens: int,
        expected_answer_chars: int,
        append_text: str,
        max_tokens: int,
        stop_strings: tuple[str, ...],
        timeout: float,
        draw: Draw | None = None,
    ) -> GeneratedSegment:
        request = worker_pb2.GenerateSegmentRequest(
            session_id=session_id,
            expected_context_tokens=expected_context_tokens,
            expected_answer_chars=expected_answer_chars,
            append_text=append_text,
            max_tokens=max_tokens,
            stop_strings=stop_strings,
            sampling=_sampling_proto(draw),
        )
        r = await self._call(_WORKER_SERVICE + "GenerateSegment", self._stub.GenerateSegment, request, timeout)
        self._check_segment(r, max_tokens)
        eos = r.finish_reason == worker_pb2.FINISH_REASON_EOS
        return GeneratedSegment(r.text, eos, r.finish_reason, r.generated_tokens, r.context_tokens, r.compute_ms)

    async def score(
        self, session_id: str, expected_context_tokens: int, candidates: list[tuple[str, bool]], timeout: float
    ) -> tuple[list[CandidateScore], float]:
        """Scores, in candidate order, and the worker's compute time (ms)."""
        request = worker_pb2.ScoreTextRequest(
            session_id=session_id,
            expected_context_tokens=expected_context_tokens,
            candidates=[worker_pb2.Candidate(text=t, ends_with_eos=e) for t, e in candidates],
        )
        response = await self._call(_WORKER_SERVICE + "ScoreText", self._stub.ScoreText, request, timeout)
        if len(response.scores) != len(candidates):
            raise InvalidAnswer(f"invalid answer: {len(response.scores)} scores for {len(candidates)} candidates")
        for score, (text, eos) in zip(response.scores, candidates):
            self._check_score(score, text, eos)
        scores = [CandidateScore(s.scored_tokens, s.log_prob_sum, s.context_tokens_with_text) for s in response.scores]
        return scores, response.compute_ms

    async def close(self, session_id: str, timeout: float) -> None:
        request = worker_pb2.CloseSessionRequest(session_id=session_id)
        await self._call(_WORKER_SERVICE + "CloseSession", self._stub.CloseSession, request, timeout)

    # ---- checks ---------------------------------------------------------------------------

    async def _call(self, path: str, method, request, timeout: float):
        """`method(request)`, with its failure classified; `path` names it for metrics and traces."""
        try:
            with current_observer().worker_call(path, self.name, self.address) as trace_metadata:
                metadata = (*self._auth(), *trace_metadata) or None
                return await method(request, timeout=max(timeout, 0.001), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            reason = f"{error.code().name}: {error.details()}"
            if error.code() in _SESSION_LOST:
                raise SessionLost(reason) from error
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise WorkerUnavailable(reason) from error
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise WorkerBusy(reason) from error
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise WorkerRejected(reason) from error
            raise WorkerFailed(reason) from error

    @staticmethod
    def _check_segment(r: worker_pb2.GenerateSegmentResponse, max_tokens: int) -> None:
        if (
            r.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED
            or r.finish_reason not in worker_pb2.FinishReason.values()
        ):
            raise InvalidAnswer(f"invalid answer: finish reason {r.finish_reason}")
        if r.generated_tokens > max_tokens or len(r.text) > max_tokens * _MAX_CHARS_PER_TOKEN:
            raise InvalidAnswer(
                f"invalid answer: segment of {r.generated_tokens} tokens / {len(r.text)} characters "
                f"over the cap of {max_tokens} tokens"
            )

    @staticmethod
    def _check_score(score: worker_pb2.CandidateScore, text: str, ends_with_eos: bool) -> None:
        if not math.isfinite(score.log_prob_sum) or score.log_prob_sum > _LOG_PROB_SLACK:
            raise InvalidAnswer(f"invalid answer: log-probability {score.log_prob_sum} is not a finite value <= 0")
        # Tokens cover at least one byte each (EOS aside); a join can re-score a few context tokens.
        if score.scored_tokens > len(text.encode()) + ends_with_eos + 8:
            raise InvalidAnswer(f"invalid answer: {score.scored_tokens} scored tokens for {len(text)} characters")
