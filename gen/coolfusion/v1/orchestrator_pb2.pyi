from coolfusion.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RerankMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RERANK_MODE_UNSPECIFIED: _ClassVar[RerankMode]
    RERANK_MODE_NONE: _ClassVar[RerankMode]
    RERANK_MODE_FULL_ANSWER: _ClassVar[RerankMode]

class Aggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_UNSPECIFIED: _ClassVar[Aggregation]
    AGGREGATION_PPL_MEAN: _ClassVar[Aggregation]
    AGGREGATION_NLL_MEAN: _ClassVar[Aggregation]
    AGGREGATION_ROBUST: _ClassVar[Aggregation]
    AGGREGATION_PROPOSER: _ClassVar[Aggregation]

class RepetitionGuard(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPETITION_GUARD_UNSPECIFIED: _ClassVar[RepetitionGuard]
    REPETITION_GUARD_OFF: _ClassVar[RepetitionGuard]
    REPETITION_GUARD_STOP: _ClassVar[RepetitionGuard]
    REPETITION_GUARD_STEER: _ClassVar[RepetitionGuard]

class Selection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SELECTION_UNSPECIFIED: _ClassVar[Selection]
    SELECTION_BEST: _ClassVar[Selection]
    SELECTION_SAMPLE: _ClassVar[Selection]

class ToolChoiceMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_CHOICE_MODE_UNSPECIFIED: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_AUTO: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_NONE: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_REQUIRED: _ClassVar[ToolChoiceMode]
    TOOL_CHOICE_MODE_FUNCTION: _ClassVar[ToolChoiceMode]

class RuleReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RULE_REASON_UNSPECIFIED: _ClassVar[RuleReason]
    RULE_REASON_REQUESTED: _ClassVar[RuleReason]
    RULE_REASON_ROUTE: _ClassVar[RuleReason]
    RULE_REASON_DEFAULT_CALIBRATION: _ClassVar[RuleReason]
    RULE_REASON_OUTSIDE_SCOPE: _ClassVar[RuleReason]
    RULE_REASON_OTHER_WORKERS: _ClassVar[RuleReason]
    RULE_REASON_NO_DEFAULT_CALIBRATION: _ClassVar[RuleReason]
RERANK_MODE_UNSPECIFIED: RerankMode
RERANK_MODE_NONE: RerankMode
RERANK_MODE_FULL_ANSWER: RerankMode
AGGREGATION_UNSPECIFIED: Aggregation
AGGREGATION_PPL_MEAN: Aggregation
AGGREGATION_NLL_MEAN: Aggregation
AGGREGATION_ROBUST: Aggregation
AGGREGATION_PROPOSER: Aggregation
REPETITION_GUARD_UNSPECIFIED: RepetitionGuard
REPETITION_GUARD_OFF: RepetitionGuard
REPETITION_GUARD_STOP: RepetitionGuard
REPETITION_GUARD_STEER: RepetitionGuard
SELECTION_UNSPECIFIED: Selection
SELECTION_BEST: Selection
SELECTION_SAMPLE: Selection
TOOL_CHOICE_MODE_UNSPECIFIED: ToolChoiceMode
TOOL_CHOICE_MODE_AUTO: ToolChoiceMode
TOOL_CHOICE_MODE_NONE: ToolChoiceMode
TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode
TOOL_CHOICE_MODE_FUNCTION: ToolChoiceMode
RULE_REASON_UNSPECIFIED: RuleReason
RULE_REASON_REQUESTED: RuleReason
RULE_REASON_ROUTE: RuleReason
RULE_REASON_DEFAULT_CALIBRATION: RuleReason
RULE_REASON_OUTSIDE_SCOPE: RuleReason
RULE_REASON_OTHER_WORKERS: RuleReason
RULE_REASON_NO_DEFAULT_CALIBRATION: RuleReason

class FusionStrategy(_message.Message):
    __slots__ = ("aggregation", "worker_weights", "repetition_guard", "prompt_templates", "calibration")
    class WorkerWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PromptTemplatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    WORKER_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_GUARD_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    aggregation: Aggregation
    worker_weights: _containers.ScalarMap[str, float]
    repetition_guard: RepetitionGuard
    prompt_templates: _containers.ScalarMap[str, str]
    calibration: str
    def __init__(self, aggregation: _Optional[_Union[Aggregation, str]] = ..., worker_weights: _Optional[_Mapping[str, float]] = ..., repetition_guard: _Optional[_Union[RepetitionGuard, str]] = ..., prompt_templates: _Optional[_Mapping[str, str]] = ..., calibration: _Optional[str] = ...) -> None: ...

class FusionParameters(_message.Message):
    __slots__ = ("prompt", "workers", "max_new_tokens", "stop_strings", "segment_max_tokens", "rerank_mode", "include_trace", "strategy", "constraint", "tool_choice", "parallel_tool_calls", "sampling", "n", "tag", "route")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MODE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TRACE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CHOICE_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    prompt: _worker_pb2.Prompt
    workers: _containers.RepeatedScalarFieldContainer[str]
    max_new_tokens: int
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    segment_max_tokens: int
    rerank_mode: RerankMode
    include_trace: bool
    strategy: FusionStrategy
    constraint: _worker_pb2.Constraint
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    sampling: Sampling
    n: int
    tag: str
    route: str
    def __init__(self, prompt: _Optional[_Union[_worker_pb2.Prompt, _Mapping]] = ..., workers: _Optional[_Iterable[str]] = ..., max_new_tokens: _Optional[int] = ..., stop_strings: _Optional[_Iterable[str]] = ..., segment_max_tokens: _Optional[int] = ..., rerank_mode: _Optional[_Union[RerankMode, str]] = ..., include_trace: _Optional[bool] = ..., strategy: _Optional[_Union[FusionStrategy, _Mapping]] = ..., constraint: _Optional[_Union[_worker_pb2.Constraint, _Mapping]] = ..., tool_choice: _Optional[_Union[ToolChoice, _Mapping]] = ..., parallel_tool_calls: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., n: _Optional[int] = ..., tag: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "selection")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    selection: Selection
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., selection: _Optional[_Union[Selection, str]] = ...) -> None: ...

