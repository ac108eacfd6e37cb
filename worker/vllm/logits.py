"""The logits processor that holds constrained requests to their language inside vLLM's engine
process (docs/design.md section 4.7), registered when the worker starts the engine.

For each request that carries a constraint (worker/vllm/constraints.py), the processor keeps an
AnswerGuide (worker/constraints.py, the transformers engine's own) at the committed answer, reads
the request's tokens as vLLM appends them, and before each sampling sets every token the language
does not allow to -inf, EOS included where the language may not end. Requests without a constraint
cost nothing: a batch with no constrained request returns its logits untouched.

Nothing here may raise while the engine runs: an exception in a logits processor stops vLLM's
engine, and with it every session. A request whose guide fails (a bug, never a caller's input: the
worker checks the answer before sending it) is held to EOS, which the orchestrator's check of every
candidate then refuses, naming the worker.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from coolfusion.worker.constraints import ConstraintVocabulary, load_vocabulary
from coolfusion.worker.vllm.backend import read_model_text
from coolfusion.worker.vllm.constraints import ConstrainedRequest, RequestConstraint

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate

logger = logging.getLogger(__name__)


@functools.cache
def engine_vocabulary(folder: str, logits_width: int) -> tuple[ConstraintVocabulary | None, frozenset[int]]:
    """The model's constraint vocabulary in this process, and its EOS ids: read from the same folder
    and with the same EOS ids as the worker's (worker/vllm/backend.py), built once per process
    (vLLM builds its logits processors again when it sizes the KV cache)."""
    text = read_model_text(folder, folder)
    return load_vocabulary(text.tokenizer, logits_width, text.stop_ids), text.stop_ids


class ConstrainedLogits(LogitsProcessor):
    """vLLM's logits processor for constrained requests (worker/vllm/constraints.py names them in
    SamplingParams.extra_args). Greedy sampling takes the argmax of what this leaves."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Runs in the worker's process as vLLM takes a request: a malformed constraint is refused."""
        RequestConstraint.of_extra_args(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        model = vllm_config.model_config
        self._vocabulary, stop_ids = engine_vocabulary(str(model.tokenizer), int(model.get_vocab_size()))
        self._eos_only = np.zeros(int(model.get_vocab_size()), dtype=bool)
        self._eos_only[[i for i in stop_ids if i < len(self._eos_only)]] = True
        self._requests: dict[int, ConstrainedRequest] = {}  # by row of the batch

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is greedy

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._requests, batch_update, self._new_request)

    def _new_request(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> ConstrainedRequest | None:
        wanted = RequestConstraint.of_extra_args(params.extra_args)  # checked by validate_params
        if wanted is None:
            return None
        if self._vocabulary is None:  # the worker advertises no constraint then, and sends none
            logger.error("a constrained request reached an engine that cannot read its model's vocabulary")
            return ConstrainedRequest(None, output_ids, self._eos_only)
        return ConstrainedRequest.start(self._vocabulary, wanted, output_ids, self._eos_only)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Row by row, in place: gathering the constrained rows and writing them back took 5x as long
        # as the masking itself for a 262k vocabulary. On the CPU, numpy masks the row: a torch
        # operation this small opens an OpenMP region over vLLM's compute threads, and took 11 ms a
        # token in vLLM's busy worker process against 0.3 ms for llguidance's mask (docs/engines.md).
        for row, request in self._requests.items():  # (batch, vocabulary) logits, one row a request
            blocked = np.logical_not(request.allowed())
            if logits.device.type == "cpu":
                np.copyto(logits[row].numpy(), -np.inf, where=blocked)
            else:
                logits[row].masked_fill_(torch.from_numpy(blocked).to(logits.device), -torch.inf)
        return logits
