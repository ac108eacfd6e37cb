"""Worker micro-benchmarks, measured side by side in one run (docs/performance.md).

1. ScoreText of 3 candidates x ~16 tokens after a ~500-token cached context, against scoring the
   same candidates by recomputing the whole context (one batched forward, no cache).
2. Per-token latency of chained GenerateSegment calls (each appends the previous segment, as a
   fusion step does), against plain transformers `generate` with its own KV cache.
3. The cost of re-tokenizing a whole ~2k-token context, which every append pays.
4. Chunked prefill beside decoding: 4 sessions decode while a ~1,500-token prompt arrives; the
   longest pause between two of their tokens, and the new session's time to its first segment,
   with the prompt prefilled in one pass (--max-batch-tokens 4096) against chunks of 256.
5. Linear layers per number of rows a pass computes (one per decoding session, a few per
   candidate): the output layer alone and all the others together, as transformers runs them
   (nn.Linear) against the backend's weights prepacked for the CPU (worker/hf/cpu_linear.py).

The backend and the baselines use two copies of the model: the backend's attends through its
ragged batches, the baselines' through transformers' own attention.

Usage: python scripts/bench_worker.py [--presets smollm2-135m-instruct,gemma3-270m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from coolfusion.worker import model_files
from coolfusion.worker.backend import CandidateText, PromptSpec
from coolfusion.worker.hf import loading
from coolfusion.worker.hf.backend import TransformersBackend
from coolfusion.worker.hf.cpu_linear import PackedLinear
from coolfusion.worker.hf.model import HFModel
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import BatchLimits, SessionLimits

GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
CANDIDATES = [
    " The answer is 18 dollars because she sells the remaining eggs at the market",
    " First we subtract the eggs she eats and bakes, then multiply by two dollars",
    " She has 16 - 3 - 4 = 9 eggs left, which she sells for 9 * 2 = 18",
]


def long_context(lm: HFModel, tokens: int) -> str:
    """GSM8K questions and worked answers, concatenated until the context has ~`tokens` tokens."""
    text = ""
    with GSM8K.open() as lines:
        for line in lines:
            item = json.loads(line)
            text += f"Question: {item['question']}\nAnswer: {item['answer']}\n\n"
            if len(lm.tokenize(text, True)) >= tokens:
                return text
    return text


async def timed(fn: Callable[[], Awaitable[object] | object], repeats: int) -> float:
    """Median wall time of `fn()` (awaited when it returns an awaitable) in ms, after one warm-up call."""

    async def once() -> float:
        started = time.perf_counter()
        result = fn()
        if isinstance(result, Awaitable):
            await result
        return (time.perf_counter() - started) * 1000

    await once()
    return statistics.median([await once() for _ in range(repeats)])


async def bench_scoring(backend: TransformersBackend, lm: HFModel, plain: PreTrainedModel, repeats: int) -> dict:
    store = SessionStore(backend, SessionLimits())
    context = long_context(lm, 500)
    opened = await store.open("bench", PromptSpec(text=context), "")
    candidates = [CandidateText(c) for c in CANDIDATES]
    cached_ms = await timed(lambda: store.score("bench", Expectation(opened.context_tokens), candidates), repeats)

    rows = [lm.tokenize(context + c.text, True) for c in candidates]
    longest = max(len(r) for r in rows)
    batch = torch.tensor([r + [lm.eos_id] * (longest - len(r)) for r in rows])  # (3, context + candidate)
    keep = longest - opened.context_tokens + 1  # only the candidates' positions are projected

    def recompute() -> None:
        with torch.inference_mode():
            plain(input_ids=batch, logits_to_keep=keep)

    uncached_ms = await timed(recompute, repeats)
    # Appends re-tokenize the whole context (exact ids, no tail heuristics); this is what it costs.
    long_text = long_context(lm, 2000)
    retokenize_ms = await timed(lambda: lm.tokenize(long_text, True), repeats)
    return {
        "retokenize_2k_context_ms": round(retokenize_ms, 2),
        "context_tokens": opened.context_tokens,
        "candidate_tokens": [len(r) - opened.context_tokens for r in rows],
        "score_cached_ms": round(cached_ms, 1),
        "score_recompute_ms": round(uncached_ms, 1),
        "recompute_over_cached": round(uncached_ms / cached_ms, 2),
    }


async def bench_generation(
    backend: TransformersBackend, lm: HFModel, plain: PreTrainedModel, answer_tokens: int
) -> dict:
    prompt = PromptSpec(text=long_context(lm, 120))
    store = SessionStore(backend, SessionLimits())
    opened = await store.open("gen", prompt, "")
    context_tokens, append, spent = opened.context_tokens, "", 0.0
    while context_tokens - opened.prompt_tokens < answer_tokens:
        started = time.perf_counter()
        generated = await store.generate("gen", Expectation(context_tokens), append, 16, ())
        spent += time.perf_counter() - started
        append, context_tokens = generated.segment.text, generated.context_tokens
    produced = context_tokens - opened.prompt_tokens
    segment_ms_per_token = spent * 1000 / produced

    ids = torch.tensor([lm.tokenize(str(prompt.text), True)])

    def generate(n: int) -> float:
        started = time.perf_counter()
        plain.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.eos_id)
        return time.perf_counter() - started

    generate(2)  # warm-up
    hf_ms_per_token = (generate(produced + 1) - generate(1)) * 1000 / produced  # prefill excluded
    return {
        "answer_tokens": produced,
        "segment_ms_per_token": round(segment_ms_per_token, 1),
        "transformers_generate_ms_per_token": round(hf_ms_per_token, 1),
        "segment_over_generate": round(segment_ms_per_token / hf_ms_per_token, 3),
    }


async def bench_linear_layers(lm: HFModel, plain: PreTrainedModel, repeats: int) -> dict:
    """Per number of rows, the output layer alone and all the other linear layers together, as
    transformers runs them (nn.Linear) and as the backend does (cpu_linear.PackedLinear)."""
    head = lm.model.get_output_embeddings()
    plain_head = plain.get_output_embeddings()
    layers = [m for m in lm.model.modules() if isinstance(m, PackedLinear) and m is not head]
    plain_layers = [m for m in plain.modules() if type(m) is torch.nn.Linear and m is not plain_head]
    results = {}
    for rows in (1, 2, 4, 8, 16, 32, 64):
        # (batch, rows, in_features) per input width
        inputs = {int(m.in_features): torch.randn(1, rows, int(m.in_features)) for m in [head, *layers]}
        timings = {
            "output_linear_ms": await timed(functools.partial(_project, [plain_head], inputs), repeats),
            "output_packed_ms": await timed(functools.partial(_project, [head], inputs), repeats),
            "layers_linear_ms": await timed(functools.partial(_project, plain_layers, inputs), repeats),
            "layers_packed_ms": await timed(functools.partial(_project, layers, inputs), repeats),
        }
        results[f"rows_{rows}"] = {
            **{name: round(ms, 1) for name, ms in timings.items()},
            "output_linear_over_packed": round(timings["output_linear_ms"] / timings["output_packed_ms"], 2),
            "layers_linear_over_packed": round(timings["layers_linear_ms"] / timings["layers_packed_ms"], 2),
        }
    return {"linear_layers": results}


@torch.inference_mode()
def _project(modules: list[torch.nn.Module], inputs: dict[int, torch.Tensor]) -> None:
    for module in modules:
        module(inputs[int(module.in_features)])  # type: ignore[arg-type]  # nn.Linear and PackedLinear have it


async def bench_prefill_beside_decode(lm: HFModel) -> dict:
    """The longest gap between two passes while running sessions decode and a long prompt is
    prefilled beside them, and that prompt's time to its first segment, per --max-batch-tokens."""
    long_prompt = PromptSpec(text=long_context(lm, 1500))
    runs = {f"tokens_{n}": await _prefill_run(lm, long_prompt, n) for n in (4096, 256)}
    return {"prefill_beside_decode": runs}


