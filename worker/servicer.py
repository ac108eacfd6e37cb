"""WorkerService handlers: protobuf in, plain Python calls, protobuf out."""

from __future__ import annotations

import json
import re

import grpc

from coolfusion.constraints import Constraint
from coolfusion.constraints.protocol import constraint_of, kind_number
from coolfusion.constraints.tools import ToolCall, ToolDefinition
from coolfusion.serving.version import SERVER_VERSION
from coolfusion.v1 import worker_pb2, worker_pb2_grpc
from coolfusion.worker.backend import CandidateText, ChatTurn, Finish, ModelBackend, PromptSpec, Sampling
from coolfusion.worker.errors import InvalidRequest, NotReady
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

PROTOCOL_VERSION = "coolfusion.v1"
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FINISH = {
    Finish.BOUNDARY: worker_pb2.FINISH_REASON_BOUNDARY,
    Finish.EOS: worker_pb2.FINISH_REASON_EOS,
    Finish.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    Finish.STOP: worker_pb2.FINISH_REASON_STOP,
}


class RequestValidator:
    """Checks request fields against the worker's limits; errors name the field and the limit."""

    def __init__(self, limits: SessionLimits):
        self.limits = limits

    def text(self, value: str, field: str) -> str:
        if len(value) > self.limits.max_text_chars:
            raise InvalidRequest(f"{field} is {len(value)} characters; the limit is {self.limits.max_text_chars}")
        return value

    def session_id(self, value: str, allow_empty: bool = False) -> str:
        if allow_empty and not value:
            return value
        if not _SESSION_ID.fullmatch(value):
            raise InvalidRequest("session_id must be 1-128 characters of [A-Za-z0-9._:-]")
        return value

    def prompt(self, prompt: worker_pb2.Prompt) -> PromptSpec:
        kind = prompt.WhichOneof("kind")
        if kind == "text":
            if not prompt.text.strip():
                raise InvalidRequest("prompt.text is empty")
            return PromptSpec(text=self.text(prompt.text, "prompt.text"))
        if kind == "chat" and prompt.chat.messages:
            turns = tuple(self._turn(i, m) for i, m in enumerate(prompt.chat.messages))
            tools = tuple(_tool(i, t) for i, t in enumerate(prompt.chat.tools))
            spelled = [t.content + "".join(c.arguments for c in t.tool_calls) for t in turns]
            self.text("".join(spelled) + "".join(t.description + t.parameters for t in tools), "prompt.chat")
            return PromptSpec(chat=turns, tools=tools)
        raise InvalidRequest("prompt must be non-empty text or at least one chat message")

    @staticmethod
    def _turn(index: int, message: worker_pb2.ChatMessage) -> ChatTurn:
        field = f"prompt.chat.messages[{index}]"
        if message.role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequest(f"{field}.role must be system, user, assistant or tool")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(f"{field}: only assistant turns call tools")
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest(f"{field}: a tool turn names the call it answers (tool_call_id)")
        calls = tuple(
            ToolCall(c.id, c.name, _json_object(c.arguments, f"{field}.tool_calls")) for c in message.tool_calls
        )
        return ChatTurn(message.role, message.content, calls, message.tool_call_id)

    def constraint(self, request: worker_pb2.OpenSessionRequest) -> Constraint | None:
        self.text(request.constraint.definition, "constraint.definition")
        try:
            return constraint_of(request.constraint)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    @staticmethod
    def sampling(request: worker_pb2.GenerateSegmentRequest) -> Sampling | None:
        """The call's sampling; None (greedy) when unset or at temperature 0."""
        if not request.HasField("sampling") or request.sampling.temperature == 0:
            return None
        sampling = request.sampling
        if not 0 < sampling.temperature <= 2:  # also refuses NaN
            raise InvalidRequest(f"sampling.temperature is {sampling.temperature}; it must be in [0, 2]")
        if not 0 <= sampling.top_p <= 1:
            raise InvalidRequest(f"sampling.top_p is {sampling.top_p}; it must be in (0, 1] (0 for 1)")
        return Sampling(sampling.temperature, sampling.top_p or 1.0, sampling.top_k, sampling.seed)

    def expected_tokens(self, value: int) -> int:
        if value == 0:
            raise InvalidRequest("expected_context_tokens is required (the context length from the last response)")
        return value

    def max_tokens(self, value: int) -> int:
        if value == 0:
            return self.limits.default_segment_tokens
        if value > self.limits.max_segment_tokens:
            raise InvalidRequest(f"max_tokens is {value}; it must be in [1, {self.limits.max_segment_tokens}]")
        return value

    def stop_strings(self, values) -> tuple[str, ...]:
        if len(values) > self.limits.max_stop_strings:
            raise InvalidRequest(f"{len(values)} stop_strings; the limit is {self.limits.max_stop_strings}")
        for value in values:
            if not 1 <= len(value) <= self.limits.max_stop_chars:
                raise InvalidRequest(f"each stop string must be 1-{self.limits.max_stop_chars} characters")
        return tuple(values)

    def candidates(self, values) -> list[CandidateText]:
        if not 1 <= len(values) <= self.limits.max_candidates:
            raise InvalidRequest(f"{len(values)} candidates; it must be 1-{self.limits.max_candidates}")
        return [
            CandidateText(self.text(c.text, f"candidates[{i}].text"), c.ends_with_eos) for i, c in enumerate(values)
        ]


