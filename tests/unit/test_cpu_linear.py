"""Linear layers prepacked for the CPU give nn.Linear's outputs, and replace only the layers they were measured on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from coolfusion.worker.hf.cpu_linear import (
    WEIGHTS_FIRST_MAX_ROWS,
    PackedLinear,
    compile_row_counts,
    pack_linear_layers,
    padded_row_count,
)


@pytest.mark.parametrize("keep_dense", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 2, WEIGHTS_FIRST_MAX_ROWS, WEIGHTS_FIRST_MAX_ROWS + 1, 9, 20, 100])
def test_outputs_equal_linear(rows: int, bias: bool, keep_dense: bool) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 300, bias=bias)
    hidden = torch.randn(1, rows, 48)  # (batch, positions, hidden), as a causal LM passes it
    with torch.inference_mode():
        out = PackedLinear(linear, keep_dense)(hidden)
    assert out.shape == (1, rows, 300)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(hidden, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_few_row_counts_reach_the_blocked_multiply() -> None:
    # Each count compiles and caches kernels (~0.5 MiB); a pass holds up to 256 tokens by default.
    padded = {rows: padded_row_count(rows) for rows in range(1, 257)}
    assert len(set(padded.values())) == 28
    assert all(rows <= count <= rows * 1.25 for rows, count in padded.items())
    assert all(padded[rows] == rows for rows in range(1, 9))


def _tiny(tiny_model_dirs, **options):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["bpe"], local_files_only=True, **options)


def test_every_linear_is_packed_and_a_tied_output_layer_stays_tied(tiny_model_dirs) -> None:
    model = _tiny(tiny_model_dirs)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linear_layers(model) == linears
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    output = model.get_output_embeddings()
    assert isinstance(output, PackedLinear)
    assert output.dense is model.get_input_embeddings().weight


def test_packed_model_gives_the_same_logits(tiny_model_dirs) -> None:
    model, packed = _tiny(tiny_model_dirs), _tiny(tiny_model_dirs)
    pack_linear_layers(packed)
    ids = torch.tensor([[5, 17, 3, 42, 8, 11]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_only_float32_layers_are_packed(tiny_model_dirs) -> None:
    model = _tiny(tiny_model_dirs, dtype=torch.bfloat16)
    assert pack_linear_layers(model) == 0
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_start_up_compiles_every_padded_row_count_of_each_layer_shape(tiny_model_dirs) -> None:
    model = _tiny(tiny_model_dirs)
    pack_linear_layers(model)
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, PackedLinear)}
    assert compile_row_counts(model, 256) == len(shapes) * 28
    assert compile_row_counts(model, 16) == len(shapes) * 12
