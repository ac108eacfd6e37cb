"""The KV layout for ragged batches: one growable buffer per session and layer, and the attention
function that lets one packed forward pass serve many sessions of different lengths.

A batch is packed into a single sequence: every session's new tokens (a decode token, a prefill
chunk, a candidate to score) are concatenated, so the projections and MLPs run on exactly the new
tokens, with no padding. The attention function (registered with transformers under
`ATTENTION_NAME`) splits the packed queries back into pieces and attends each piece to its own
session's buffer, through a view: no session's cache is copied to build a batch, so a decode
iteration costs the same per session whatever the others' lengths. Rolling a session back is
setting its length. Sliding-window layers (Gemma 3) keep every position, like the full layers, and
only attend to the window, so rollback works the same for both and stays exact past the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from coolfusion.worker.backend import SessionCache

ATTENTION_NAME = "coolfusion_ragged"
# Buffers grow in steps of at least this many positions, so that decoding one token at a time
# reallocates rarely; growth by half the current size keeps the copies amortised.
_GROWTH_TOKENS = 64


class SessionKV(SessionCache):
    """One session's keys and values for every layer, and the token ids they hold."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # the tokens whose keys and values are held, in order
        self.next_logits: torch.Tensor | None = None  # (vocab,): predicts the token after `ids`
        self._keys: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, capacity, head_dim)
        self._values: dict[int, torch.Tensor] = {}
        # Its session is gone (closed or evicted): a call still queued or running on it stops.
        self.closed = False

    @property
    def cached_tokens(self) -> int:
        return len(self.ids)

    def crop(self, length: int) -> None:
        """Forgets every position from `length` on (the buffers keep their memory for reuse)."""
        if length < len(self.ids):
            del self.ids[length:]
            self.next_logits = None

    def clear(self) -> None:
        self.crop(0)

    def free(self) -> None:
        """Drops the buffers themselves, not only the positions: their memory goes back at once."""
        self.ids, self.next_logits = [], None
        self._keys, self._values = {}, {}

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores `keys`/`values` (kv_heads, n, head_dim) at positions [start, start + n)."""
        end = start + keys.shape[1]
        self._reserve(layer, keys, end)
        self._keys[layer][:, start:end] = keys
        self._values[layer][:, start:end] = values

    @torch.inference_mode()  # the buffers were made in inference mode, by forward passes
    def extend_from(self, donor: SessionKV, end: int) -> None:
        """Takes positions [len(ids), end) from `donor`, whose first `end` ids continue this
        session's: a shared prompt prefix is copied instead of computed again."""
        start = len(self.ids)
        for layer, keys in donor._keys.items():
            self._reserve(layer, keys, end)
            self._keys[layer][:, start:end] = keys[:, start:end]
            self._values[layer][:, start:end] = donor._values[layer][:, start:end]
        self.ids.extend(donor.ids[start:end])
        self.next_logits = None

    def view(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [start, end), without copying: (kv_heads, end - start, head_dim)."""
        return self._keys[layer][:, start:end], self._values[layer][:, start:end]

    def _reserve(self, layer: int, like: torch.Tensor, needed: int) -> None:
        held = self._keys.get(layer)
        if held is not None and held.shape[1] >= needed:
            return
        capacity = needed + _GROWTH_TOKENS if held is None else max(needed + _GROWTH_TOKENS, held.shape[1] * 3 // 2)
        shape = (like.shape[0], capacity, like.shape[2])
        keys = like.new_empty(shape)
        values = like.new_empty(shape)
        if held is not None:  # positions past `ids` may hold stale data; copying them is harmless
            keys[:, : held.shape[1]] = held
            values[:, : held.shape[1]] = self._values[layer]
        self._keys[layer], self._values[layer] = keys, values


@dataclass(frozen=True)
class Piece:
    """One session's new tokens inside a packed batch.

    `start` is the position of the piece's first token in its session. An extending piece writes
    its keys and values into the session's buffers at [start, start + length). A forked piece (a
    candidate being scored) attends to the session's first `start` positions and to itself only:
    its keys and values go to scratch room past everything the session holds (`slot`), so the
    session is unchanged and nothing is copied.
    """

    kv: SessionKV
    start: int
    length: int
    offset: int  # where the piece begins in the packed sequence
    slot: int  # buffer index of the piece's first key: `start` when extending, scratch room when forked

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.length)

    @property
    def forked(self) -> bool:
        return self.slot != self.start


@dataclass
class RaggedBatch:
    """The pieces of one packed forward pass; passed to the attention function as a model kwarg."""

    pieces: list[Piece] = field(default_factory=list)


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    ragged: RaggedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface over a packed batch: query (1, heads, packed, head_dim),
    key/value (1, kv_heads, packed, head_dim) of the new tokens only; returns (1, packed, heads, head_dim)."""
    if ragged is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the `ragged` batch of its forward pass")
    layer: int = module.layer_idx  # type: ignore[assignment]  # set by transformers on attention modules
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])  # (1, packed, heads, head_dim)
    grouped = query.shape[1] != key.shape[1]
    for piece in ragged.pieces:
        rows = slice(piece.offset, piece.offset + piece.length)
        keys, values, first = _piece_keys(piece, layer, key[0, :, rows], value[0, :, rows], sliding_window)
        mask = _piece_mask(piece, first, sliding_window, query.device)
        attended = F.scaled_dot_product_attention(
            query[:, :, rows], keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, scale=scaling, enable_gqa=grouped
        )  # (1, heads, length, head_dim)
        out[0, rows] = attended[0].transpose(0, 1)
    return out, None


def _piece_keys(
    piece: Piece, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stores the piece's keys and values at its slot; returns a view of the buffer from the first
    key it may see to its own last, and that first key's buffer index."""
    piece.kv.write(layer, piece.slot, new_keys, new_values)
    end = piece.slot + piece.length
    # A single extending token sees at most the window; other pieces are masked to it instead.
    first = max(0, end - window) if window is not None and piece.length == 1 and not piece.forked else 0
    keys, values = piece.kv.view(layer, first, end)
    return keys, values, first


def _piece_mask(piece: Piece, first: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Which of the viewed keys each of the piece's queries sees: the session's keys before
    `start` and the piece's own up to itself (causal), within the window; None when all of them."""
    if piece.length == 1 and not piece.forked:
        return None
    indices = torch.arange(first, piece.slot + piece.length, device=device)
    # A key's position in the session: its index before `start`; past the slot, `start` onwards.
    key_positions = torch.where(indices >= piece.slot, indices - piece.slot + piece.start, indices).unsqueeze(0)
    session_or_own = ((indices < piece.start) | (indices >= piece.slot)).unsqueeze(0)
    query_positions = torch.arange(piece.start, piece.start + piece.length, device=device).unsqueeze(1)
    visible = session_or_own & (key_positions <= query_positions)  # (length, keys)
    if window is not None:
        visible &= key_positions > query_positions - window
    return visible


def _no_mask(*args, **kwargs) -> None:
    """The model's own mask builder is skipped: ragged_attention makes each piece's mask itself."""
    return


AttentionInterface.register(ATTENTION_NAME, ragged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def use_ragged_attention(model: PreTrainedModel) -> None:
    """Switches a loaded transformers model to ragged attention; refuses architectures it cannot serve."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: attention logit soft-capping is not supported by ragged batching")
    attention_layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if not attention_layers:
        raise ValueError(
            f"{config.model_type}: no attention layers with a layer index; ragged batching cannot serve it"
        )
    model.set_attn_implementation(ATTENTION_NAME)
