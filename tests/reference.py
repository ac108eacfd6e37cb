"""A cache-free, in-process reference of docs/design.md section 2 (the paper strategy), with plain transformers forward passes.

It shares no code with the service: every step re-reads the whole context from scratch. Under a
constraint (section 9) each model's greedy choice is the best token the grammar allows after the
whole answer so far, read afresh every token by llguidance, the grammar engine the constraint is
written for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy
import torch

from coolfusion.v1 import orchestrator_pb2

BOUNDARY = re.compile(r"\S(?=\s)")
# How a constrained answer writes JSON (docs/design.md section 9.1).
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def schema_grammar(schema: dict) -> str:
    """The grammar of answers that are one JSON value valid against `schema`, written compactly."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT_JSON)


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


@dataclass
class ReferenceModel:
    name: str
    model: object
    tokenizer: object

    def render(self, prompt: str | list[dict]) -> tuple[str, bool]:
        if isinstance(prompt, str):
            return prompt, True
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False
        return "\n\n".join(m["content"] for m in prompt) + "\n\n", True

    @property
    def eos_ids(self) -> set[int]:
        configured = self.model.generation_config.eos_token_id
        ids = set(configured if isinstance(configured, list) else [configured]) - {None}
        return ids | {self.tokenizer.eos_token_id}

    def ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def next_token(self, ids: list[int], allowed: torch.Tensor | None = None) -> tuple[int, float]:
        """The greedy next token (among `allowed`, when given), and its margin: the gap between the
        two highest logits."""
        # The whole context is recomputed; only the last position's logits are projected (a 262k
        # vocabulary times every position would dominate the run time for nothing).
        logits = self.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -torch.inf)
        top = torch.topk(logits, 2)
        return int(top.indices[0]), float(top.values[0] - top.values[1])

    def allowed_after(self, grammar: str, answer: str, new: list[int]) -> torch.Tensor:
        """Which tokens the grammar allows after `answer` (any spelling of it) and then `new`."""
        vocabulary = self.grammar_vocabulary()
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        assert matcher.consume_tokens(vocabulary.greedy_tokenize(answer) + new), matcher.get_error()
        width = self.model.config.get_text_config().vocab_size
        bitmask = llguidance.numpy.allocate_token_bitmask(1, vocabulary.vocab_size)
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        bits = numpy.unpackbits(bitmask[0].view(numpy.uint8), bitorder="little")[:width]
        return torch.from_numpy(bits.astype(bool))

    def grammar_vocabulary(self) -> llguidance.LLTokenizer:
        if getattr(self, "_vocabulary", None) is None:
            width = self.model.config.get_text_config().vocab_size
            self._vocabulary = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=width, eos_token=sorted(self.eos_ids)
            )
        return self._vocabulary

    def complete(self, grammar: str, answer: str) -> bool:
        """Whether the grammar allows nothing after `answer` but its end."""
        vocabulary = self.grammar_vocabulary()
        matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        matcher.consume_tokens(vocabulary.greedy_tokenize(answer))
        return matcher.is_accepting() and matcher.is_stopped()

    def segment(
        self, context: str, special: bool, cap: int, stops: tuple[str, ...], constrained: tuple[str, str] | None = None
    ) -> tuple[str, bool, float]:
        """(segment text, ended at EOS, smallest greedy margin among its tokens), every token from
        scratch; `constrained` is (grammar, answer so far)."""
        ids = self.ids(context, special)
        before = self.decode(ids)
        new: list[int] = []
        text, margin = "", math.inf
        for _ in range(cap):
            allowed = None if constrained is None else self.allowed_after(*constrained, new)
            token, gap = self.next_token(ids + new, allowed)
            margin = min(margin, gap)
            if token in self.eos_ids:
                return text, True, margin
            new.append(token)
            text = self.decode(ids + new)[len(before) :]
            ends = [m.end() for m in [BOUNDARY.search(text)] if m] + [text.find(s) + len(s) for s in stops if s in text]
            if ends:
                return text[: min(ends)], False, margin
        return text, False, margin

    @torch.no_grad()
    def perplexity(self, context: str, special: bool, text: str, eos: bool) -> float:
        base = self.ids(context, special)
        full = self.ids(context + text, special)
        start = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
        start = max(start, 1)
        if eos:
            full = full + [self.tokenizer.eos_token_id]
        if start >= len(full):
            return math.inf
        kept = len(full) - start + 1  # logits of positions start-1 .. end-1
        logits = self.model(torch.tensor([full]), logits_to_keep=kept).logits[0].float()
        log_probs = torch.log_softmax(logits, -1)  # row i predicts token start + i
        nll = -sum(float(log_probs[j - start, full[j]]) for j in range(start, len(full)))
        return math.exp(min(nll / (len(full) - start), 700.0))

    def answer_tokens(self, rendered: str, special: bool, answer: str) -> int:
        return len(self.ids(rendered + answer, special)) - len(self.ids(rendered, special))