class ToolChoice(_message.Message):
    __slots__ = ("mode", "function_name")
    MODE_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_NAME_FIELD_NUMBER: _ClassVar[int]
    mode: ToolChoiceMode
    function_name: str
    def __init__(self, mode: _Optional[_Union[ToolChoiceMode, str]] = ..., function_name: _Optional[str] = ...) -> None: ...

class FuseRequest(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: FusionParameters
    def __init__(self, parameters: _Optional[_Union[FusionParameters, _Mapping]] = ...) -> None: ...

class FuseStreamRequest(_message.Message):
    __slots__ = ("parameters",)
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    parameters: FusionParameters
    def __init__(self, parameters: _Optional[_Union[FusionParameters, _Mapping]] = ...) -> None: ...

class ModelScore(_message.Message):
    __slots__ = ("worker", "perplexity", "scored_tokens", "log_prob_sum")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOG_PROB_SUM_FIELD_NUMBER: _ClassVar[int]
    worker: str
    perplexity: float
    scored_tokens: int
    log_prob_sum: float
    def __init__(self, worker: _Optional[str] = ..., perplexity: _Optional[float] = ..., scored_tokens: _Optional[int] = ..., log_prob_sum: _Optional[float] = ...) -> None: ...

class StepCandidate(_message.Message):
    __slots__ = ("text", "ends_with_eos", "proposed_by", "scores", "fused_score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ENDS_WITH_EOS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_BY_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    FUSED_SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    ends_with_eos: bool
    proposed_by: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedCompositeFieldContainer[ModelScore]
    fused_score: float
    def __init__(self, text: _Optional[str] = ..., ends_with_eos: _Optional[bool] = ..., proposed_by: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[_Union[ModelScore, _Mapping]]] = ..., fused_score: _Optional[float] = ...) -> None: ...

class FuseStep(_message.Message):
    __slots__ = ("index", "candidates", "winner_index", "winner_worker", "generate_ms", "score_ms", "choice")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    WINNER_INDEX_FIELD_NUMBER: _ClassVar[int]
    WINNER_WORKER_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    index: int
    candidates: _containers.RepeatedCompositeFieldContainer[StepCandidate]
    winner_index: int
    winner_worker: str
    generate_ms: float
    score_ms: float
    choice: int
    def __init__(self, index: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[StepCandidate, _Mapping]]] = ..., winner_index: _Optional[int] = ..., winner_worker: _Optional[str] = ..., generate_ms: _Optional[float] = ..., score_ms: _Optional[float] = ..., choice: _Optional[int] = ...) -> None: ...

