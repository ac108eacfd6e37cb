"""Both real presets resolve from their PyPI packages, load, and answer sensibly."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub, even by accident

from coolfusion.worker import model_files
from coolfusion.worker.hf import loading

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.real_model


def _greedy(model, tokenizer, ids, max_new_tokens: int = 24) -> str:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def smollm2():
    folder = model_files.resolve_model_folder(preset="smollm2-135m-instruct")
    return loading.load_model(folder)


@pytest.fixture(scope="module")
def gemma():
    folder = model_files.resolve_model_folder(preset="gemma3-270m")
    return loading.load_model(folder)


def test_smollm2_eos_and_chat_template(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


def test_smollm2_answers_paris(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert "Paris" in _greedy(model, tokenizer, ids)


def test_gemma_eos_bos_and_tied_embeddings(gemma):
    model, tokenizer = gemma
    assert tokenizer.eos_token == "<eos>" and tokenizer.eos_token_id == 1
    assert model.generation_config.eos_token_id == 1
    ids = tokenizer("The capital of France is").input_ids
    assert ids[0] == tokenizer.bos_token_id == 2  # Gemma wants <bos> before plain text
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_gemma_continuation_is_sensible(gemma):
    # Measured: the greedy continuation of the exact prompt is " the capital of the country of
    # France. It is the largest city in France...", with " Paris" ranked 3rd (p~0.08) after
    # " the"/" a"; one more word of context makes " Paris" the greedy choice (p~0.52).
    model, tokenizer = gemma
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        top5 = model(ids).logits[0, -1].topk(5).indices.tolist()
    assert " Paris" in [tokenizer.decode(i) for i in top5]
    assert "France" in _greedy(model, tokenizer, ids, max_new_tokens=12)
    ids = tokenizer("The capital of France is the city of", return_tensors="pt").input_ids
    assert "Paris" in _greedy(model, tokenizer, ids, max_new_tokens=8)


def test_bfloat16_load_runs():
    folder = model_files.resolve_model_folder(preset="smollm2-135m-instruct")
    model, tokenizer = loading.load_model(folder, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    assert _greedy(model, tokenizer, ids, max_new_tokens=2) is not None