# The rule this reference implements, for requests to the service (whose default differs).
PAPER_STRATEGY = orchestrator_pb2.FusionStrategy(
    aggregation=orchestrator_pb2.AGGREGATION_PPL_MEAN, repetition_guard=orchestrator_pb2.REPETITION_GUARD_OFF
)


@dataclass(frozen=True)
class ReferenceStep:
    """One step of the reference: what each model proposed (with its smallest greedy margin, the
    gap between its two highest logits), the distinct candidates, their fused scores, the winner."""

    segments: list[tuple[str, bool]]  # per model, in model order
    margins: list[float]  # per model
    candidates: list[tuple[str, bool]]
    fused: list[float]  # per candidate; empty when only one candidate (it wins unscored)
    winner: int


def reference_steps(
    models: list[ReferenceModel],
    prompt: str | list[dict],
    max_new_tokens: int = 64,
    stop_strings: tuple[str, ...] = (),
    segment_cap: int = 16,
    aggregate: Callable[[list[float]], float] | None = None,
    grammar: str | None = None,
) -> tuple[str, str, list[ReferenceStep]]:
    """The fused answer, why it ended ("eos", "stop" or "length"), and every step. `aggregate`
    turns the models' perplexities of a candidate (in model order) into its fused score; default:
    their mean. Under `grammar` (an llguidance grammar) the answer also ends ("eos") once the
    grammar allows nothing more."""
    rendered = [m.render(prompt) for m in models]
    answer, steps = "", []
    with ThreadPoolExecutor(len(models)) as pool:
        while True:
            constrained = None if grammar is None else (grammar, answer)
            step = _step(pool, models, rendered, answer, segment_cap, stop_strings, aggregate, constrained)
            steps.append(step)
            winner = step.candidates[step.winner]
            previous = len(answer)
            answer += winner[0]
            if winner[1]:
                return answer, "eos", steps
            hits = [answer.find(s, max(0, previous - len(s) + 1)) for s in stop_strings]
            hits = [h for h in hits if h >= 0]
            if hits:
                return answer[: min(hits)], "stop", steps
            if grammar is not None and models[0].complete(grammar, answer):
                return answer, "eos", steps
            if models[0].answer_tokens(*rendered[0], answer) >= max_new_tokens or not winner[0]:
                return answer, "length", steps


def _step(
    pool: ThreadPoolExecutor,
    models: list[ReferenceModel],
    rendered: list[tuple[str, bool]],
    answer: str,
    segment_cap: int,
    stop_strings: tuple[str, ...],
    aggregate: Callable[[list[float]], float] | None,
    constrained: tuple[str, str] | None = None,
) -> ReferenceStep:
    """One step. Each model's work runs in its own thread: no model waits for another's within a
    step, and with one torch thread per Python thread (tests/conftest.py) the models use both cores
    of an idle machine without the intra-op threads that stall on a busy one."""
    contexts = [(r + answer, s) for r, s in rendered]
    proposals = list(
        pool.map(lambda m, c: m.segment(c[0], c[1], segment_cap, stop_strings, constrained), models, contexts)
    )
    segments = [(text, eos) for text, eos, _ in proposals]
    candidates = list(dict.fromkeys(segments))  # distinct, in worker order
    fused: list[float] = []
    if len(candidates) > 1:
        per_model = list(
            pool.map(lambda m, c: [m.perplexity(c[0], c[1], t, e) for t, e in candidates], models, contexts)
        )
        combine = aggregate or (lambda perplexities: sum(perplexities) / len(perplexities))
        fused = [combine([scores[i] for scores in per_model]) for i in range(len(candidates))]
    winner_index = min(range(len(candidates)), key=lambda i: (fused[i], i)) if fused else 0
    return ReferenceStep(segments, [margin for _, _, margin in proposals], candidates, fused, winner_index)


def reference_fuse(
    models: list[ReferenceModel],
    prompt: str | list[dict],
    max_new_tokens: int = 64,
    stop_strings: tuple[str, ...] = (),
    segment_cap: int = 16,
    aggregate: Callable[[list[float]], float] | None = None,
    grammar: str | None = None,
) -> tuple[str, str]:
    """The fused answer and why it ended (see reference_steps)."""
    text, finish, _ = reference_steps(models, prompt, max_new_tokens, stop_strings, segment_cap, aggregate, grammar)
    return text, finish
