"""One causal LM with an incrementally extended KV cache: segments and batched scoring (no RPC)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

# A segment ends right before the first whitespace that follows a non-whitespace character.
_WORD_BOUNDARY = re.compile(r"\S(?=\s)")
# Tokens of context decoded together with new tokens, so that tokenizers whose decode depends on
# the previous token (SentencePiece leading spaces, multi-byte characters) give the right text.
_DECODE_TAIL = 8


class Finish(enum.Enum):
    """Why a segment ended."""

    BOUNDARY = "boundary"
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"


@dataclass(frozen=True)
class ChatTurn:
    """One chat message."""

    role: str
    content: str


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: plain text, or chat turns rendered with the model's chat template."""

    text: str | None = None
    chat: tuple[ChatTurn, ...] = ()


@dataclass(frozen=True)
class Segment:
    """A generated segment; `generated_tokens` counts the tokens that produced it, EOS included."""

    text: str
    finish: Finish
    generated_tokens: int


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


@dataclass
class KVState:
    """A KV cache and the token ids it holds; `next_logits` predicts the token after `ids`."""

    cache: DynamicCache = field(default_factory=DynamicCache)
    ids: list[int] = field(default_factory=list)
    next_logits: torch.Tensor | None = None  # (vocab,)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading ids that `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def segment_cut(text: str, stop_strings: tuple[str, ...]) -> tuple[int, Finish] | None:
    """Where a segment ends inside `text` (exclusive end, reason), or None if it has not ended."""
    cuts: list[tuple[int, Finish]] = []
    boundary = _WORD_BOUNDARY.search(text)
    if boundary:
        cuts.append((boundary.end(), Finish.BOUNDARY))
    for stop in stop_strings:
        at = text.find(stop)
        if at >= 0:
            cuts.append((at + len(stop), Finish.STOP))
    return min(cuts, key=lambda cut: cut[0]) if cuts else None


