"""Worker micro-benchmarks, measured side by side in one run (README "Performance").

1. ScoreText of 3 candidates x ~16 tokens after a ~500-token cached context, against scoring the
   same candidates by recomputing the whole context (one batched forward, no cache).
2. Per-token latency of chained GenerateSegment calls (each appends the previous segment, as a
   fusion step does), against plain transformers `generate` with its own KV cache.
3. The cost of re-tokenizing a whole ~2k-token context, which every append pays.

Usage: python scripts/bench_worker.py [--presets smollm2-135m-instruct,gemma3-270m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from coolfusion.worker import loading
from coolfusion.worker.model import CandidateText, LanguageModel, PromptSpec
from coolfusion.worker.sessions import Expectation, SessionStore
from coolfusion.worker.settings import SessionLimits

GSM8K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
CANDIDATES = [
    " The answer is 18 dollars because she sells the remaining eggs at the market",
    " First we subtract the eggs she eats and bakes, then multiply by two dollars",
    " She has 16 - 3 - 4 = 9 eggs left, which she sells for 9 * 2 = 18",
]


def long_context(lm: LanguageModel, tokens: int) -> str:
    """GSM8K questions and worked answers, concatenated until the context has ~`tokens` tokens."""
    text = ""
    with GSM8K.open() as lines:
        for line in lines:
            item = json.loads(line)
            text += f"Question: {item['question']}\nAnswer: {item['answer']}\n\n"
            if len(lm.tokenize(text, True)) >= tokens:
                return text
    return text


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` in ms, after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def bench_scoring(lm: LanguageModel, repeats: int) -> dict:
    store = SessionStore(lm, SessionLimits())
    context = long_context(lm, 500)
    opened = store.open("bench", PromptSpec(text=context), "")
    candidates = [CandidateText(c) for c in CANDIDATES]
    cached_ms = timed(lambda: store.score("bench", Expectation(opened.context_tokens), candidates), repeats)

    rows = lm.candidate_rows(context, True, candidates)
    longest = max(len(r) for r in rows)
    batch = torch.tensor([r + [lm.eos_id] * (longest - len(r)) for r in rows])  # (3, context + candidate)
    keep = longest - opened.context_tokens + 1  # only the candidates' positions are projected

    def recompute() -> None:
        with torch.inference_mode():
            lm.model(input_ids=batch, logits_to_keep=keep)

    uncached_ms = timed(recompute, repeats)
    # Appends re-tokenize the whole context (exact ids, no tail heuristics); this is what it costs.
    long_text = long_context(lm, 2000)
    retokenize_ms = timed(lambda: lm.tokenize(long_text, True), repeats)
    return {
        "retokenize_2k_context_ms": round(retokenize_ms, 2),
        "context_tokens": opened.context_tokens,
        "candidate_tokens": [len(r) - opened.context_tokens for r in rows],
        "score_cached_ms": round(cached_ms, 1),
        "score_recompute_ms": round(uncached_ms, 1),
        "recompute_over_cached": round(uncached_ms / cached_ms, 2),
    }


def bench_generation(lm: LanguageModel, answer_tokens: int) -> dict:
    prompt = PromptSpec(text=long_context(lm, 120))
    store = SessionStore(lm, SessionLimits())
    opened = store.open("gen", prompt, "")
    context_tokens, append, spent = opened.context_tokens, "", 0.0
    while context_tokens - opened.prompt_tokens < answer_tokens:
        started = time.perf_counter()
        segment, context_tokens = store.generate("gen", Expectation(context_tokens), append, 16, ())
        spent += time.perf_counter() - started
        append = segment.text
    produced = context_tokens - opened.prompt_tokens
    segment_ms_per_token = spent * 1000 / produced

    ids = torch.tensor([lm.tokenize(prompt.text, True)])

    def generate(n: int) -> float:
        started = time.perf_counter()
        lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.eos_id)
        return time.perf_counter() - started

    generate(2)  # warm-up
    hf_ms_per_token = (generate(produced + 1) - generate(1)) * 1000 / produced  # prefill excluded
    return {
        "answer_tokens": produced,
        "segment_ms_per_token": round(segment_ms_per_token, 1),
        "transformers_generate_ms_per_token": round(hf_ms_per_token, 1),
        "segment_over_generate": round(segment_ms_per_token / hf_ms_per_token, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smollm2-135m-instruct,gemma3-270m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=48)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for preset in args.presets.split(","):
        model, tokenizer = loading.load_model(loading.resolve_model_folder(preset=preset))
        lm = LanguageModel(model, tokenizer, preset)
        result = {"model": preset, **bench_scoring(lm, args.repeats), **bench_generation(lm, args.answer_tokens)}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
