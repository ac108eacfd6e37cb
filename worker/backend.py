"""The seam between the worker and a model engine: the backend interface and the types it speaks.

The servicer and the session store use only what is here. The transformers backend (worker/hf/)
is one implementation; another engine (SGLang, vLLM) can be another behind the same RPCs.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from coolfusion.constraints import Constraint, ConstraintKind
from coolfusion.constraints.tools import ToolCall, ToolDefinition

if TYPE_CHECKING:
    from coolfusion.worker.settings import WorkerSettings

T = TypeVar("T")
# The engines a worker can serve a model with (docs/design.md section 4.7).
ENGINES = ("transformers", "vllm")


class Finish(enum.Enum):
    """Why a segment ended (docs/design.md section 2.2)."""

    BOUNDARY = "boundary"
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"


@dataclass(frozen=True)
class ChatTurn:
    """One chat message: an assistant turn may call tools, a tool turn answers one call."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: plain text, or chat turns (and the tools they offer) rendered with the model's
    chat template."""

    text: str | None = None
    chat: tuple[ChatTurn, ...] = ()
    tools: tuple[ToolDefinition, ...] = ()


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as this model reads it, and whether tokenizing it adds the model's special tokens."""

    text: str
    add_special_tokens: bool


@dataclass(frozen=True)
class Segment:
    """A generated segment; `generated_tokens` counts the tokens that produced it, EOS included."""

    text: str
    finish: Finish
    generated_tokens: int


class SessionGuide(ABC):
    """A session's place in its constraint's language, inside the engine (opaque to the session
    store, like its cache); see worker/constraints.py for the transformers engine's."""


@dataclass(frozen=True)
class ConstrainedAnswer:
    """The session's constraint for one segment: its guide, and the committed answer it follows."""

    guide: SessionGuide
    answer_text: str


@dataclass(frozen=True)
class Sampling:
    """How a segment's tokens are drawn (docs/design.md section 10.1): temperature (> 0; greedy is
    no Sampling at all), then top_k (0: all), then top_p (1: all), from a generator seeded with
    `seed` for this call alone."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


@dataclass(frozen=True)
class SegmentRules:
    """How one segment ends (docs/design.md section 2.2), what it may contain (section 9.2) and how
    its tokens are drawn (section 10.1; None: greedily)."""

    max_tokens: int
    stop_strings: tuple[str, ...] = ()
    constraint: ConstrainedAnswer | None = None
    sampling: Sampling | None = None


@dataclass(frozen=True)
class CandidateText:
    """A continuation to score; `ends_with_eos` appends the scorer's own EOS token."""

    text: str
    ends_with_eos: bool = False


@dataclass(frozen=True)
class TextScore:
    """Summed log-probability (nats) of a candidate's tokens under this model."""

    scored_tokens: int
    log_prob_sum: float
    context_tokens_with_text: int


@dataclass(frozen=True)
class Timed(Generic[T]):
    """A backend call's result and the compute time it took (ms, from its first model pass to its
    last; waiting in the queue before it is excluded)."""

    value: T
    compute_ms: float


@dataclass(frozen=True)
class DeviceShare:
    """Where part of a model's parameters are stored: a device ("cuda:0", "cpu", "disk") and the
    fraction (0-1) of the model's parameters stored there."""

    device: str
    parameter_share: float


@dataclass(frozen=True)
class ModelDescription:
    """What GetInfo tells callers about the model and where it runs."""

    model_id: str
    tokenizer_family: str
    vocab_size: int
    eos_text: str
    bos_text: str
    has_chat_template: bool
    max_context_tokens: int
    device: str
    dtype: str
    # Every device holding parameters, in the order the model uses them; empty when unknown.
    placement: tuple[DeviceShare, ...] = ()
    engine: str = ""  # the engine serving the model: one of ENGINES
    constraint_kinds: tuple[ConstraintKind, ...] = ()  # the constraints it enforces while generating


