"""A Hugging Face causal LM and its tokenizer: rendering, tokens <-> text, and packed forward passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coolfusion.worker.backend import ModelDescription, PromptSpec, RenderedPrompt
from coolfusion.worker.hf import placement
from coolfusion.worker.hf.cpu_linear import pack_linear_layers
from coolfusion.worker.hf.kv import Piece, RaggedBatch, SessionKV, use_ragged_attention

# Tokens of context decoded together with new tokens, so that tokenizers whose decode depends on
# the previous token (SentencePiece leading spaces, multi-byte characters) give the right text.
_DECODE_TAIL = 8


@dataclass(frozen=True)
class Feed:
    """Tokens to run through the model for one session in a packed pass.

    `logits_at` lists the indices within `tokens` whose next-token logits are wanted. A forked
    feed (a candidate being scored) reads the session's first `start` positions and leaves the
    session unchanged, its keys held at `scratch`, a buffer index past everything the session
    holds (and past other forked feeds of the same pass); otherwise the tokens extend the session,
    so `start` must equal its length.
    """

    kv: SessionKV
    start: int
    tokens: list[int]
    logits_at: tuple[int, ...]
    scratch: int | None = None

    @property
    def forked(self) -> bool:
        return self.scratch is not None


class HFModel:
    """A transformers model and tokenizer with the operations the scheduler needs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, model_id: str):
        use_ragged_attention(model)
        pack_linear_layers(model)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.eos_id = self._primary_eos_id()
        self.stop_ids = self._all_eos_ids()
        self.max_context_tokens = int(getattr(model.config, "max_position_embeddings", 2048))
        # Where the input embeddings compute (their weights may be offloaded, on the meta device).
        self.input_device = placement.execution_device(model, model.get_input_embeddings())
        # Under accelerate's hooks the logits index stays on the CPU, valid whichever device
        # the last layer's output is on (placement.keep_kwarg_off_device).
        split = placement.keep_kwarg_off_device(model, "logits_to_keep")
        self.index_device = torch.device("cpu") if split else self.input_device
        self.placement = placement.parameter_placement(model)

    def describe(self, dtype: str) -> ModelDescription:
        tokenizer = self.tokenizer
        eos_text = tokenizer.convert_ids_to_tokens(self.eos_id)
        return ModelDescription(
            model_id=self.model_id,
            tokenizer_family=type(tokenizer).__name__,
            vocab_size=len(tokenizer),
            eos_text=eos_text if isinstance(eos_text, str) else "",
            bos_text=str(tokenizer.bos_token or ""),
            has_chat_template=bool(tokenizer.chat_template),
            max_context_tokens=self.max_context_tokens,
            device=str(self.input_device),
            dtype=dtype,
            placement=self.placement,
        )

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

    def render(self, prompt: PromptSpec) -> RenderedPrompt:
        """The prompt as this model sees it (docs/design.md section 2.1)."""
        if prompt.text is not None:
            return RenderedPrompt(prompt.text, add_special_tokens=True)
        messages = [{"role": t.role, "content": t.content} for t in prompt.chat]
        if self.tokenizer.chat_template:
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            # The template already spells out its special tokens.
            return RenderedPrompt(str(rendered), add_special_tokens=False)
        # A base model has no template: the turns become plain paragraphs.
        return RenderedPrompt("\n\n".join(t.content for t in prompt.chat) + "\n\n", add_special_tokens=True)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))

    def decode_continuation(self, context_ids: list[int], new_ids: list[int]) -> str:
        """The text that `new_ids` add after `context_ids`."""
        tail = context_ids[-_DECODE_TAIL:]
        return self.decode(tail + new_ids)[len(self.decode(tail)) :]

    # ---- forward --------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, feeds: list[Feed]) -> list[torch.Tensor]:
        """Runs every feed in one packed pass; returns, per feed, the float32 logits at its
        `logits_at` indices (len(logits_at), vocab). Extending feeds append to their session."""
        pieces: list[Piece] = []
        keep: list[int] = []
        offset = 0
        for feed in feeds:
            slot = feed.start if feed.scratch is None else feed.scratch
            pieces.append(Piece(feed.kv, feed.start, len(feed.tokens), offset, slot))
            keep.extend(offset + i for i in feed.logits_at)
            offset += len(feed.tokens)
        ids = torch.tensor([[t for feed in feeds for t in feed.tokens]], device=self.input_device)  # (1, packed)
        positions = torch.tensor([[p for piece in pieces for p in piece.positions]], device=self.input_device)
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.index_device),
            ragged=RaggedBatch(pieces),
        )
        logits = out.logits[0].float()  # (kept, vocab)
        for feed in feeds:
            if not feed.forked:
                feed.kv.ids.extend(feed.tokens)
        return list(torch.split(logits, [len(feed.logits_at) for feed in feeds]))
