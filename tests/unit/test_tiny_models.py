"""Checks that the tiny test models load offline and behave usefully under greedy decoding."""

import pathlib

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny_models import FAMILIES, build_tiny_model

ARCHITECTURES = {
    "bpe": "LlamaForCausalLM",
    "metaspace": "Gemma3ForCausalLM",
    "char": "GPT2LMHeadModel",
}
PROMPTS = [
    "The weather today is",
    "Tom has 3 apples and",
    "Question: What is 12 plus 30?\nAnswer:",
    "Once upon a time",
    "Write a poem about the sea.",
]


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_auto_classes(tiny_model_dirs: dict[str, pathlib.Path], family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    assert type(model).__name__ == ARCHITECTURES[family]
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.max_position_embeddings >= 2048
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token in tokenizer.all_special_tokens
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_text(tiny_model_dirs: dict[str, pathlib.Path], family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    text = "Sam has 25 dollars.\nHe spends 9, so 16 are left!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_bpe_chat_template_renders(tiny_model_dirs: dict[str, pathlib.Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["bpe"])
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.eos_token_id in ids


def test_metaspace_adds_bos_and_keeps_continuation_spaces(
    tiny_model_dirs: dict[str, pathlib.Path],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["metaspace"])
    prompt = tokenizer("Tom has 3 apples").input_ids
    assert prompt[0] == tokenizer.bos_token_id
    continuation = tokenizer(" and buys 4 more", add_special_tokens=False).input_ids
    assert tokenizer.decode(continuation) == " and buys 4 more"
    assert tokenizer.decode(prompt + continuation, skip_special_tokens=True) == "Tom has 3 apples and buys 4 more"


def test_char_tokenizer_is_per_character_with_unknown(
    tiny_model_dirs: dict[str, pathlib.Path],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["char"])
    assert len(tokenizer("a b\n7", add_special_tokens=False).input_ids) == 5
    assert tokenizer("é", add_special_tokens=False).input_ids == [tokenizer.unk_token_id]


def test_metaspace_model_mixes_sliding_and_full_layers(
    tiny_model_dirs: dict[str, pathlib.Path],
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["metaspace"])
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert model.config.sliding_window <= 64


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_mixes_words_and_whitespace(tiny_model_dirs: dict[str, pathlib.Path], family: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
    mixed = 0
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs.input_ids.shape[1] :].tolist()
        assert new[0] != tokenizer.eos_token_id
        pieces = [tokenizer.decode([token_id]) for token_id in new]
        mixed += any(p[:1].isspace() for p in pieces) and any(p and not p.isspace() for p in pieces)
    assert mixed >= 4


def test_families_continue_differently(
    tiny_model_dirs: dict[str, pathlib.Path],
) -> None:
    texts = set()
    for family in FAMILIES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family])
        inputs = tokenizer(PROMPTS[0], return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs.input_ids.shape[1] :]
        texts.add(tokenizer.decode(new))
    assert len(texts) == len(FAMILIES)


def test_build_is_deterministic(tmp_path: pathlib.Path) -> None:
    weights = [(build_tiny_model("bpe", tmp_path / name) / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
