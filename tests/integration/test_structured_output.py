"""Constrained fusions over real worker processes (docs/design.md chapter 9): they equal the cache-free
reference, every answer not cut by the token cap is valid against its schema for every subset of
workers, and workers that do not enforce a constraint are left out, never asked for free text."""

from __future__ import annotations

import itertools
import json
import shutil

import jsonschema
import pytest

from coolfusion.cli.cluster import LocalCluster
from coolfusion.client import FuseOptions, FusionClient, InvalidArgumentError, json_schema, regex

from reference import PAPER_STRATEGY, reference_fuse, regex_grammar, schema_grammar
from worker_probes import open_sessions, tiny_references

FAMILIES = ("bpe", "metaspace", "char")
PROMPT = "Tom has 3 apples and buys 4 more."
SUBSETS = [list(s) for n in (1, 2, 3) for s in itertools.combinations(FAMILIES, n)]


def text(maximum: int = 8, **extra) -> dict:
    return {"type": "string", "maxLength": maximum, **extra}


def closed(properties: dict, required: list[str] | None = None) -> dict:
    """An object of exactly these properties (all required unless said otherwise)."""
    listed = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": listed, "additionalProperties": False}


# Ten shapes a service asks for; strings, numbers and arrays are bounded, since a random tiny model
# would otherwise go on writing one value until the token cap.
SCHEMAS = {
    "flat": closed({"name": text(), "age": {"type": "integer", "minimum": 0, "maximum": 99}}),
    "nested": closed({"address": closed({"city": text(), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    "enum-array": closed(
        {"tags": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3}}
    ),
    "numbers": closed(
        {"price": {"type": "number", "minimum": 0, "maximum": 100}, "qty": {"type": "integer", "maximum": 9}}
    ),
    "optional": closed({"title": text(), "subtitle": text()}, required=["title"]),
    "pattern": closed({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    "nullable": closed({"active": {"type": "boolean"}, "note": {"anyOf": [text(6), {"type": "null"}]}}),
    "objects": closed(
        {
            "items": {
                "type": "array",
                "items": closed({"id": {"type": "integer", "maximum": 99}, "ok": {"type": "boolean"}}),
                "maxItems": 2,
            }
        }
    ),
    "top-enum": {"enum": ["yes", "no", "maybe"]},
    "refs": {
        "$defs": {"point": closed({"x": {"type": "integer", "maximum": 9}, "y": {"type": "integer", "maximum": 9}})},
        **closed({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
}


@pytest.fixture(scope="module")
def fusion(tiny_trio):
    with FusionClient(tiny_trio.address, timeout_s=300) as running:
        yield running


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    return tiny_references(tiny_model_dirs, FAMILIES)


@pytest.mark.parametrize(
    ("constraint", "grammar"),
    [
        (json_schema(SCHEMAS["flat"]), schema_grammar(SCHEMAS["flat"])),
        (regex(r"(yes|no), because [a-z ]{1,20}\."), regex_grammar(r"(yes|no), because [a-z ]{1,20}\.")),
    ],
    ids=["schema", "regex"],
)
def test_a_constrained_fusion_equals_the_cache_free_reference(fusion, references, constraint, grammar):
    options = FuseOptions(max_new_tokens=64, strategy=PAPER_STRATEGY, constraint=constraint)
    result = fusion.fuse(PROMPT, options)
    expected, finish = reference_fuse([references[f] for f in FAMILIES], PROMPT, 64, grammar=grammar)
    assert (result.text, finish) == (expected, "eos")
    assert not result.dropped


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_answer_not_cut_by_the_cap_is_valid_for_every_subset_of_workers(fusion, tiny_trio, name):
    schema = SCHEMAS[name]
    finished = 0
    for workers in SUBSETS:
        result = fusion.fuse(PROMPT, FuseOptions(workers=workers, max_new_tokens=96, constraint=json_schema(schema)))
        assert not result.dropped, result.dropped
        if result.finish_reason != 3:  # FINISH_REASON_LENGTH
            jsonschema.validate(json.loads(result.text), schema)
            finished += 1
    assert finished >= len(SUBSETS) - 1, f"{len(SUBSETS) - finished} of {len(SUBSETS)} answers were cut"
    assert open_sessions(tiny_trio.workers.values()) == [0, 0, 0]


def test_a_tool_call_is_read_from_the_fused_answer(fusion):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": closed({"city": text()}),
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    result = fusion.fuse(ask, FuseOptions(max_new_tokens=64, tools=(weather,), tool_choice="required"))
    [call] = result.tool_calls
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
    assert json.loads(result.text) == [{"name": "get_weather", "arguments": json.loads(call.arguments)}]


def test_a_worker_that_does_not_enforce_the_constraint_is_left_out(tiny_model_dirs, tmp_path):
    """A real worker whose tokenizer the grammar engine cannot read serves free text only: a
    constrained request leaves it out and says so, and fails when no worker is left."""
    folder = shutil.copytree(tiny_model_dirs["char"], tmp_path / "char")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["decoder"] = {"type": "Fuse"}  # decodes alike; llguidance reads no bare Fuse decoder
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    spec = {"bpe": ["--model", str(tiny_model_dirs["bpe"])], "plain": ["--model", str(folder)]}
    with LocalCluster(spec, log_path=tmp_path / "cluster.log", ready_timeout_s=120) as cluster:
        with FusionClient(cluster.address, timeout_s=120) as client:
            options = FuseOptions(max_new_tokens=48, constraint=json_schema(SCHEMAS["flat"]))
            result = client.fuse(PROMPT, options)
            assert [(d.worker, d.step) for d in result.dropped] == [("plain", 0)]
            assert "does not enforce json_schema constraints" in result.dropped[0].reason
            assert [s.worker for s in result.shares] == ["bpe"] and json.loads(result.text)
            with pytest.raises(InvalidArgumentError, match="no worker of this request enforces"):
                client.fuse(PROMPT, FuseOptions(workers=("plain",), max_new_tokens=8, constraint=options.constraint))
            assert client.fuse(PROMPT, FuseOptions(workers=("plain",), max_new_tokens=8)).text  # free text still served
        assert open_sessions(cluster.workers.values()) == [0, 0]
