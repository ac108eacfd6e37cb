"""The orchestrator's vocabulary: prompts, segments, scores, steps and answers (no gRPC, no I/O)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from coolfusion.constraints.tools import ToolCall, ToolDefinition


class Finish(enum.StrEnum):
    """Why a fused (or solo) answer ended (docs/design.md section 2, "Stop")."""

    EOS = "eos"  # the winning segment ended with EOS
    LENGTH = "length"  # max_new_tokens reached (counted in the first worker's tokens), or no progress
    STOP = "stop"  # a stop string appeared; the answer is cut before it
    REPETITION = "repetition"  # the repetition guard cut a loop
    TOOL_CALLS = "tool_calls"  # the answer is complete tool calls (docs/design.md section 9.4)


@dataclass(frozen=True)
class ChatTurn:
    """One chat message: an assistant turn may call tools, a tool turn answers one call."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Prompt:
    """Plain text, or chat turns (and the tools they offer) that each worker renders its own way."""

    text: str | None = None
    chat: tuple[ChatTurn, ...] = ()
    tools: tuple[ToolDefinition, ...] = ()


@dataclass(frozen=True)
class OpenedSession:
    """A worker's token counts for a freshly opened session."""

    prompt_tokens: int
    context_tokens: int


@dataclass(frozen=True)
class GeneratedSegment:
    """One worker's proposal for the next segment."""

    text: str
    ends_with_eos: bool
    finish_reason: int  # coolfusion.v1.FinishReason
    generated_tokens: int
    context_tokens: int  # the context (prompt + answer, after the append) the segment followed
    compute_ms: float


@dataclass(frozen=True)
class CandidateScore:
    """How one worker scored one candidate."""

    scored_tokens: int
    log_prob_sum: float  # nats
    context_tokens_with_text: int

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); a candidate with no tokens cannot be judged, so it is never preferred."""
        if self.scored_tokens == 0:
            return math.inf
        return math.exp(min(-self.log_prob_sum / self.scored_tokens, 700.0))  # exp(700) ~ float max


@dataclass
class StepCandidate:
    """A distinct candidate of a step, with who proposed it and how each worker scored it."""

    text: str
    ends_with_eos: bool
    proposed_by: list[str]
    scores: dict[str, CandidateScore] = field(default_factory=dict)
    fused_score: float = 0.0


@dataclass(frozen=True)
class Step:
    """One step of a loop: its candidates, the winner and what the step cost."""

    index: int
    candidates: list[StepCandidate]
    winner_index: int
    generate_ms: float
    score_ms: float
    worker_compute_ms: float  # slowest worker's compute, generation plus scoring

    @property
    def winner(self) -> StepCandidate:
        return self.candidates[self.winner_index]


@dataclass(frozen=True)
class Dropped:
    """A worker left out of the rest of a request, and why."""

    worker: str
    reason: str
    step: int


@dataclass(frozen=True)
class Usage:
    """An answer's size in one worker's tokens (docs/design.md section 5.7)."""

    worker: str  # whose tokenizer counted
    prompt_tokens: int  # the prompt as that worker rendered it
    completion_tokens: int  # len(tokenize(rendered prompt + answer)) - prompt_tokens


@dataclass
class Answer:
    """What one loop produced: the text, why it ended, and how it got there."""

    text: str = ""
    finish: Finish = Finish.LENGTH
    steps: list[Step] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    open_ms: float = 0.0
    usage: Usage | None = None  # counted only when the loop was asked to


@dataclass(frozen=True)
class RankedAnswer:
    """A full answer in the Cool+R rerank, with its fused score across the workers."""

    source: str  # "fused" or a worker name
    text: str
    fused_score: float
    usage: Usage | None = None  # from the first ranking worker's scores


# ---- the decision tree of a fusion (explore.py builds it, replay.py walks it) -------------------


@dataclass(frozen=True)
class TreeBranch:
    """Where appending one candidate leads: the next node, or an answer that ends whatever the
    strategy (EOS, a stop string, an empty segment), with why."""

    node: int | None = None
    answer: int | None = None
    finish: Finish | None = None


@dataclass
class TreeNode:
    """One answer-so-far and the step after it. `answer_tokens` is empty for a node never visited
    (the node limit came first); `candidates` is empty too when every worker's answer was full."""

    text: str
    answer_tokens: dict[str, int] = field(default_factory=dict)
    candidates: list[StepCandidate] = field(default_factory=list)
    branches: list[TreeBranch] = field(default_factory=list)
    repetition_cut: int | None = None  # where the repetition guard would cut `text`

    @property
    def visited(self) -> bool:
        return bool(self.answer_tokens)


@dataclass(frozen=True)
class TreeAnswer:
    """An answer some choice of candidates ends on, with each worker's score of it whole after the
    bare prompt (what Cool+R ranks by)."""

    text: str
    ends_with_eos: bool
    scores: dict[str, CandidateScore]


@dataclass
class FusionTree:
    """Every answer a fusion of `workers` can give: nodes[0] is the empty answer."""

    workers: list[str]
    prompt_tokens: dict[str, int]
    nodes: list[TreeNode]
    answers: list[TreeAnswer]
    complete: bool  # False when the node limit left a reachable node unvisited