class LanguageModel:
    """A Hugging Face causal LM and tokenizer, with the cache operations the worker needs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = model.device
        self.eos_id = self._primary_eos_id()
        self.stop_ids = self._all_eos_ids()
        self.max_context_tokens = int(getattr(model.config, "max_position_embeddings", 2048))

    def _primary_eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.model.generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, list) else eos
        if eos is None:
            raise ValueError(f"model {self.model_id} has no EOS token")
        return int(eos)

    def _all_eos_ids(self) -> frozenset[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        return frozenset(int(i) for i in ids if i is not None) | {self.eos_id}

    # ---- text <-> tokens ------------------------------------------------------------------

    def render(self, prompt: PromptSpec) -> tuple[str, bool]:
        """The prompt as this model sees it, and whether tokenizing it adds special tokens."""
        if prompt.text is not None:
            return prompt.text, True
        messages = [{"role": t.role, "content": t.content} for t in prompt.chat]
        if self.tokenizer.chat_template:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already spells out its special tokens.
            return str(rendered), False
        # A base model has no template: the turns become plain paragraphs.
        return "\n\n".join(t.content for t in prompt.chat) + "\n\n", True

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))

    def _decode_continuation(self, context_ids: list[int], new_ids: list[int]) -> str:
        tail = context_ids[-_DECODE_TAIL:]
        return self.decode(tail + new_ids)[len(self.decode(tail)) :]

    # ---- cache ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _forward(self, kv: KVState, new_ids: list[int]) -> torch.Tensor:
        """Feeds `new_ids` after `kv.ids`, keeping only the last position's logits."""
        input_ids = torch.tensor([new_ids], device=self.device)  # (1, new)
        out = self.model(input_ids=input_ids, cache=kv.cache, use_cache=True, logits_to_keep=1)
        kv.ids.extend(new_ids)
        kv.next_logits = out.logits[0, -1].float()  # (vocab,)
        return kv.next_logits

    def _crop(self, kv: KVState, length: int) -> None:
        if length < len(kv.ids):
            kv.cache.crop(length - len(kv.ids))
            del kv.ids[length:]
            kv.next_logits = None

    def sync(self, kv: KVState, target_ids: list[int]) -> torch.Tensor:
        """Makes the cache hold exactly `target_ids`, recomputing only past the first difference.

        Returns the logits that predict the token after `target_ids`.
        """
        keep = common_prefix_length(kv.ids, target_ids)
        if keep == len(target_ids) == len(kv.ids) and kv.next_logits is not None:
            return kv.next_logits
        # At least one token must be fed to obtain next-token logits.
        keep = min(keep, len(target_ids) - 1)
        if keep == 0:
            kv.cache, kv.ids, kv.next_logits = DynamicCache(), [], None
        self._crop(kv, keep)
        return self._forward(kv, target_ids[keep:])

    # ---- generation -----------------------------------------------------------------------

    def generate_segment(
        self,
        kv: KVState,
        context_ids: list[int],
        max_tokens: int,
        stop_strings: tuple[str, ...] = (),
    ) -> Segment:
        """Greedily generates one segment after `context_ids` (docs/design.md section 2.2).

        The cache keeps the context plus the segment's own tokens, so that if this segment wins,
        appending it costs nothing; tokens past the cut are never kept.
        """
        logits = self.sync(kv, context_ids)
        generated: list[int] = []
        text = ""
        while True:
            token = int(torch.argmax(logits))
            if token in self.stop_ids:
                return Segment(text, Finish.EOS, len(generated) + 1)
            generated.append(token)
            text = self._decode_continuation(context_ids, generated)
            cut = segment_cut(text, stop_strings)
            if cut is not None:
                return self._finish_cut(kv, context_ids, generated, text, cut)
            if len(generated) == max_tokens:
                # The last token was never fed, so the cache holds one token fewer than the text.
                return Segment(text, Finish.LENGTH, len(generated))
            logits = self._forward(kv, [token])

    def _finish_cut(
        self,
        kv: KVState,
        context_ids: list[int],
        generated: list[int],
        text: str,
        cut: tuple[int, Finish],
    ) -> Segment:
        end, reason = cut
        # The last token crossed the cut and was never fed; earlier ones whose text ends past
        # the cut (a multi-token whitespace run) are rolled back too.
        kept = len(generated) - 1
        while kept > 0 and len(self._decode_continuation(context_ids, generated[:kept])) > end:
            kept -= 1
        self._crop(kv, len(context_ids) + kept)
        return Segment(text[:end], reason, len(generated))

    # ---- scoring --------------------------------------------------------------------------

    def candidate_rows(
        self, context_text: str, add_special_tokens: bool, candidates: list[CandidateText]
    ) -> list[list[int]]:
        """tokenize(context + candidate) for each candidate: how the model reads the joined text."""
        return [self.tokenize(context_text + c.text, add_special_tokens) for c in candidates]

    @torch.inference_mode()
    def score(
        self,
        kv: KVState,
        context_ids: list[int],
        rows: list[list[int]],
        candidates: list[CandidateText],
    ) -> list[TextScore]:
        """Scores every candidate after the context in one batched forward over the cached prefix.

        A candidate's tokens are those of its row (see `candidate_rows`) from the first position
        that differs from the context's ids, so merges across the join are scored as the model
        reads them.
        """
        # Position 0 has no prediction; a merge that rewrites the very first token is scored from 1.
        starts = [max(common_prefix_length(context_ids, row), 1) for row in rows]
        targets = [row + [self.eos_id] if c.ends_with_eos else row for row, c in zip(rows, candidates)]
        prefix = min(starts) - 1  # the cache supplies positions [0, prefix)
        if common_prefix_length(kv.ids, context_ids) < prefix:
            self.sync(kv, context_ids)
        log_probs = self._batched_log_probs(kv, prefix, [t[prefix:] for t in targets])
        return [
            self._score_row(row_log_probs, start - prefix, len(target) - prefix, len(row))
            for row_log_probs, start, target, row in zip(log_probs, starts, targets, rows)
        ]

    def _batched_log_probs(self, kv: KVState, prefix: int, suffixes: list[list[int]]) -> torch.Tensor:
        """Log-probability of each suffix token given what precedes it: (batch, longest - 1)."""
        batch, longest = len(suffixes), max(len(s) for s in suffixes)
        # Right padding needs no attention mask: causal attention never lets a real token see a pad.
        padded = [s + [self.eos_id] * (longest - len(s)) for s in suffixes]
        input_ids = torch.tensor(padded, device=self.device)  # (batch, longest)
        out = self.model(input_ids=input_ids, cache=self._shared_prefix(kv, prefix, batch), use_cache=True)
        log_probs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # (batch, longest-1, vocab)
        next_ids = input_ids[:, 1:].unsqueeze(-1)  # (batch, longest-1, 1)
        return log_probs.gather(-1, next_ids).squeeze(-1)  # (batch, longest-1)

    @staticmethod
    def _shared_prefix(kv: KVState, prefix: int, batch: int) -> DynamicCache:
        """A batch cache viewing the session's first `prefix` positions; the session is untouched."""
        if prefix == 0:
            return DynamicCache()
        layers = [
            (
                layer.keys[:, :, :prefix].expand(batch, -1, -1, -1),  # type: ignore[union-attr,index]
                layer.values[:, :, :prefix].expand(batch, -1, -1, -1),  # type: ignore[union-attr,index]
            )
            for layer in kv.cache.layers
        ]
        return DynamicCache(ddp_cache_data=layers)

    @staticmethod
    def _score_row(row_log_probs: torch.Tensor, first: int, end: int, row_length: int) -> TextScore:
        # Position j of the suffix is predicted by output j-1.
        scored = row_log_probs[first - 1 : end - 1]
        return TextScore(
            scored_tokens=end - first,
            log_prob_sum=float(scored.sum()),
            context_tokens_with_text=row_length,
        )
