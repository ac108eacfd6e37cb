"""Tiny random causal LMs with locally trained tokenizers, built offline in seconds for tests."""

import pathlib
import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

FAMILIES = ("bpe", "metaspace", "char")

# Hand-written sentences: enough variety (words, digits, punctuation, newlines)
# for the trainers to learn a few hundred merges, with nothing taken from a dataset.
CORPUS = """\
The quick brown fox jumps over the lazy dog near the river bank.
A small cat sleeps on the warm window sill every afternoon.
Tom has 3 apples and buys 4 more. How many apples does Tom have now? Tom has 7 apples.
Anna reads 12 pages on Monday and 15 pages on Tuesday, so she reads 27 pages in total.
A train travels 60 miles per hour for 2 hours. It covers 120 miles.
If a box holds 8 pencils, then 5 boxes hold 40 pencils.
Sam had 25 dollars. He spent 9 dollars on lunch and has 16 dollars left.
There are 24 students in the class; half of them are girls, which is 12 girls.
The answer is 42. The sum of 19 and 23 is 42, and 6 times 7 is also 42.
What is 100 minus 37? It is 63. What is 81 divided by 9? It is 9.
Please write a short poem about the sea, the wind and the stars at night.
The weather today is sunny with a light breeze from the west.
Our team will meet at 10:30 in the morning to plan the next release.
She opened the door, looked outside, and smiled at the bright blue sky.
Computers follow instructions step by step, one line of code at a time.
Water boils at 100 degrees and freezes at 0 degrees on the Celsius scale.
Every morning the baker makes 48 loaves of bread and sells 36 of them.
Let x be the number of cookies. If 3x = 18, then x = 6 cookies.
Question: Lily has 5 red balls and 8 blue balls. How many balls in all?
Answer: 5 + 8 = 13, so Lily has 13 balls.
The library opens at 9 and closes at 5, except on Sunday when it is closed.
Birds sing in the trees while children play games in the green park.
"""

# Every tokenizer covers these, and greedy output is limited to them: control characters
# and tabs would only make test failures harder to read.
PRINTABLE = frozenset(string.ascii_letters + string.digits + string.punctuation + " \n")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HIDDEN = 64
# Four heads of 16. vLLM's CPU attention serves head sizes of 32 and up, so the models that tests
# serve through vLLM workers are built with heads of 32 (half as many) instead.
HEAD_DIM = 16
VLLM_HEAD_DIM = 32
MAX_POSITIONS = 4096
# The default init range (0.02) makes the argmax nearly constant; a wide one makes greedy
# output vary with the prompt. Seed, range and boosts were tuned by greedy-decoding prompts.
SEED = 3
INIT_RANGE = 0.5
# Scale of the output rows of tokens that start with whitespace, so that a third to a half
# of greedy tokens do, as in English text; the char vocabulary has only " " and "\n".
WHITESPACE_BOOST = {"bpe": 1.1, "metaspace": 1.1, "char": 2.0}


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2/Llama-3, with ChatML specials and a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    # Byte-level covers every input, so the "unknown" token is only a placeholder id.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE that prepends <bos> to plain text, like Gemma."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    # prepend_scheme="never": no "▁" is invented at the start of a text, and the decoder (Gemma's:
    # "▁" back to a space) strips none. A continuation that starts with "▁word" therefore decodes
    # to " word" on its own, and decode(a) + decode(b) == decode(a + b), as with Gemma.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=sorted(PRINTABLE))
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", tok.token_to_id("<bos>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character or newline; anything else maps to <unk>."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(PRINTABLE))}
    # BPE without merges is a character model that still supports an unknown token.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    # Joins the characters; spelled as SentencePiece's decoder (with nothing to replace) because
    # that is a decoder the constraint engine, llguidance, can read, and a bare Fuse is not.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


TOKENIZERS = {
    "bpe": _bpe_tokenizer,
    "metaspace": _metaspace_tokenizer,
    "char": _char_tokenizer,
}


def _model(family: str, tokenizer: PreTrainedTokenizerFast, head_dim: int) -> PreTrainedModel:
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": HIDDEN // head_dim,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_RANGE,
        "dtype": "float32",
        # Untied, so the output layer can be shaped without touching the input embeddings.
        "tie_word_embeddings": False,
    }
    gated = {"intermediate_size": 2 * HIDDEN, "num_key_value_heads": 2, "head_dim": head_dim}
    torch.manual_seed(SEED)
    if family == "bpe":
        return LlamaForCausalLM(LlamaConfig(**common, **gated))
    if family == "metaspace":
        # A small window and one sliding + one full layer exercise hybrid KV caches.
        config = Gemma3TextConfig(
            **common,
            **gated,
            query_pre_attn_scalar=head_dim,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
        )
        return Gemma3ForCausalLM(config)
    # GPT-2 adds learned absolute positions, LayerNorm and biases to the mix. (Qwen2 would
    # not do: AutoTokenizer swaps in Qwen2Tokenizer for model_type "qwen2", replacing the
    # saved character pipeline with Qwen's byte-level one.)
    return GPT2LMHeadModel(GPT2Config(**common, n_inner=2 * HIDDEN))


@torch.no_grad()
def _shape_output(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, whitespace_boost: float) -> None:
    """Make greedy decoding of random weights look like text: printable, with word breaks.

    A zeroed output row gives a logit of 0, below about half of the random logits, so
    specials (EOS included) and partial UTF-8 bytes are never the argmax. Rows of tokens
    that start with whitespace are scaled so word boundaries come every few tokens.
    """
    weight = model.get_output_embeddings().weight
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id in tokenizer.all_special_ids or not text or not set(text) <= PRINTABLE:
            weight[token_id] = 0.0
        elif text[0].isspace():
            weight[token_id] *= whitespace_boost


def build_tiny_model(family: str, folder: pathlib.Path, head_dim: int = HEAD_DIM) -> pathlib.Path:
    """Build the family's tokenizer and random model (attention heads of `head_dim`) and save both
    under `folder`."""
    tokenizer = TOKENIZERS[family]()
    model = _model(family, tokenizer, head_dim)
    _shape_output(model, tokenizer, WHITESPACE_BOOST[family])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
