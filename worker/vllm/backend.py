"""The vLLM implementation of ModelBackend: one AsyncLLM per model, each call one or a few requests
over the session's whole token sequence, its prefix read from vLLM's prefix cache
(docs/design.md section 4.7)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from coolfusion.constraints import Constraint
from coolfusion.worker import model_files
from coolfusion.worker.backend import (
    CandidateText,
    DeviceShare,
    ModelBackend,
    ModelDescription,
    PromptSpec,
    RenderedPrompt,
    Sampling,
    Segment,
    SegmentRules,
    SessionCache,
    TextScore,
    Timed,
)
from coolfusion.worker.constraints import ENFORCED_KINDS, ConstraintVocabulary, load_vocabulary
from coolfusion.worker.errors import OverCapacity, SessionNotFound, StartupError
from coolfusion.worker.segments import SegmentScan
from coolfusion.worker.settings import BatchLimits, WorkerSettings
from coolfusion.worker.text import ModelText, common_prefix_length
from coolfusion.worker.vllm.constraints import EngineGuide, RequestConstraint, serves

if TYPE_CHECKING:
    from vllm import RequestOutput, SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# The CPU's KV cache when --kv-cache-gib is not given (VLLMSettings.kv_cache_gib says why).
_CPU_KV_CACHE_GIB = 4.0
# vLLM's CPU attention needs blocks of a multiple of 32 tokens; GPUs take vLLM's default.
_CPU_BLOCK_SIZE, _GPU_BLOCK_SIZE = 32, 16
# A session's request generates at most this many tokens; then the next segment starts another.
# Long, since each new request pays vLLM's per-request costs again.
_STREAM_TOKENS = 128
# Tokens a session's request may compute past what its segments have read before it is aborted:
# enough for the next segment's first word (about 1.3 tokens) when the caller appends its
# segment and asks again at once, little compute lost when another worker's segment won instead.
_AHEAD_TOKENS = 4
# vLLM seeds torch generators, which take seeds below 2**63; the protocol's are unsigned 64-bit.
_SEED_SPACE = 2**63


def load_backend(settings: WorkerSettings) -> VLLMBackend:
    """Resolves the model folder, starts vLLM's engine process on it (15-21 s on the CPU, eager) and
    reads the tokenizer from the same folder. The engine runs the constraint logits processor
    (worker/vllm/logits.py); the worker builds the same constraint vocabulary meanwhile."""
    folder = _model_folder(settings)
    # The engine process is spawned, not forked: this process already runs gRPC's threads, which
    # a fork would copy in an unknown state. Model hubs are never contacted (docs/design.md 7.1).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    from coolfusion.worker.vllm.logits import ConstrainedLogits

    on_cpu = current_platform.is_cpu()
    engine_settings = settings.vllm
    kv_gib = engine_settings.kv_cache_gib if engine_settings.kv_cache_gib is not None else None
    if kv_gib is None and on_cpu:
        kv_gib = _CPU_KV_CACHE_GIB
    block_size = engine_settings.block_size or (_CPU_BLOCK_SIZE if on_cpu else _GPU_BLOCK_SIZE)
    if on_cpu and engine_settings.tensor_parallel_size == 1:
        bind_compute_threads_to_every_core()
    model_id = settings.preset or folder.name
    args = AsyncEngineArgs(
        model=str(folder),
        tokenizer=str(folder),
        served_model_name=[model_id],
        dtype=settings.dtype,
        seed=0,
        tensor_parallel_size=engine_settings.tensor_parallel_size,
        gpu_memory_utilization=engine_settings.gpu_memory_utilization,
        kv_cache_memory_bytes=None if kv_gib is None else int(kv_gib * _GIB),
        block_size=block_size,
        max_model_len=engine_settings.max_model_len,
        enable_prefix_caching=True,
        enforce_eager=on_cpu if engine_settings.enforce_eager is None else engine_settings.enforce_eager,
        max_num_seqs=settings.batch.max_sessions,
        max_num_batched_tokens=settings.batch.max_tokens,
        disable_log_stats=True,
        logits_processors=[ConstrainedLogits],
    )
    text = read_model_text(folder, model_id)
    # The rows of vLLM's logits (its model config's vocab_size), which the engine's masks cover.
    logits_width = int(AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config().vocab_size)
    started = time.monotonic()
    # The worker's own constraint vocabulary (seconds for a large vocabulary) builds while the
    # engine process starts; the worker reads it to spell answers and to say which kinds it enforces.
    with ThreadPoolExecutor(1, thread_name_prefix="constraint-vocabulary") as pool:
        vocabulary = pool.submit(load_vocabulary, text.tokenizer, logits_width, text.stop_ids)
        try:
            engine = AsyncLLM.from_engine_args(args)
        except (RuntimeError, ValueError) as error:  # vLLM's own refusals: a size it cannot serve
            raise StartupError(f"vLLM could not start on {folder}: {error}") from error
    tokenizer = text.tokenizer
    tp = engine_settings.tensor_parallel_size
    devices = ("cpu",) if on_cpu else tuple(f"{current_platform.device_type}:{i}" for i in range(tp))
    description = ModelDescription(
        model_id=model_id,
        tokenizer_family=type(tokenizer).__name__,
        vocab_size=len(tokenizer),
        eos_text=text.eos_text,
        bos_text=str(tokenizer.bos_token or ""),
        has_chat_template=bool(tokenizer.chat_template),
        max_context_tokens=int(engine.model_config.max_model_len),
        device=devices[0],
        dtype=str(engine.model_config.dtype).removeprefix("torch."),
        # Tensor parallelism splits every layer's weights evenly over the GPUs.
        placement=tuple(DeviceShare(device, 1 / len(devices)) for device in devices),
        engine="vllm",
        constraint_kinds=ENFORCED_KINDS if vocabulary.result() is not None else (),
    )
    logger.info(
        "vLLM engine on %s started in %.1f s: blocks of %d tokens, %s",
        ", ".join(devices),
        time.monotonic() - started,
        block_size,
        "eager" if args.enforce_eager else "compiled",
    )
    return VLLMBackend(engine, text, description, settings.batch, settings.limits.keep_kv_cache, vocabulary.result())


def read_model_text(folder: Path | str, model_id: str) -> ModelText:
    """The model folder's tokenizer and EOS ids, as the worker and the engine process both read them."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        generation_eos = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_eos = None
    return ModelText(tokenizer, generation_eos, model_id)