@dataclass(frozen=True)
class PassStats:
    """One forward pass of a batching engine."""

    sessions: int  # calls it advanced
    tokens: int  # tokens it computed (decode tokens, prefill chunks, candidate tokens)
    seconds: float


PassObserver = Callable[[PassStats], None]


class SessionCache(ABC):
    """A session's state inside the engine (its KV cache), opaque to the session store."""

    @property
    @abstractmethod
    def cached_tokens(self) -> int:
        """Tokens the cache holds: what the session costs in the worker's token budget."""


def load_backend(settings: WorkerSettings) -> ModelBackend:
    """The backend `settings.engine` names, with its model loaded (slow: minutes for a large model)."""
    if settings.engine == "transformers":
        from coolfusion.worker.hf.backend import load_backend as load_transformers  # heavy: torch, transformers

        return load_transformers(settings)
    if settings.engine == "vllm":
        from coolfusion.worker.vllm.backend import load_backend as load_vllm  # heavy: vllm, torch

        return load_vllm(settings)
    raise ValueError(f"unknown engine {settings.engine!r}; known: {', '.join(ENGINES)}")


class ModelBackend(ABC):
    """One model behind WorkerService. Text and token work is synchronous and cheap; model work is
    asynchronous, so that an engine may batch the calls of many sessions into shared passes.

    A session's calls never overlap (the session store serialises them); calls of different
    sessions may run concurrently.
    """

    @property
    @abstractmethod
    def description(self) -> ModelDescription: ...

    @property
    @abstractmethod
    def queue_depth(self) -> int:
        """Model calls waiting or running."""

    @property
    def engine_requests(self) -> int:
        """Requests the engine holds unfinished; an engine that runs each call as one job has its
        model calls waiting or running."""
        return self.queue_depth

    @abstractmethod
    def render(self, prompt: PromptSpec) -> RenderedPrompt: ...

    @abstractmethod
    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]: ...

    @abstractmethod
    def new_cache(self) -> SessionCache: ...

    def release(self, cache: SessionCache) -> None:
        """The cache's session is gone (closed, evicted, or its cache replaced): free what the cache
        holds before returning, without waiting for model work, and let no other session read it.
        A call still running on it may fail with SessionNotFound. Engines whose caches hold
        nothing of their own need not override it."""

    @abstractmethod
    async def sync(self, cache: SessionCache, context_ids: list[int]) -> Timed[None]:
        """Makes `cache` hold exactly `context_ids` (prefill), recomputing only past the first
        token that differs from what it holds."""

    @property
    def grammar_compiles(self) -> int:
        """Constraint grammars compiled so far (each distinct constraint once)."""
        return 0

    def guide(self, constraint: Constraint) -> SessionGuide:
        """A new session's guide for `constraint` (compiled once per distinct constraint);
        ConstraintError when it does not compile. Only for kinds in description.constraint_kinds."""
        raise NotImplementedError(f"the {self.description.engine} engine enforces no constraints")

    @abstractmethod
    async def generate(self, cache: SessionCache, context_ids: list[int], rules: SegmentRules) -> Timed[Segment]:
        """Greedily generates one segment after `context_ids` (docs/design.md section 2.2), within
        the rules' constraint if any (section 9.2). The cache then holds the context plus the
        segment's own tokens (never tokens past the cut), so that appending this segment if it
        wins costs nothing."""

    @abstractmethod
    async def score(
        self, cache: SessionCache, context_ids: list[int], rows: list[list[int]], candidates: list[CandidateText]
    ) -> Timed[list[TextScore]]:
        """Scores each candidate after the context; `rows[i]` is tokenize(context + candidate i).
        A candidate's tokens are those of its row from the first position that differs from
        `context_ids`; the cache's context is unchanged."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops the engine; calls still pending fail."""

    def observe_passes(self, observer: PassObserver) -> None:
        """Has `observer` called after every forward pass (an engine without passes ignores it)."""

    def token_budget(self, headroom: float) -> int | None:
        """The session token budget that the memory free now can hold, keeping `headroom` (a
        fraction) of it unused; None when the engine cannot tell (the worker then uses a fixed one)."""
        return None