def _tool(index: int, tool: worker_pb2.ToolDefinition) -> ToolDefinition:
    if not tool.name:
        raise InvalidRequest(f"prompt.chat.tools[{index}].name is empty")
    return ToolDefinition(
        tool.name, tool.description, _json_object(tool.parameters or "{}", f"prompt.chat.tools[{index}]")
    )


def _json_object(text: str, field: str) -> str:
    """`text` when it is a JSON object, or empty (tool arguments and parameter schemas)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"{field}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field}: a JSON object is required")
    return text


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves one model through its backend and session store.

    The server starts before the model is loaded (so health checks answer NOT_SERVING during a
    long load); calls made before `attach` get UNAVAILABLE.
    """

    def __init__(self, limits: SessionLimits):
        self._limits = limits
        self._validate = RequestValidator(limits)
        self._backend: ModelBackend | None = None
        self._sessions: SessionStore | None = None

    def attach(self, backend: ModelBackend, store: SessionStore) -> None:
        self._backend, self._sessions = backend, store

    @property
    def _model(self) -> ModelBackend:
        if self._backend is None:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return self._backend

    @property
    def _store(self) -> SessionStore:
        if self._sessions is None:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return self._sessions

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetInfoResponse:
        """Describes the model, the tokenizer, the limits and the current cache load."""
        model = self._model.description
        load = self._store.load()
        limits = self._limits
        return worker_pb2.GetInfoResponse(
            model_id=model.model_id,
            tokenizer=worker_pb2.TokenizerInfo(
                family=model.tokenizer_family,
                vocab_size=model.vocab_size,
                eos_text=model.eos_text,
                bos_text=model.bos_text,
                has_chat_template=model.has_chat_template,
            ),
            protocol_version=PROTOCOL_VERSION,
            limits=worker_pb2.WorkerLimits(
                max_context_tokens=model.max_context_tokens,
                session_token_budget=self._store.token_budget,
                max_sessions=limits.max_sessions,
                idle_ttl_seconds=limits.idle_ttl_s,
                max_candidates=limits.max_candidates,
                max_text_chars=limits.max_text_chars,
                max_segment_tokens=limits.max_segment_tokens,
            ),
            load=worker_pb2.WorkerLoad(
                open_sessions=load.open_sessions,
                cached_tokens=load.cached_tokens,
                evicted_sessions=load.evicted_sessions,
                engine_requests=self._model.engine_requests,
            ),
            device=model.device,
            dtype=model.dtype,
            placement=[
                worker_pb2.DevicePlacement(device=p.device, parameter_share=p.parameter_share) for p in model.placement
            ],
            server_version=SERVER_VERSION,
            engine=model.engine,
            constraint_kinds=[kind_number(kind) for kind in model.constraint_kinds],
        )

    async def OpenSession(
        self, request: worker_pb2.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.OpenSessionResponse:
        """Renders and prefills the prompt (plus any answer so far) into a new session."""
        opened = await self._store.open(
            self._validate.session_id(request.session_id, allow_empty=True),
            self._validate.prompt(request.prompt),
            self._validate.text(request.answer_text, "answer_text"),
            self._validate.constraint(request),
        )
        return worker_pb2.OpenSessionResponse(
            session_id=opened.session_id,
            prompt_tokens=opened.prompt_tokens,
            context_tokens=opened.context_tokens,
            compute_ms=opened.compute_ms,
        )

    async def GenerateSegment(
        self, request: worker_pb2.GenerateSegmentRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GenerateSegmentResponse:
        """Appends the previous winner, then generates one segment."""
        generated = await self._store.generate(
            self._validate.session_id(request.session_id),
            Expectation(
                self._validate.expected_tokens(request.expected_context_tokens),
                request.expected_answer_chars if request.HasField("expected_answer_chars") else None,
            ),
            self._validate.text(request.append_text, "append_text"),
            self._validate.max_tokens(request.max_tokens),
            self._validate.stop_strings(request.stop_strings),
            self._validate.sampling(request),
        )
        segment = generated.segment
        return worker_pb2.GenerateSegmentResponse(
            text=segment.text,
            finish_reason=_FINISH[segment.finish],
            generated_tokens=segment.generated_tokens,
            context_tokens=generated.context_tokens,
            compute_ms=generated.compute_ms,
        )

    async def ScoreText(
        self, request: worker_pb2.ScoreTextRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ScoreTextResponse:
        """Scores candidates against the session's context in batched forward passes."""
        scored = await self._store.score(
            self._validate.session_id(request.session_id),
            Expectation(self._validate.expected_tokens(request.expected_context_tokens)),
            self._validate.candidates(request.candidates),
        )
        return worker_pb2.ScoreTextResponse(
            scores=[
                worker_pb2.CandidateScore(
                    scored_tokens=s.scored_tokens,
                    log_prob_sum=s.log_prob_sum,
                    context_tokens_with_text=s.context_tokens_with_text,
                )
                for s in scored.scores
            ],
            context_tokens=scored.context_tokens,
            compute_ms=scored.compute_ms,
        )

    async def CloseSession(
        self, request: worker_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CloseSessionResponse:
        """Frees a session at once (never behind model work); closing an unknown one answers closed=false."""
        return worker_pb2.CloseSessionResponse(closed=self._store.close(self._validate.session_id(request.session_id)))