async def _prefill_run(lm: HFModel, long_prompt: PromptSpec, max_tokens: int, decoders: int = 4) -> dict:
    backend = TransformersBackend(lm, "float32", BatchLimits(max_tokens=max_tokens))
    pass_ends: list[float] = []
    backend.observe_passes(lambda stats: pass_ends.append(time.perf_counter()))
    store = SessionStore(backend, SessionLimits())
    try:
        opened = [await store.open(f"d{i}", PromptSpec(text=CANDIDATES[i % 3]), "") for i in range(decoders)]
        running = [asyncio.create_task(_decode_for(store, o, 48)) for o in opened]
        await asyncio.sleep(0.5)  # the decoders are under way
        started = time.perf_counter()
        late = await store.open("long", long_prompt, "")
        await store.generate("long", Expectation(late.context_tokens), "", 16, ())
        first_segment_s = time.perf_counter() - started
        await asyncio.gather(*running)
    finally:
        backend.shutdown()
    gaps = [b - a for a, b in itertools.pairwise(pass_ends)]
    return {
        "longest_pass_gap_ms": round(max(gaps) * 1000, 1),
        "median_pass_gap_ms": round(statistics.median(gaps) * 1000, 1),
        "long_prompt_first_segment_s": round(first_segment_s, 2),
    }


async def _decode_for(store: SessionStore, opened, tokens: int) -> None:
    context, append, produced = opened.context_tokens, "", 0
    while produced < tokens:
        generated = await store.generate(opened.session_id, Expectation(context), append, 16, ())
        produced += generated.segment.generated_tokens
        context, append = generated.context_tokens, generated.segment.text
        if not append:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets.split(","):
        print(json.dumps(asyncio.run(bench_preset(preset, args.repeats, args.answer_tokens))))


async def bench_preset(preset: str, repeats: int, answer_tokens: int) -> dict:
    folder = model_files.resolve_model_folder(preset=preset)
    lm = HFModel(*loading.load_model(folder), preset)
    plain, _ = loading.load_model(folder)
    backend = TransformersBackend(lm, "float32", BatchLimits())
    try:
        scoring = await bench_scoring(backend, lm, plain, repeats)
        generation = await bench_generation(backend, lm, plain, answer_tokens)
    finally:
        backend.shutdown()
    prefill = await bench_prefill_beside_decode(lm)
    return {"model": preset, **scoring, **generation, **prefill, **await bench_linear_layers(lm, plain, repeats)}


if __name__ == "__main__":
    main()
