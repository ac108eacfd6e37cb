"""A Hugging Face causal LM and its tokenizer: rendering, tokens <-> text, and packed forward passes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coolfusion.worker.backend import ModelDescription, PromptSpec, RenderedPrompt
from coolfusion.worker.hf import placement
from coolfusion.worker.hf.cpu_linear import pack_linear_layers
from coolfusion.worker.hf.kv import Piece, RaggedBatch, SessionKV, use_ragged_attention
from coolfusion.worker.text import ModelText


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
        self.text = ModelText(tokenizer, model.generation_config.eos_token_id, model_id)
        self.eos_id = self.text.eos_id
        self.stop_ids = self.text.stop_ids
        self.max_context_tokens = int(getattr(model.config, "max_position_embeddings", 2048))
        self.logits_width = int(model.config.get_text_config().vocab_size)  # rows of the logits
        # Where the input embeddings compute (their weights may be offloaded, on the meta device).
        self.input_device = placement.execution_device(model, model.get_input_embeddings())
        # Under accelerate's hooks the logits index stays on the CPU, valid whichever device
        # the last layer's output is on (placement.keep_kwarg_off_device).
        split = placement.keep_kwarg_off_device(model, "logits_to_keep")
        self.index_device = torch.device("cpu") if split else self.input_device
        self.placement = placement.parameter_placement(model)

    def describe(self, dtype: str) -> ModelDescription:
        tokenizer = self.tokenizer
        return ModelDescription(
            model_id=self.model_id,
            tokenizer_family=type(tokenizer).__name__,
            vocab_size=len(tokenizer),
            eos_text=self.text.eos_text,
            bos_text=str(tokenizer.bos_token or ""),
            has_chat_template=bool(tokenizer.chat_template),
            max_context_tokens=self.max_context_tokens,
            device=str(self.input_device),
            dtype=dtype,
            placement=self.placement,
            engine="transformers",
        )

    # ---- text <-> tokens (docs/design.md sections 2.1 and 2.2) -----------------------------

    def render(self, prompt: PromptSpec) -> RenderedPrompt:
        return self.text.render(prompt)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.text.tokenize(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.text.decode(ids)

    def decode_continuation(self, context_ids: list[int], new_ids: list[int]) -> str:
        """The text that `new_ids` add after `context_ids`."""
        return self.text.decode_continuation(context_ids, new_ids)

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
