from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_BOUNDARY: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_REPETITION: _ClassVar[FinishReason]
    FINISH_REASON_TOOL_CALLS: _ClassVar[FinishReason]

class ConstraintKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSTRAINT_KIND_UNSPECIFIED: _ClassVar[ConstraintKind]
    CONSTRAINT_KIND_JSON_SCHEMA: _ClassVar[ConstraintKind]
    CONSTRAINT_KIND_JSON_OBJECT: _ClassVar[ConstraintKind]
    CONSTRAINT_KIND_REGEX: _ClassVar[ConstraintKind]
    CONSTRAINT_KIND_LARK_GRAMMAR: _ClassVar[ConstraintKind]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_BOUNDARY: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_REPETITION: FinishReason
FINISH_REASON_TOOL_CALLS: FinishReason
CONSTRAINT_KIND_UNSPECIFIED: ConstraintKind
CONSTRAINT_KIND_JSON_SCHEMA: ConstraintKind
CONSTRAINT_KIND_JSON_OBJECT: ConstraintKind
CONSTRAINT_KIND_REGEX: ConstraintKind
CONSTRAINT_KIND_LARK_GRAMMAR: ConstraintKind

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "tool_calls", "tool_call_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCall]
    tool_call_id: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCall, _Mapping]]] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

class ChatConversation(_message.Message):
    __slots__ = ("messages", "tools")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    tools: _containers.RepeatedCompositeFieldContainer[ToolDefinition]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[ToolDefinition, _Mapping]]] = ...) -> None: ...

class ToolDefinition(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("id", "name", "arguments")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    arguments: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ...) -> None: ...

class Constraint(_message.Message):
    __slots__ = ("kind", "definition")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    kind: ConstraintKind
    definition: str
    def __init__(self, kind: _Optional[_Union[ConstraintKind, str]] = ..., definition: _Optional[str] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "chat")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatConversation
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatConversation, _Mapping]] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("family", "vocab_size", "eos_text", "bos_text", "has_chat_template")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TEXT_FIELD_NUMBER: _ClassVar[int]
    BOS_TEXT_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    family: str
    vocab_size: int
    eos_text: str
    bos_text: str
    has_chat_template: bool
    def __init__(self, family: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_text: _Optional[str] = ..., bos_text: _Optional[str] = ..., has_chat_template: _Optional[bool] = ...) -> None: ...

class WorkerLimits(_message.Message):
    __slots__ = ("max_context_tokens", "session_token_budget", "max_sessions", "idle_ttl_seconds", "max_candidates", "max_text_chars", "max_segment_tokens")
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEGMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_context_tokens: int
    session_token_budget: int
    max_sessions: int
    idle_ttl_seconds: float
    max_candidates: int
    max_text_chars: int
    max_segment_tokens: int
    def __init__(self, max_context_tokens: _Optional[int] = ..., session_token_budget: _Optional[int] = ..., max_sessions: _Optional[int] = ..., idle_ttl_seconds: _Optional[float] = ..., max_candidates: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_segment_tokens: _Optional[int] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("open_sessions", "cached_tokens", "evicted_sessions", "engine_requests")
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    open_sessions: int
    cached_tokens: int
    evicted_sessions: int
    engine_requests: int
    def __init__(self, open_sessions: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., evicted_sessions: _Optional[int] = ..., engine_requests: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_id", "tokenizer", "protocol_version", "limits", "load", "device", "dtype", "placement", "server_version", "engine", "constraint_kinds")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_KINDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tokenizer: TokenizerInfo
    protocol_version: str
    limits: WorkerLimits
    load: WorkerLoad
    device: str
    dtype: str
    placement: _containers.RepeatedCompositeFieldContainer[DevicePlacement]
    server_version: str
    engine: str
    constraint_kinds: _containers.RepeatedScalarFieldContainer[ConstraintKind]
    def __init__(self, model_id: _Optional[str] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., protocol_version: _Optional[str] = ..., limits: _Optional[_Union[WorkerLimits, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., placement: _Optional[_Iterable[_Union[DevicePlacement, _Mapping]]] = ..., server_version: _Optional[str] = ..., engine: _Optional[str] = ..., constraint_kinds: _Optional[_Iterable[_Union[ConstraintKind, str]]] = ...) -> None: ...

class DevicePlacement(_message.Message):
    __slots__ = ("device", "parameter_share")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SHARE_FIELD_NUMBER: _ClassVar[int]
    device: str
    parameter_share: float
    def __init__(self, device: _Optional[str] = ..., parameter_share: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "answer_text", "constraint")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: Prompt
    answer_text: str
    constraint: Constraint
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., answer_text: _Optional[str] = ..., constraint: _Optional[_Union[Constraint, _Mapping]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "prompt_tokens", "context_tokens", "compute_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_tokens: int
    context_tokens: int
    compute_ms: float
    def __init__(self, session_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class GenerateSegmentRequest(_message.Message):
    __slots__ = ("session_id", "expected_context_tokens", "append_text", "max_tokens", "stop_strings", "expected_answer_chars", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    APPEND_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ANSWER_CHARS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_context_tokens: int
    append_text: str
    max_tokens: int
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    expected_answer_chars: int
    sampling: SegmentSampling
    def __init__(self, session_id: _Optional[str] = ..., expected_context_tokens: _Optional[int] = ..., append_text: _Optional[str] = ..., max_tokens: _Optional[int] = ..., stop_strings: _Optional[_Iterable[str]] = ..., expected_answer_chars: _Optional[int] = ..., sampling: _Optional[_Union[SegmentSampling, _Mapping]] = ...) -> None: ...

class SegmentSampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateSegmentResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "generated_tokens", "context_tokens", "compute_ms")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: FinishReason
    generated_tokens: int
    context_tokens: int
    compute_ms: float
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., generated_tokens: _Optional[int] = ..., context_tokens: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("text", "ends_with_eos")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ENDS_WITH_EOS_FIELD_NUMBER: _ClassVar[int]
    text: str
    ends_with_eos: bool
    def __init__(self, text: _Optional[str] = ..., ends_with_eos: _Optional[bool] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("scored_tokens", "log_prob_sum", "context_tokens_with_text")
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_SUM_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_WITH_TEXT_FIELD_NUMBER: _ClassVar[int]
    scored_tokens: int
    log_prob_sum: float
    context_tokens_with_text: int
    def __init__(self, scored_tokens: _Optional[int] = ..., log_prob_sum: _Optional[float] = ..., context_tokens_with_text: _Optional[int] = ...) -> None: ...

class ScoreTextRequest(_message.Message):
    __slots__ = ("session_id", "expected_context_tokens", "candidates")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_context_tokens: int
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    def __init__(self, session_id: _Optional[str] = ..., expected_context_tokens: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ...) -> None: ...

class ScoreTextResponse(_message.Message):
    __slots__ = ("scores", "context_tokens", "compute_ms")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    context_tokens: int
    compute_ms: float
    def __init__(self, scores: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., context_tokens: _Optional[int] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...