class WorkerShare(_message.Message):
    __slots__ = ("worker", "segments", "chars")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    CHARS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    segments: int
    chars: int
    def __init__(self, worker: _Optional[str] = ..., segments: _Optional[int] = ..., chars: _Optional[int] = ...) -> None: ...

class DroppedWorker(_message.Message):
    __slots__ = ("worker", "reason", "step")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    worker: str
    reason: str
    step: int
    def __init__(self, worker: _Optional[str] = ..., reason: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("total_ms", "open_ms", "generate_ms", "score_ms", "rerank_ms", "steps", "worker_compute_ms")
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    OPEN_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    SCORE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WORKER_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    total_ms: float
    open_ms: float
    generate_ms: float
    score_ms: float
    rerank_ms: float
    steps: int
    worker_compute_ms: float
    def __init__(self, total_ms: _Optional[float] = ..., open_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., score_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ..., steps: _Optional[int] = ..., worker_compute_ms: _Optional[float] = ...) -> None: ...

class RerankEntry(_message.Message):
    __slots__ = ("source", "text", "fused_score")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FUSED_SCORE_FIELD_NUMBER: _ClassVar[int]
    source: str
    text: str
    fused_score: float
    def __init__(self, source: _Optional[str] = ..., text: _Optional[str] = ..., fused_score: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "worker")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    worker: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., worker: _Optional[str] = ...) -> None: ...

