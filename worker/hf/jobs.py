"""Backend calls as resumable jobs: each pass of the scheduler asks a job for its next feeds and
hands back their logits, so that many sessions' calls advance together (docs/design.md section 4.6).

Every method here runs on the model thread, the only thread that touches session caches.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Any

import torch

from coolfusion.worker.backend import CandidateText, SegmentRules, TextScore, Timed
from coolfusion.worker.constraints import AnswerGuide
from coolfusion.worker.hf.donors import PromptDonors
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.hf.model import Feed, HFModel
from coolfusion.worker.hf.sampler import TokenChooser
from coolfusion.worker.segments import SegmentScan
from coolfusion.worker.text import common_prefix_length


class Job(ABC):
    """One backend call in progress. `start` runs when the scheduler admits it; then each pass
    takes `next_feeds` and returns their logits to `absorb`, until `finished`."""

    def __init__(self, kv: SessionKV):
        self.kv = kv
        self.future: Future[Timed[Any]] = Future()
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = False
        self._first_pass: float | None = None

    @property
    def decoding(self) -> bool:
        """Whether the job is generating token by token (the scheduler serves those first)."""
        return False

    @abstractmethod
    def start(self) -> None:
        """Prepares the job on the model thread; it may finish here, without any pass."""

    @abstractmethod
    def next_feeds(self, budget: int, alone: bool) -> list[Feed]:
        """Feeds for the next pass, at most `budget` tokens; when `alone` (nothing else is in the
        pass), at least one feed even if it is larger."""

    @abstractmethod
    def absorb(self, feeds: list[Feed], logits: list[torch.Tensor]) -> None:
        """Takes the logits of the feeds this job gave for the pass that just ran."""

    def mark_pass(self) -> None:
        if self._first_pass is None:
            self._first_pass = time.perf_counter()

    def settle(self) -> None:
        """Hands the result, or the error, to the caller, unless the caller gave up (cancelled)."""
        if not self.future.set_running_or_notify_cancel():
            return
        if self.error is not None:
            self.future.set_exception(self.error)
            return
        compute_ms = 0.0 if self._first_pass is None else (time.perf_counter() - self._first_pass) * 1000
        self.future.set_result(Timed(self.result, compute_ms))

    def fail(self, error: BaseException) -> None:
        """Ends the job with `error`; the scheduler settles it."""
        self.error, self.finished = error, True

    def _finish(self, result: Any) -> None:
        self.result = result
        self.finished = True


class Prefill:
    """Brings a session's cache to hold exactly `target`, feeding only what differs from what it
    holds, in chunks that fit each pass; the last chunk yields the logits after `target`."""

    def __init__(self, kv: SessionKV, target: list[int], donors: PromptDonors | None = None):
        self._kv = kv
        self._target = target
        self._donors = donors  # other sessions, whose cached prompts this one may copy
        keep = common_prefix_length(kv.ids, target)
        if keep == len(target) == len(kv.ids) and kv.next_logits is not None:
            self._remaining: list[int] = []
            return
        # At least one token must be fed to obtain next-token logits.
        keep = min(keep, len(target) - 1)
        kv.crop(keep)
        self._remaining = target[keep:]

    @property
    def done(self) -> bool:
        return not self._remaining

    def feed(self, budget: int) -> Feed:
        # Checked before every chunk, since a donor may be prefilling the same text a pass ahead.
        if self._donors is not None:
            del self._remaining[: self._donors.copy_into(self._kv, self._target)]
        chunk = self._remaining[: max(budget, 1)]
        last = (len(chunk) - 1,) if len(chunk) == len(self._remaining) else ()
        return Feed(self._kv, len(self._kv.ids), chunk, last)

    def absorb(self, feed: Feed, logits: torch.Tensor) -> None:
        del self._remaining[: len(feed.tokens)]
        if self.done:
            self._kv.next_logits = logits[0]


class SyncJob(Job):
    """Prefill only (OpenSession)."""

    def __init__(self, kv: SessionKV, target: list[int], donors: PromptDonors | None = None):
        super().__init__(kv)
        self._target = target
        self._donors = donors
        self._prefill: Prefill | None = None

    def start(self) -> None:
        self._prefill = Prefill(self.kv, self._target, self._donors)
        if self._prefill.done:
            self._finish(None)

    def next_feeds(self, budget: int, alone: bool) -> list[Feed]:
        assert self._prefill is not None
        return [self._prefill.feed(budget)] if budget > 0 or alone else []

    def absorb(self, feeds: list[Feed], logits: list[torch.Tensor]) -> None:
        assert self._prefill is not None
        self._prefill.absorb(feeds[0], logits[0])
        if self._prefill.done:
            self._finish(None)


class GenerateJob(Job):
    """One segment (docs/design.md section 2.2): prefill what changed, then decode a token per
    pass until the segment ends. The cache keeps the context plus the segment's kept tokens.
    Under a constraint, each token is the best the constraint allows (section 9.2)."""

    def __init__(self, model: HFModel, kv: SessionKV, context_ids: list[int], rules: SegmentRules):
        super().__init__(kv)
        self._context = context_ids
        self._scan = SegmentScan(
            functools.partial(model.decode_continuation, context_ids), model.stop_ids, rules.max_tokens,
            rules.stop_strings,
        )  # fmt: skip
        self._constraint = rules.constraint
        self._guide = _answer_guide(rules)
        self._choose_token = TokenChooser(rules.sampling)
        self._prefill: Prefill | None = None
        self._pending: int | None = None  # the last token chosen, to be fed next pass

    @property
    def decoding(self) -> bool:
        return self._pending is not None

    def start(self) -> None:
        if self._guide is not None:
            assert self._constraint is not None
            self._guide.start_segment(self._constraint.answer_text)
        self._prefill = Prefill(self.kv, self._context)
        if self._prefill.done:
            self._choose(self._next_logits())

    def next_feeds(self, budget: int, alone: bool) -> list[Feed]:
        if self._pending is not None:
            return [Feed(self.kv, len(self.kv.ids), [self._pending], (0,))]
        assert self._prefill is not None
        return [self._prefill.feed(budget)] if budget > 0 or alone else []

    def absorb(self, feeds: list[Feed], logits: list[torch.Tensor]) -> None:
        if self._pending is not None:
            self.kv.next_logits = logits[0][0]
            self._pending = None
        else:
            assert self._prefill is not None
            self._prefill.absorb(feeds[0], logits[0])
            if not self._prefill.done:
                return
        self._choose(self._next_logits())

    def _next_logits(self) -> torch.Tensor:
        assert self.kv.next_logits is not None
        return self.kv.next_logits

    def _choose(self, logits: torch.Tensor) -> None:
        """Takes the next token (greedy, or drawn) and decides whether the segment ended."""
        if self._guide is not None:
            allowed = torch.from_numpy(self._guide.allowed()).to(logits.device)
            logits = logits.masked_fill(~allowed, -torch.inf)
        token = self._choose_token(logits)
        segment = self._scan.add(token)
        if segment is None:
            if self._guide is not None:
                self._guide.take(token)
            self._pending = token
            return
        if self._guide is not None:
            self._guide.end_segment()
        if self._scan.cut:
            # The last token crossed the cut and was never fed; earlier ones whose text ends past
            # the cut are rolled back too. (At EOS or the cap the cache already holds what it should:
            # the EOS, or the last token, was never fed.)
            self.kv.crop(len(self._context) + self._scan.kept)
        self._finish(segment)


def _answer_guide(rules: SegmentRules) -> AnswerGuide | None:
    if rules.constraint is None:
        return None
    guide = rules.constraint.guide
    if not isinstance(guide, AnswerGuide):
        raise TypeError(f"a {type(guide).__name__} is not this engine's guide")
    return guide


class ScoreJob(Job):
    """Scores candidates after the context: each candidate is a forked feed that reads the
    session's cached prefix and leaves the session unchanged. Candidates that do not fit one pass
    go in later passes, which bounds the logits held at once."""

    def __init__(
        self,
        model: HFModel,
        kv: SessionKV,
        context_ids: list[int],
        rows: list[list[int]],
        candidates: list[CandidateText],
    ):
        super().__init__(kv)
        self._context = context_ids
        self._rows = rows
        # Position 0 has no prediction; a merge that rewrites the very first token is scored from 1.
        self._starts = [max(common_prefix_length(context_ids, row), 1) for row in rows]
        self._targets = [row + [model.eos_id] if c.ends_with_eos else row for row, c in zip(rows, candidates)]
        self._prefix = min(self._starts) - 1  # the cache supplies positions [0, prefix)
        self._prefill: Prefill | None = None
        self._scores: list[TextScore | None] = [None] * len(rows)
        self._next = 0  # the next candidate to feed

    def start(self) -> None:
        if common_prefix_length(self.kv.ids, self._context) < self._prefix:
            self._prefill = Prefill(self.kv, self._context)

    def next_feeds(self, budget: int, alone: bool) -> list[Feed]:
        if self._prefill is not None and not self._prefill.done:
            return [self._prefill.feed(budget)] if budget > 0 or alone else []
        feeds: list[Feed] = []
        scratch = len(self.kv.ids)  # past everything the session holds; each candidate after the last
        while self._next + len(feeds) < len(self._targets):
            tokens = self._targets[self._next + len(feeds)][self._prefix :]
            if len(tokens) > budget and not (alone and not feeds):
                break
            feeds.append(Feed(self.kv, self._prefix, tokens, tuple(range(len(tokens) - 1)), scratch))
            budget -= len(tokens)
            scratch += len(tokens)
        return feeds

    def absorb(self, feeds: list[Feed], logits: list[torch.Tensor]) -> None:
        if self._prefill is not None and not self._prefill.done:
            self._prefill.absorb(feeds[0], logits[0])
            return
        for feed, feed_logits in zip(feeds, logits):
            self._scores[self._next] = self._score(self._next, feed, feed_logits)
            self._next += 1
        if self._next == len(self._targets):
            self._finish(self._scores)

    def _score(self, index: int, feed: Feed, logits: torch.Tensor) -> TextScore:
        """Position j of the feed is predicted by its logits row j - 1."""
        log_probs = torch.log_softmax(logits, dim=-1)  # (length - 1, vocab)
        next_ids = torch.tensor(feed.tokens[1:], device=logits.device).unsqueeze(-1)
        token_log_probs = log_probs.gather(-1, next_ids).squeeze(-1)  # (length - 1,)
        first, end = self._starts[index] - self._prefix, len(self._targets[index]) - self._prefix
        scored = token_log_probs[first - 1 : end - 1]
        return TextScore(
            scored_tokens=end - first,
            log_prob_sum=float(scored.sum()),
            context_tokens_with_text=len(self._rows[index]),
        )