def bind_compute_threads_to_every_core() -> None:
    """vLLM's CPU compute threads run on every core this process may use, none kept for its
    scheduler, unless VLLM_CPU_OMP_THREADS_BIND says otherwise. vLLM's own default ("auto") keeps
    a core for the scheduler process, which a worker pod of a few cores pays dearly for: on 2 idle
    cores, binding both decoded 8 sessions at 127 and 132 tokens/s against 105 and 106 under "auto",
    in runs taken in turns (docs/engines.md). On a host whose cores other work shares, "auto" holds
    up better: set it there."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(core) for core in sorted(os.sched_getaffinity(0)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _model_folder(settings: WorkerSettings) -> Path:
    """The safetensors folder of the preset or --model. vLLM reads folders; a GGUF file must have
    been converted by the transformers engine first, which owns that conversion."""
    try:
        return model_files.resolve_model_folder(
            preset=settings.preset, model=settings.model, cache_dir=settings.cache_dir
        )
    except ImportError as error:  # the conversion's own packages are the transformers engine's
        source = settings.preset or settings.model
        raise StartupError(
            f"{source} has no converted folder yet and this environment cannot convert it ({error}); "
            f"convert it once with the transformers engine (python -c 'from coolfusion.worker.model_files "
            f'import prepare; prepare("{source}")\' where `make setup` installed it) and start again'
        ) from error


class TokenStream:
    """One request over a session's sequence, read in the background as its tokens arrive. A greedy
    one runs on past the segment that asked for it, so that when that segment wins and is appended,
    the next segment's tokens are already being computed: one request serves many chained segments
    instead of one request per segment, each paying vLLM's per-request costs (docs/engines.md).
    Under a constraint, the engine holds its tokens to `constraint` (worker/vllm/constraints.py).
    A sampled one draws with its call's seed, so it serves that call's segment alone."""

    def __init__(
        self,
        prompt_ids: list[int],
        ahead: int,
        constraint: RequestConstraint | None = None,
        sampling: Sampling | None = None,
    ):
        self.ids = list(prompt_ids)  # the prompt, then every token received so far
        self.prompt_length = len(prompt_ids)
        self.constraint = constraint
        self.sampling = sampling
        self.read_to = len(prompt_ids)  # how far into `ids` a segment has read
        self.ahead = ahead  # tokens it may run past `read_to` before it is aborted
        self.done = False
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    def continues(self, context_ids: list[int]) -> bool:
        """Whether `context_ids` is this stream's prompt plus some of its tokens, with more to come."""
        length = len(context_ids)
        if length < self.prompt_length or (self.done and length >= len(self.ids)):
            return False
        return self.ids[:length] == context_ids

    async def token_at(self, position: int) -> int | None:
        """The token at `position` of the sequence, waiting for it; None once the request ended
        before it (its token budget spent, or aborted)."""
        self.read_to = max(self.read_to, position + 1)
        while position >= len(self.ids):
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        return self.ids[position]

    def receive(self, tokens: Sequence[int], finished: bool) -> None:
        self.ids.extend(tokens)
        self.done = self.done or finished
        self._arrived.set()

    def end(self, error: BaseException | None = None) -> None:
        self.done, self.error = True, self.error or error
        self._arrived.set()

    @property
    def ran_ahead(self) -> bool:
        """Whether it computed more than `ahead` tokens nobody read: its segment lost, or its caller left."""
        return len(self.ids) - self.read_to > self.ahead

    def stop(self) -> None:
        """Aborts the request (vLLM aborts a request whose reading task is cancelled)."""
        self.end()
        if self.task is not None:
            self.task.cancel()


