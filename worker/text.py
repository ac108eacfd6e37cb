"""A Hugging Face tokenizer as the worker uses it: prompts rendered, tokens <-> text, EOS ids.

Engine-independent: the transformers engine and the vLLM engine read the same tokenizer folder,
so both tokenize and decode exactly alike (docs/design.md sections 2.1 and 2.2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coolfusion.worker.backend import PromptSpec, RenderedPrompt
from coolfusion.worker.tool_prompts import plain_turns, renders_tools, template_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens of context decoded together with new tokens, so that tokenizers whose decode depends on
# the previous token (SentencePiece leading spaces, multi-byte characters) give the right text.
_DECODE_TAIL = 8


class ModelText:
    """Rendering, tokenizing and decoding for one model; `generation_eos` is the model's generation
    config's EOS id (or ids), whose ids end a segment too."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None, model_id: str):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.eos_id = self._primary_eos_id(generation_eos)
        configured = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.stop_ids = frozenset(int(i) for i in configured if i is not None) | {self.eos_id}

    def _primary_eos_id(self, generation_eos: int | list[int] | None) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = generation_eos[0] if isinstance(generation_eos, list) else generation_eos
        if eos is None:
            raise ValueError(f"model {self.model_id} has no EOS token")
        return int(eos)

    @property
    def eos_text(self) -> str:
        text = self.tokenizer.convert_ids_to_tokens(self.eos_id)
        return text if isinstance(text, str) else ""

    def render(self, prompt: PromptSpec) -> RenderedPrompt:
        """The prompt as this model sees it (docs/design.md section 2.1)."""
        if prompt.text is not None:
            return RenderedPrompt(prompt.text, add_special_tokens=True)
        template = self.tokenizer.chat_template
        if template and renders_tools(template):
            messages, tools = template_messages(prompt)
        else:
            messages, tools = [{"role": role, "content": content} for role, content in plain_turns(prompt)], None
        if template:
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
            # The template already spells out its special tokens.
            return RenderedPrompt(str(rendered), add_special_tokens=False)
        # A base model has no template: the turns become plain paragraphs.
        return RenderedPrompt("\n\n".join(m["content"] for m in messages) + "\n\n", add_special_tokens=True)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))

    def decode_continuation(self, context_ids: list[int], new_ids: list[int]) -> str:
        """The text that `new_ids` add after `context_ids`."""
        tail = context_ids[-_DECODE_TAIL:]
        return self.decode(tail + new_ids)[len(self.decode(tail)) :]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading ids that `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
