"""Sampled fusions over real worker processes (docs/design.md chapter 10): reproducible from their
seed whatever runs beside them and after every process restarts, varied across seeds, greedy at
temperature 0, and n answers per request, over gRPC and the OpenAI API."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from coolfusion.cli.cluster import gateway_argv, launch, stop_processes, wait_ready
from coolfusion.client import FuseOptions, FusionClient, InvalidArgumentError

from load_driver import tiny_cluster
from worker_probes import open_sessions

PROMPT = "Tom has 3 apples and buys 4 more."
OTHER = "Please write a short poem about the sea."
SAMPLED = FuseOptions(max_new_tokens=24, temperature=0.8, top_p=0.95, top_k=50, seed=11)


@pytest.fixture(scope="module")
def fusion(tiny_trio):
    with FusionClient(tiny_trio.address, timeout_s=300) as running:
        yield running


def test_the_same_seed_gives_the_same_answer_while_other_requests_share_the_workers(fusion, tiny_trio):
    """Repeats, each beside 8 other sampled requests (other prompts, other seeds), batched with them
    into the workers' passes: the same text every time (scripts/sampling_repeats.py runs 20 on the
    real models)."""
    first = fusion.fuse(PROMPT, SAMPLED)
    assert first.seed == 11

    def crowd(i: int) -> str:
        return fusion.fuse(OTHER, FuseOptions(max_new_tokens=24, temperature=1.0, seed=1000 + i)).text

    with ThreadPoolExecutor(9) as pool:
        for repeat in range(6):
            others = [pool.submit(crowd, 8 * repeat + i) for i in range(8)]
            assert fusion.fuse(PROMPT, SAMPLED).text == first.text
            [other.result() for other in others]
    assert open_sessions(tiny_trio.workers.values()) == [0, 0, 0]


def test_the_same_seed_gives_the_same_answer_after_every_process_restarts(fusion, tiny_model_dirs, tmp_path):
    expected = fusion.fuse(PROMPT, SAMPLED).text
    with (
        tiny_cluster(tiny_model_dirs, 3, tmp_path / "restarted.log") as restarted,
        FusionClient(restarted.address, timeout_s=300) as client,
    ):
        assert client.fuse(PROMPT, SAMPLED).text == expected


def test_temperature_zero_is_the_greedy_answer_byte_for_byte(fusion):
    greedy = fusion.fuse(PROMPT, FuseOptions(max_new_tokens=24))
    zero = fusion.fuse(PROMPT, FuseOptions(max_new_tokens=24, temperature=0.0, top_p=0.5, seed=3))
    assert zero.text == greedy.text and zero.seed == 0


def test_six_seeds_at_temperature_0_8_give_several_answers(fusion):
    answers = {fusion.fuse(OTHER, FuseOptions(max_new_tokens=24, temperature=0.8, seed=s)).text for s in range(6)}
    assert len(answers) >= 2


def test_a_drawn_seed_is_reported_and_replays_the_answer(fusion):
    drawn = fusion.fuse(PROMPT, FuseOptions(max_new_tokens=24, temperature=0.8))
    replayed = fusion.fuse(PROMPT, FuseOptions(max_new_tokens=24, temperature=0.8, seed=drawn.seed))
    assert drawn.seed > 0 and replayed.text == drawn.text


def test_n_answers_share_the_seed_and_the_first_is_the_single_answer(fusion, tiny_trio):
    choices = fusion.fuse_choices(PROMPT, FuseOptions(max_new_tokens=24, temperature=0.8, seed=11, n=4))
    assert [c.choice for c in choices] == [0, 1, 2, 3] and {c.seed for c in choices} == {11}
    assert choices[0].text == fusion.fuse(PROMPT, FuseOptions(max_new_tokens=24, temperature=0.8, seed=11)).text
    assert len({c.text for c in choices}) >= 2
    greedy = fusion.fuse_choices(PROMPT, FuseOptions(max_new_tokens=16, n=2))
    assert greedy[0].text == greedy[1].text  # greedy answers do not vary
    assert open_sessions(tiny_trio.workers.values()) == [0, 0, 0]


def test_a_stream_of_n_answers_tags_every_step_and_ends_each_answer(fusion):
    events = list(fusion.fuse_stream(PROMPT, FuseOptions(max_new_tokens=16, temperature=0.8, seed=5, n=2)))
    summaries = {e.summary.choice: e.summary for e in events if e.HasField("summary")}
    assert set(summaries) == {0, 1} and events[-1].HasField("summary")
    for choice, summary in summaries.items():
        steps = [e.step for e in events if e.HasField("step") and e.step.choice == choice]
        assert "".join(s.candidates[s.winner_index].text for s in steps).startswith(summary.text)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (FuseOptions(temperature=2.5), "sampling.temperature"),
        (FuseOptions(temperature=1.0, top_p=1.5), "sampling.top_p"),
        (FuseOptions(n=9), "n is 9"),
    ],
)
def test_bad_sampling_is_invalid_argument(fusion, options, words):
    with pytest.raises(InvalidArgumentError, match=words):
        fusion.fuse(PROMPT, options)


@pytest.fixture(scope="module")
def sdk(tiny_trio):
    process = wait_ready(launch("gateway", gateway_argv(tiny_trio.address)), 60)
    http = openai.DefaultHttpxClient(trust_env=False)
    try:
        with openai.OpenAI(
            base_url=f"http://{process.address}/v1", api_key="x", max_retries=0, http_client=http
        ) as client:
            yield client
    finally:
        stop_processes([process])


def test_the_openai_api_samples_with_a_seed_and_returns_n_choices(sdk, fusion):
    sampled = {"temperature": 0.8, "top_p": 0.95, "seed": 11, "extra_body": {"top_k": 50}}
    one = sdk.completions.create(model="coolfusion", prompt=PROMPT, max_tokens=24, **sampled)
    assert one.choices[0].text == fusion.fuse(PROMPT, SAMPLED).text
    several = sdk.chat.completions.create(
        model="coolfusion", messages=[{"role": "user", "content": OTHER}], max_tokens=16, n=3, temperature=0.8, seed=4
    )
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.usage.completion_tokens >= 3


def test_a_stream_of_n_choices_equals_the_whole_answers(sdk):
    request = {
        "model": "coolfusion", "messages": [{"role": "user", "content": OTHER}], "max_tokens": 16, "n": 2,
        "temperature": 0.8, "seed": 4,
    }  # fmt: skip
    whole = sdk.chat.completions.create(**request)
    texts = {0: "", 1: ""}
    for chunk in sdk.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in whole.choices}


@pytest.mark.parametrize(
    ("params", "field"),
    [({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 9}, "n"), ({"seed": "x"}, "seed")],
)
def test_bad_sampling_fields_are_400_naming_them(sdk, params, field):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model="coolfusion", prompt=PROMPT, max_tokens=4, **params)
    assert refused.value.param == field