class VLLMSession(SessionCache):
    """A session is, to vLLM, its token sequence: every request sends the whole of it and the
    prefix cache supplies what an earlier request computed, so rolling back costs nothing. The keys
    and values live in vLLM's blocks, shared with any request of the same prefix."""

    def __init__(self) -> None:
        self.ids: list[int] = []  # the sequence the last call computed (the context, or it + kept tokens)
        self.stream: TokenStream | None = None  # the request generating after it, if still running
        self.released = False  # the session is gone: it starts no more requests

    @property
    def cached_tokens(self) -> int:
        return len(self.ids)


class VLLMBackend(ModelBackend):
    """Text work runs on the caller's thread (the event loop), as in the transformers backend; model
    work is vLLM requests, which its engine process batches across sessions."""

    def __init__(
        self,
        engine: AsyncLLM,
        text: ModelText,
        description: ModelDescription,
        limits: BatchLimits,
        keep_cache: bool,
        vocabulary: ConstraintVocabulary | None = None,
    ):
        from vllm.sampling_params import RequestOutputKind

        self._engine = engine
        self._text = text
        # The model's vocabulary as the grammar engine reads it (None: no constraints enforced):
        # answers are spelled with it before a constrained request starts (worker/vllm/constraints.py).
        self._vocabulary = vocabulary
        self._description = description
        self._limits = limits
        self._calls = 0
        # --no-cache: every request recomputes its whole prompt, the baseline the caches are
        # measured against (docs/design.md section 4.3).
        self._skip_cache = not keep_cache
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._delta = RequestOutputKind.DELTA
        # Stream parameters per token budget, built once and reused uncloned (skip_clone): vLLM
        # would otherwise deep-copy them for every request.
        self._stream_params: dict[int, SamplingParams] = {}
        self._score_params = self._params(max_tokens=1, prompt_logprobs=0, skip_clone=True)

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def queue_depth(self) -> int:
        return self._calls

    @property
    def engine_requests(self) -> int:
        return int(self._engine.get_num_unfinished_requests())

    def render(self, prompt: PromptSpec) -> RenderedPrompt:
        return self._text.render(prompt)

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._text.tokenize(text, add_special_tokens)

    def new_cache(self) -> SessionCache:
        return VLLMSession()

    def release(self, cache: SessionCache) -> None:
        session = _session(cache)
        session.released = True
        if session.stream is not None:
            session.stream.stop()
            session.stream = None

    async def sync(self, cache: SessionCache, context_ids: list[int]) -> Timed[None]:
        session = _session(cache)
        if session.ids == context_ids and session.stream is not None and session.stream.continues(context_ids):
            return Timed(None, 0.0)
        async with self._call() as started:
            # The request that prefills the context goes on to generate the first segment's tokens.
            # Unconstrained: the backend does not know the session's constraint here, so a
            # constrained session's first segment starts another request (docs/design.md 4.7).
            await self._stream_for(session, context_ids, None, None).token_at(len(context_ids))
        session.ids = list(context_ids)
        return Timed(None, _ms_since(started))

    @property
    def grammar_compiles(self) -> int:
        """Grammars compiled against the worker's vocabulary; the engine process compiles each of
        them once too, in a cache of the same size (worker/vllm/logits.py)."""
        return 0 if self._vocabulary is None else self._vocabulary.compiles

    def guide(self, constraint: Constraint) -> EngineGuide:
        if self._vocabulary is None:
            raise NotImplementedError("this model's tokenizer cannot be read by the constraint engine")
        # Compiled here too (once per distinct constraint), so that a grammar this vocabulary cannot
        # take is refused when the session opens, not met in the engine process.
        self._vocabulary.guide(constraint)
        return EngineGuide(constraint)

    async def generate(self, cache: SessionCache, context_ids: list[int], rules: SegmentRules) -> Timed[Segment]:
        session = _session(cache)
        scan = SegmentScan(
            lambda new: self._text.decode_continuation(context_ids, new),
            self._text.stop_ids,
            rules.max_tokens,
            rules.stop_strings,
        )
        wanted = _request_constraint(rules)
        async with self._call() as started:
            stream = self._stream_for(session, context_ids, wanted, rules.sampling)
            position, segment = len(context_ids), None
            while segment is None:
                token = await stream.token_at(position)
                if token is None:  # the request ended (its budget spent, or it ran ahead): another
                    if position == stream.prompt_length:
                        raise RuntimeError("vLLM ended a request without a token")
                    # Under a constraint, the new request's guide reads the segment's tokens so far.
                    restarted = None if wanted is None else replace(wanted, tokens=tuple(scan.tokens))
                    stream = self._stream_for(session, context_ids + scan.tokens, restarted, rules.sampling)
                    continue
                segment = scan.add(token)
                position += 1
        # The segment rule, not vLLM, ends a segment: a greedy request runs on after it
        # (TokenStream); a sampled one has drawn all its call may use.
        if rules.sampling is not None:
            stream.stop()
            session.stream = None
        session.ids = context_ids + scan.tokens[: scan.kept]
        return Timed(segment, _ms_since(started))

    async def score(
        self, cache: SessionCache, context_ids: list[int], rows: list[list[int]], candidates: list[CandidateText]
    ) -> Timed[list[TextScore]]:
        _session(cache)
        async with self._call() as started:
            scores = await asyncio.gather(
                *(self._score(context_ids, row, candidate) for row, candidate in zip(rows, candidates))
            )
        return Timed(list(scores), _ms_since(started))

    async def _score(self, context_ids: list[int], row: list[int], candidate: CandidateText) -> TextScore:
        """One candidate: its tokens' log-probabilities from the prompt log-probabilities of one
        request over context + candidate, the prefix read from the cache."""
        target = row + [self._text.eos_id] if candidate.ends_with_eos else row
        # Position 0 has no prediction; a merge that rewrites the very first token is scored from 1.
        start = max(common_prefix_length(context_ids, row), 1)
        if start >= len(target):
            return TextScore(0, 0.0, len(row))
        output = await self._request(target, self._score_params)
        # vLLM computes a prompt row only past the tokens its cache supplied: row k (predicting
        # token k from position k - 1) is valid from k = cached + 1 on, the rows before hold
        # whatever the buffer held. Tokens predicted from a cached position are asked for one by
        # one instead: a request over the tokens before each, asking for that token's log-prob.
        cached = output.num_cached_tokens or 0
        assert output.prompt_logprobs is not None
        valid_from = max(start, cached + 1)
        total = sum(output.prompt_logprobs[k][target[k]].logprob for k in range(valid_from, len(target)))
        repaired = await asyncio.gather(
            *(self._token_log_prob(target[:k], target[k]) for k in range(start, valid_from))
        )
        return TextScore(len(target) - start, float(total + sum(repaired)), len(row))

    async def _token_log_prob(self, prefix: list[int], token: int) -> float:
        """log p(token | prefix): the prefix's last position is always computed, never cached."""
        params = self._params(max_tokens=1, logprob_token_ids=[token])
        output = await self._request(prefix, params)
        logprobs = output.outputs[0].logprobs
        assert logprobs is not None
        return float(logprobs[0][token].logprob)

    def shutdown(self) -> None:
        self._engine.shutdown()

    def token_budget(self, headroom: float) -> int:
        """What vLLM's KV cache holds: it sized the cache itself (--kv-cache-gib, or
        --gpu-memory-utilization), so the headroom is vLLM's, not applied again. Sessions beyond it
        would only push each other's blocks out of the prefix cache."""
        cache = self._engine.vllm_config.cache_config
        blocks, block_size = int(cache.num_gpu_blocks or 0), int(cache.block_size)
        logger.info("session token budget from vLLM's KV cache: %s blocks of %d tokens", f"{blocks:,}", block_size)
        return blocks * block_size

    # ---- requests --------------------------------------------------------------------------

    def _params(self, **fields: object) -> SamplingParams:
        from vllm import SamplingParams

        fields = {"output_kind": self._final_only, "temperature": 0.0, **fields}
        return SamplingParams(
            detokenize=False,  # texts are decoded here, with the worker's own tokenizer rules
            skip_reading_prefix_cache=self._skip_cache,
            **fields,
        )

    def _stream_for(
        self,
        session: VLLMSession,
        context_ids: list[int],
        constraint: RequestConstraint | None,
        sampling: Sampling | None,
    ) -> TokenStream:
        """The session's running greedy request if it generates after `context_ids` (the last
        segment was appended) under the same constraint at the same answer, else a new one over
        them, the old one aborted. A sampled segment always starts its own, seeded for its call."""
        running = session.stream
        if running is not None and running.sampling is None and sampling is None and running.continues(context_ids):
            generated = context_ids[running.prompt_length :]
            if serves(running.constraint, generated, constraint, self._vocabulary):
                return running
        if session.released:
            raise SessionNotFound("the session was closed while its call ran")
        if constraint is not None:  # InvalidRequest, before any request starts, if it cannot spell the answer
            assert self._vocabulary is not None  # guide() gave no EngineGuide without it
            self._vocabulary.spell(constraint.answer_text)
        if running is not None:
            running.stop()
        stream = TokenStream(context_ids, _AHEAD_TOKENS, constraint, sampling)
        budget = max(1, min(_STREAM_TOKENS, self._description.max_context_tokens - len(context_ids)))
        params = self._stream_params_for(budget, constraint, sampling)
        stream.task = asyncio.create_task(self._read(stream, params))
        session.stream = stream
        return stream

    async def _read(self, stream: TokenStream, params: SamplingParams) -> None:
        """Feeds `stream` the tokens of its request as vLLM computes them, until the request
        finishes or runs ahead of its readers; closing vLLM's generator aborts the request."""
        from vllm.inputs import TokensPrompt

        outputs = self._engine.generate(
            TokensPrompt(prompt_token_ids=stream.ids[: stream.prompt_length]), params, uuid.uuid4().hex
        )
        try:
            async with aclosing(outputs):
                async for output in outputs:
                    stream.receive(output.outputs[0].token_ids, output.finished)
                    if stream.ran_ahead:
                        break
        except Exception as error:  # noqa: BLE001 - handed to the segment waiting on it, which raises it
            stream.end(error)
        finally:
            stream.end()

    def _stream_params_for(
        self, budget: int, constraint: RequestConstraint | None, sampling: Sampling | None
    ) -> SamplingParams:
        if constraint is not None or sampling is not None:  # its own parameters: its answer, its seed
            drawn = {} if sampling is None else _drawn(sampling)
            extra_args = None if constraint is None else constraint.extra_args()
            return self._params(
                max_tokens=budget, output_kind=self._delta, skip_clone=True, extra_args=extra_args, **drawn
            )
        params = self._stream_params.get(budget)
        if params is None:
            # Every token as it is computed (DELTA), no stop ids: the segment rule reads them here.
            params = self._params(max_tokens=budget, output_kind=self._delta, skip_clone=True)
            self._stream_params[budget] = params
        return params

    async def _request(self, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        """One request to the engine. A caller that goes away (a cancelled RPC) aborts it: vLLM's
        generator aborts its request when the task awaiting it is cancelled."""
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self._engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
            final = output
        if final is None:
            raise RuntimeError("vLLM finished a request without an output")
        return final

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[float]:
        """Around a model call: the bound on calls waiting or running (docs/design.md section 4.3);
        yields the start time. vLLM does not say when a request's first pass ran, so compute_ms
        counts the call's whole time, its wait in vLLM's queue included."""
        if self._calls >= self._limits.max_queued:
            raise OverCapacity(
                f"{self._calls} model calls are waiting or running; the limit is {self._limits.max_queued}"
            )
        self._calls += 1
        try:
            yield time.perf_counter()
        finally:
            self._calls -= 1


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _drawn(sampling: Sampling) -> dict[str, object]:
    """A sampled request's SamplingParams fields: vLLM applies the temperature, then top_k and
    top_p (0 and 1 for all, as the protocol says), and draws from a generator of the request alone
    seeded with the call's seed (docs/design.md section 10.1)."""
    return {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": sampling.seed % _SEED_SPACE,
    }


def _request_constraint(rules: SegmentRules) -> RequestConstraint | None:
    """What the segment's request must hold its tokens to: the session's constraint, after the
    committed answer."""
    if rules.constraint is None:
        return None
    guide = rules.constraint.guide
    if not isinstance(guide, EngineGuide):
        raise TypeError(f"a {type(guide).__name__} is not this engine's guide")
    return RequestConstraint(guide.constraint, rules.constraint.answer_text)


def _session(cache: SessionCache) -> VLLMSession:
    if not isinstance(cache, VLLMSession):
        raise TypeError(f"a {type(cache).__name__} is not this backend's session cache")
    return cache
