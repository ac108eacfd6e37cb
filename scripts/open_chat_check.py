"""Open chat through `coolfusion up`: 20 open prompts written for this check, 48 tokens each, asked
of the fusion model under the deployment's default (`coolfusion up` loads the calibrations that
ship for its workers and makes the pooled fit its default) and under `nll_mean`; counts the answers
the repetition guard cut and their lengths (docs/results.md, "Open chat under a scoped default").

    .venv/bin/python scripts/open_chat_check.py --presets smollm2-135m-instruct,gemma3-270m \\
        --out eval-results/open-chat-pair --with-pooled-fit
    .venv/bin/python scripts/open_chat_check.py --presets smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct \\
        --out eval-results/open-chat-trio --with-pooled-fit

It starts `coolfusion up --presets ...` itself and stops it; the answers are asked one at a time, so
no batching changes a score. Exit code 0 when the default's answers are cut no more often and are
no shorter in total than nll_mean's, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from coolfusion.cli.common import PRESET_NAMES

PROMPTS = (
    "Write a short paragraph about why rivers bend.",
    "Explain in a few sentences how a bicycle stays upright.",
    "Describe your ideal weekend morning.",
    "What makes a good neighbour?",
    "Tell me a short story about a lighthouse keeper.",
    "Why do people enjoy listening to music?",
    "Give some advice to someone starting to learn to cook.",
    "Describe the smell of rain to someone who has never smelled it.",
    "What would you pack for a week in the mountains?",
    "Explain why the sky looks blue during the day.",
    "Write a few sentences welcoming new members to a chess club.",
    "How should a small team decide what to work on first?",
    "Describe a busy market at dawn.",
    "What are the pleasures and the pains of keeping a garden?",
    "Explain to a child why we need to sleep.",
    "Write a short note thanking a friend for their help with moving house.",
    "Why is it hard to predict the weather a month ahead?",
    "Describe an old bridge over a quiet river.",
    "What is a good way to remember new words in a foreign language?",
    "Tell me about a day in the life of a city bus driver.",
)
MAX_TOKENS = 48
STRATEGIES = {"default": {}, "nll_mean": {"aggregation": "nll_mean"}}
_API = re.compile(r"OpenAI-compatible API: (http://\S+/v1)")


def start_up(presets: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`coolfusion up` with the gateway; returns the process and the API's base URL once ready."""
    argv = [sys.executable, "-m", "coolfusion.cli.main", "up", "--presets", presets, "--log", str(log)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        print(f"up: {line.rstrip()}", flush=True)
        if found := _API.search(line):
            return process, found.group(1)
    raise SystemExit(f"coolfusion up exited with code {process.wait()}")


def ask(http: httpx.Client, prompt: str, extra: dict[str, str]) -> dict[str, object]:
    body = {"model": "coolfusion", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, **extra}
    started = time.monotonic()
    answer = http.post("/chat/completions", json=body)
    answer.raise_for_status()
    reply = answer.json()
    details = reply["coolfusion"]
    return {
        "prompt": prompt, "text": reply["choices"][0]["message"]["content"], "finish": details["finish_reason"],
        "calibration": details["calibration"], "rule_choice": details["rule_choice"],
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def summary(answers: dict[str, list[dict[str, object]]]) -> dict[str, dict[str, int]]:
    return {
        label: {
            "answers": len(rows),
            "cut_by_repetition_guard": sum(row["finish"] == "repetition" for row in rows),
            "characters": sum(len(str(row["text"])) for row in rows),
            "ran_a_calibration": sum(bool(row["calibration"]) for row in rows),
        }
        for label, rows in answers.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--with-pooled-fit", action="store_true",
        help="also ask under the pooled fit by name, as the default ran before calibrations had scopes",
    )  # fmt: skip
    args = parser.parse_args()
    strategies = dict(STRATEGIES)
    if args.with_pooled_fit:
        pooled = "pooled-" + "-".join(PRESET_NAMES[p] for p in args.presets.split(","))
        strategies["pooled fit"] = {"calibration": pooled}
    args.out.mkdir(parents=True, exist_ok=True)
    process, base_url = start_up(args.presets, args.out / "servers.log")
    try:
        answers: dict[str, list[dict[str, object]]] = {label: [] for label in strategies}
        with httpx.Client(base_url=base_url, timeout=900, trust_env=False) as http:
            for n, prompt in enumerate(PROMPTS):
                for label, extra in strategies.items():
                    answers[label].append(ask(http, prompt, extra))
                    row = answers[label][-1]
                    print(f"{n + 1}/{len(PROMPTS)} {label}: {row['finish']}, {len(str(row['text']))} chars", flush=True)
    finally:
        process.terminate()
        process.wait(60)
    totals = summary(answers)
    (args.out / "answers.json").write_text(
        json.dumps({"presets": args.presets, "answers": answers, "summary": totals}, indent=2) + "\n"
    )
    print(json.dumps(totals, indent=2))
    default, plain = totals["default"], totals["nll_mean"]
    held = (
        default["cut_by_repetition_guard"] <= plain["cut_by_repetition_guard"]
        and default["characters"] >= plain["characters"]
    )
    print("goal met" if held else "goal missed: the default cuts more answers or answers shorter than nll_mean")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
