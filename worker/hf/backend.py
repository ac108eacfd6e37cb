"""The transformers implementation of ModelBackend: a Hugging Face model behind the batching scheduler."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from coolfusion.constraints import Constraint
from coolfusion.worker import model_files
from coolfusion.worker.backend import (
    CandidateText,
    ModelBackend,
    ModelDescription,
    PassObserver,
    PromptSpec,
    RenderedPrompt,
    Segment,
    SegmentRules,
    SessionCache,
    TextScore,
    Timed,
)
from coolfusion.worker.constraints import ENFORCED_KINDS, AnswerGuide, load_vocabulary
from coolfusion.worker.hf import loading, memory, placement
from coolfusion.worker.hf.cpu_linear import compile_row_counts
from coolfusion.worker.hf.donors import PromptDonors
from coolfusion.worker.hf.jobs import GenerateJob, ScoreJob, SyncJob
from coolfusion.worker.hf.kv import SessionKV
from coolfusion.worker.hf.model import HFModel
from coolfusion.worker.hf.scheduler import Scheduler
from coolfusion.worker.settings import BatchLimits, WorkerSettings

logger = logging.getLogger(__name__)


def load_backend(settings: WorkerSettings) -> TransformersBackend:
    """Resolves the preset or path (converting GGUF once), loads the model and starts its scheduler."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder = model_files.resolve_model_folder(
        preset=settings.preset, model=settings.model, cache_dir=settings.cache_dir
    )
    cache = settings.cache_dir if settings.cache_dir is not None else model_files.default_cache_dir()
    model, tokenizer = loading.load_model(
        folder,
        device=settings.device,
        dtype=settings.dtype,
        device_map=settings.device_map,
        max_memory=settings.max_memory,
        offload_dir=settings.offload_dir if settings.offload_dir is not None else cache / "offload",
    )
    return TransformersBackend(
        HFModel(model, tokenizer, settings.preset or folder.name), settings.dtype, settings.batch
    )


class TransformersBackend(ModelBackend):
    """Text work runs on the caller's thread (the event loop: tokenizing a context takes about a
    millisecond); model work runs on the scheduler's model thread, batched across sessions."""

    def __init__(self, model: HFModel, dtype: str, limits: BatchLimits):
        self._model = model
        self._limits = limits
        self._vocabulary = load_vocabulary(model.tokenizer, model.logits_width, model.stop_ids)
        kinds = ENFORCED_KINDS if self._vocabulary is not None else ()
        self._description = replace(model.describe(dtype), constraint_kinds=kinds)
        started = time.perf_counter()
        if kernels := compile_row_counts(model.model, limits.max_tokens):
            logger.info("compiled %d linear-layer kernels in %.1f s", kernels, time.perf_counter() - started)
        self._scheduler = Scheduler(model, limits)
        # Every live session's cache: a session being opened copies what another already holds
        # of its prompt.
        self._donors = PromptDonors()

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def queue_depth(self) -> int:
        return self._scheduler.queue_depth

    @property
    def passes(self) -> int:
        """Forward passes run so far; a batched call shares its passes with others."""
        return self._scheduler.passes

    def render(self, prompt: PromptSpec) -> RenderedPrompt:
        return self._model.render(prompt)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._model.tokenize(text, add_special_tokens)

    def new_cache(self) -> SessionCache:
        cache = SessionKV()
        self._donors.add(cache)
        return cache

    def release(self, cache: SessionCache) -> None:
        kv = _kv(cache)
        self._donors.withdraw(kv)  # first: no prefill copies from it after this
        self._scheduler.release(kv)

    async def sync(self, cache: SessionCache, context_ids: list[int]) -> Timed[None]:
        return await self._scheduler.run(SyncJob(_kv(cache), context_ids, self._donors))

    @property
    def grammar_compiles(self) -> int:
        return 0 if self._vocabulary is None else self._vocabulary.compiles

    def guide(self, constraint: Constraint) -> AnswerGuide:
        if self._vocabulary is None:
            raise NotImplementedError("this model's tokenizer cannot be read by the constraint engine")
        return self._vocabulary.guide(constraint)

    async def generate(self, cache: SessionCache, context_ids: list[int], rules: SegmentRules) -> Timed[Segment]:
        return await self._scheduler.run(GenerateJob(self._model, _kv(cache), context_ids, rules))

    async def score(
        self, cache: SessionCache, context_ids: list[int], rows: list[list[int]], candidates: list[CandidateText]
    ) -> Timed[list[TextScore]]:
        return await self._scheduler.run(ScoreJob(self._model, _kv(cache), context_ids, rows, candidates))

    def shutdown(self) -> None:
        self._scheduler.stop()

    def observe_passes(self, observer: PassObserver) -> None:
        self._scheduler.observer = observer

    def token_budget(self, headroom: float) -> int:
        """Sized from the free memory of every device holding KV (docs/design.md section 4.3)."""
        lm = self._model.model
        cost = memory.kv_cost(lm.config, lm.dtype.itemsize)
        layers = {layer: str(device) for layer, device in placement.kv_devices(lm).items()}
        kv_bytes = memory.kv_bytes_by_device(cost, layers)
        free = {device: memory.free_bytes(torch.device(device)) for device in kv_bytes}
        logits = memory.logits_bytes(self._limits.max_tokens, int(lm.config.get_text_config().vocab_size))
        sizing = memory.size_budget(kv_bytes, free, headroom, {str(self._model.input_device): logits})
        logger.info(
            "session token budget sized from memory: %s (%d layers x %s B of KV per token%s)",
            sizing.explain(),
            len(cost.layer_bytes),
            f"{cost.layer_bytes[0]:,}",
            _window_note(cost),
        )
        return sizing.tokens


def _window_note(cost: memory.KVCost) -> str:
    if cost.per_token_past_windows == cost.per_token:
        return ""
    return (
        f"; sliding-window layers keep every position here, a window-capped layout would need "
        f"{cost.per_token_past_windows:,} B per token past the windows"
    )


def _kv(cache: SessionCache) -> SessionKV:
    if not isinstance(cache, SessionKV):
        raise TypeError(f"a {type(cache).__name__} is not this backend's session cache")
    return cache