class FuseResult(_message.Message):
    __slots__ = ("text", "finish_reason", "shares", "dropped", "timings", "trace", "source", "rerank", "request_id", "strategy", "usage", "tool_calls", "seed", "choice", "rule_choice")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RERANK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    RULE_CHOICE_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _worker_pb2.FinishReason
    shares: _containers.RepeatedCompositeFieldContainer[WorkerShare]
    dropped: _containers.RepeatedCompositeFieldContainer[DroppedWorker]
    timings: Timings
    trace: _containers.RepeatedCompositeFieldContainer[FuseStep]
    source: str
    rerank: _containers.RepeatedCompositeFieldContainer[RerankEntry]
    request_id: str
    strategy: FusionStrategy
    usage: Usage
    tool_calls: _containers.RepeatedCompositeFieldContainer[_worker_pb2.ToolCall]
    seed: int
    choice: int
    rule_choice: RuleChoice
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_worker_pb2.FinishReason, str]] = ..., shares: _Optional[_Iterable[_Union[WorkerShare, _Mapping]]] = ..., dropped: _Optional[_Iterable[_Union[DroppedWorker, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., trace: _Optional[_Iterable[_Union[FuseStep, _Mapping]]] = ..., source: _Optional[str] = ..., rerank: _Optional[_Iterable[_Union[RerankEntry, _Mapping]]] = ..., request_id: _Optional[str] = ..., strategy: _Optional[_Union[FusionStrategy, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., tool_calls: _Optional[_Iterable[_Union[_worker_pb2.ToolCall, _Mapping]]] = ..., seed: _Optional[int] = ..., choice: _Optional[int] = ..., rule_choice: _Optional[_Union[RuleChoice, _Mapping]] = ...) -> None: ...

class RuleChoice(_message.Message):
    __slots__ = ("reason", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: RuleReason
    detail: str
    def __init__(self, reason: _Optional[_Union[RuleReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class FuseResponse(_message.Message):
    __slots__ = ("result", "choices")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    result: FuseResult
    choices: _containers.RepeatedCompositeFieldContainer[FuseResult]
    def __init__(self, result: _Optional[_Union[FuseResult, _Mapping]] = ..., choices: _Optional[_Iterable[_Union[FuseResult, _Mapping]]] = ...) -> None: ...

class FuseStreamResponse(_message.Message):
    __slots__ = ("step", "summary")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    step: FuseStep
    summary: FuseResult
    def __init__(self, step: _Optional[_Union[FuseStep, _Mapping]] = ..., summary: _Optional[_Union[FuseResult, _Mapping]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "address", "serving", "info", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    serving: bool
    info: _worker_pb2.GetInfoResponse
    error: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., serving: _Optional[bool] = ..., info: _Optional[_Union[_worker_pb2.GetInfoResponse, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "orchestrator_version", "routes")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ORCHESTRATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    orchestrator_version: str
    routes: _containers.RepeatedCompositeFieldContainer[Route]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., orchestrator_version: _Optional[str] = ..., routes: _Optional[_Iterable[_Union[Route, _Mapping]]] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("name", "calibration", "workers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    calibration: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., calibration: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ...) -> None: ...

class ExploreFusionRequest(_message.Message):
    __slots__ = ("parameters", "max_nodes")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    parameters: FusionParameters
    max_nodes: int
    def __init__(self, parameters: _Optional[_Union[FusionParameters, _Mapping]] = ..., max_nodes: _Optional[int] = ...) -> None: ...

class ExploreFusionResponse(_message.Message):
    __slots__ = ("tree",)
    TREE_FIELD_NUMBER: _ClassVar[int]
    tree: FusionTree
    def __init__(self, tree: _Optional[_Union[FusionTree, _Mapping]] = ...) -> None: ...

class FusionTree(_message.Message):
    __slots__ = ("workers", "prompt_tokens", "nodes", "answers", "complete")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedScalarFieldContainer[str]
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    nodes: _containers.RepeatedCompositeFieldContainer[TreeNode]
    answers: _containers.RepeatedCompositeFieldContainer[TreeAnswer]
    complete: bool
    def __init__(self, workers: _Optional[_Iterable[str]] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., nodes: _Optional[_Iterable[_Union[TreeNode, _Mapping]]] = ..., answers: _Optional[_Iterable[_Union[TreeAnswer, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class TreeNode(_message.Message):
    __slots__ = ("text", "answer_tokens", "candidates", "branches", "repetition_cut")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CUT_FIELD_NUMBER: _ClassVar[int]
    text: str
    answer_tokens: _containers.RepeatedScalarFieldContainer[int]
    candidates: _containers.RepeatedCompositeFieldContainer[StepCandidate]
    branches: _containers.RepeatedCompositeFieldContainer[TreeBranch]
    repetition_cut: int
    def __init__(self, text: _Optional[str] = ..., answer_tokens: _Optional[_Iterable[int]] = ..., candidates: _Optional[_Iterable[_Union[StepCandidate, _Mapping]]] = ..., branches: _Optional[_Iterable[_Union[TreeBranch, _Mapping]]] = ..., repetition_cut: _Optional[int] = ...) -> None: ...

class TreeBranch(_message.Message):
    __slots__ = ("node", "answer", "finish_reason")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    node: int
    answer: int
    finish_reason: _worker_pb2.FinishReason
    def __init__(self, node: _Optional[int] = ..., answer: _Optional[int] = ..., finish_reason: _Optional[_Union[_worker_pb2.FinishReason, str]] = ...) -> None: ...

class TreeAnswer(_message.Message):
    __slots__ = ("text", "ends_with_eos", "scores")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ENDS_WITH_EOS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    text: str
    ends_with_eos: bool
    scores: _containers.RepeatedCompositeFieldContainer[ModelScore]
    def __init__(self, text: _Optional[str] = ..., ends_with_eos: _Optional[bool] = ..., scores: _Optional[_Iterable[_Union[ModelScore, _Mapping]]] = ...) -> None: ...
