"""Linear layers on the CPU, shaped for the few rows a pass computes.

A decoding pass multiplies every weight matrix by one row per session, and the output layer by the
few rows whose logits are kept. For such row counts the BLAS call behind `nn.Linear` streams a
row-major float32 weight slowly; worst, for the vocabulary-sized output layer it picks kernels
that made two or three rows cost more than eight. So, on the CPU:
- every linear layer's weight is reordered once into oneDNN's blocked layout, which its matrix
  multiply streams at any row count (the dense copy is then dropped);
- an output layer tied to the input embeddings keeps the dense weight the embeddings need, and
  for up to `WEIGHTS_FIRST_MAX_ROWS` rows multiplies it weights-first, `weight @ rows.T`, faster
  there than the blocked copy;
- the rows given to the blocked multiply are padded up to one of a few counts
  (`padded_row_count`): oneDNN (and ideep in torch above it) compiles and caches a kernel per row
  count, each about half a MiB, up to 1,024 of each, and ragged batches would otherwise fill
  those caches with every count from 1 to the pass's token limit.
`scripts/bench_worker.py` section 5 measures each against `nn.Linear` (docs/performance.md).
"""

from __future__ import annotations

from typing import TypeGuard

import torch
from transformers import PreTrainedModel

# Weights-first beats the blocked copy up to four rows of Gemma-3's 262k x 640 output layer and
# loses from eight on (bench_worker.py section 5).
WEIGHTS_FIRST_MAX_ROWS = 4
# Row counts are padded to four steps per doubling: at most a quarter more rows computed, and
# every count up to 8 and then 4 per doubling cached (28 up to the default 256 tokens of a pass).
_STEPS_PER_DOUBLING = 4


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight is held in oneDNN's blocked layout for the CPU. `dense` keeps
    the original weight of an output layer tied to the input embeddings, which need it anyway."""

    def __init__(self, linear: torch.nn.Linear, keep_dense: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.bias = linear.bias
        self.dense = linear.weight if keep_dense else None  # (out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # (rows, in_features)
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        if self.dense is not None and rows.shape[0] <= WEIGHTS_FIRST_MAX_ROWS:
            out = self._weights_first(rows, self.dense)
        else:
            out = self._blocked(rows)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _blocked(self, rows: torch.Tensor) -> torch.Tensor:
        count, padded_count = rows.shape[0], padded_row_count(rows.shape[0])
        if padded_count > count:
            rows = torch.cat([rows, rows.new_zeros(padded_count - count, self.in_features)])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out[:count]  # (rows, out_features)

    def _weights_first(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One row alone would take the matrix-vector path, as slow as nn.Linear's: it is doubled.
        padded = rows if rows.shape[0] > 1 else rows.expand(2, -1).contiguous()
        out = (weight @ padded.T).T[: rows.shape[0]].contiguous()  # (rows, out_features)
        return out if self.bias is None else out + self.bias


def padded_row_count(rows: int) -> int:
    """The row count the blocked multiply computes for `rows` rows: `rows` itself below
    2 * _STEPS_PER_DOUBLING, above that rounded up to a multiple of 1/_STEPS_PER_DOUBLING of
    its power of two (9 -> 10, 17 -> 20, 100 -> 112)."""
    step = max(1, 2 ** (rows.bit_length() - 1) // _STEPS_PER_DOUBLING)
    return -(-rows // step) * step


def pack_linear_layers(model: PreTrainedModel) -> int:
    """Replaces every float32 `nn.Linear` on the CPU that accelerate does not manage (its hooks
    move offloaded weights in and out) by a `PackedLinear`; returns how many it replaced."""
    if not torch.backends.mkldnn.is_available():
        return 0
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, PackedLinear(child, keep_dense=tied and child is output))
                replaced += 1
    return replaced


def compile_row_counts(model: PreTrainedModel, max_rows: int) -> int:
    """Runs the blocked multiply of each distinct packed layer shape once for every padded row
    count up to `max_rows`, so that the kernels and their memory are taken at start-up, as
    serving engines capture their batch sizes before taking traffic, rather than spread over
    the first hours of serving; returns how many multiplies it ran."""
    shapes = {
        (m.in_features, m.out_features, m.bias is not None): m for m in model.modules() if isinstance(m, PackedLinear)
    }
    counts = sorted({padded_row_count(rows) for rows in range(1, max_rows + 1)})
    with torch.inference_mode():
        for layer in shapes.values():
            for count in counts:
                layer._blocked(torch.zeros(count, layer.in_features, dtype=torch.float32))
    return len(shapes) * len(counts)


def _packable(module: torch.nn.Module) -> TypeGuard[torch.nn.Linear]:
    if type(module) is not torch.nn.Linear or hasattr(module, "_hf_hook"):
        return False
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
