"""A deployment's own calibration over real worker processes: a labelled-items file explored and
fitted per tag (`explore --data`, `calibrate`), the default calibration applied only to requests
inside its scope, routes through the orchestrator and the HTTP gateway, and every result saying
which rule ran and why."""

from __future__ import annotations

import json

import httpx
import pytest

from coolfusion.calibration import Calibration, FittedWorker, SelectionRule, WorkerFit, load_calibration
from coolfusion.calibration.file import save_calibration
from coolfusion.calibration.scope import Scope
from coolfusion.cli.cluster import gateway_argv, launch, stop_processes, wait_ready
from coolfusion.cli.main import main as coolfusion
from coolfusion.client import FuseOptions, FusionClient, InvalidArgumentError, fusion_strategy
from coolfusion.v1 import orchestrator_pb2 as opb

from worker_probes import calibrated_orchestrator

SCOPED, ROUTED = "extract-char-bpe", "chat-bpe-metaspace-char"
LOOKUP = "lookup-char-bpe"  # fitted on one of the default's tags alone
ROUTE = "coolfusion/chat"
PROMPT = "The capital of Italy is Rome.\nThe capital of Chile is"
CAP = 6  # tokens, the scoped calibration's longest answer


@pytest.fixture(scope="module")
def calibration_files(tiny_trio, tmp_path_factory):
    """A default fitted on plain extract and lookup prompts of at most CAP tokens (char leads, bpe
    judges), a fit for the lookup tag alone (bpe leads), and a rule for all three workers that a
    route names."""
    with FusionClient(tiny_trio.address) as client:
        models = {s.name: s.info.model_id for s in client.list_workers()}
    folder = tmp_path_factory.mktemp("calibrations")
    scoped = SelectionRule(
        {"char": WorkerFit(1.0, 1.0, 0.5), "bpe": WorkerFit(1.0, 2.0, 0.0)}, lead="char", margin=0.25
    )
    lookup = SelectionRule({"char": WorkerFit(1.0, 1.0, 0.0), "bpe": WorkerFit(1.0, 1.0, 0.0)}, lead="bpe", margin=0.5)
    routed = SelectionRule({w: WorkerFit(1.0, 1.0, 0.25) for w in ("bpe", "metaspace", "char")})
    for name, rule, scope in (
        (SCOPED, scoped, Scope(("extract", "lookup"), ("plain",), CAP)),
        (LOOKUP, lookup, Scope(("lookup",), ("plain",), CAP)),
        (ROUTED, routed, None),
    ):
        fitted = tuple(FittedWorker(w, models[w]) for w in rule.workers)
        save_calibration(Calibration(name, fitted, rule, "stop", scope=scope), folder / f"{name}.json")
    return folder


@pytest.fixture(scope="module")
def orchestrator(tiny_trio, calibration_files, tmp_path_factory):
    """An orchestrator over the shared tiny workers with the scoped default and the route."""
    flags = ["--default-calibration", SCOPED, "--route", f"{ROUTE}={ROUTED}"]
    log = tmp_path_factory.mktemp("logs") / "orchestrator.log"
    with calibrated_orchestrator(tiny_trio, calibration_files, flags, log) as process:
        yield process


@pytest.fixture(scope="module")
def client(orchestrator):
    with FusionClient(orchestrator.address, timeout_s=120) as running:
        yield running


def _asked(client: FusionClient, prompt=PROMPT, **options) -> opb.FuseResult:
    return client.fuse(prompt, FuseOptions(**{"workers": ("char", "bpe"), "max_new_tokens": CAP, **options}))


def test_the_default_calibration_runs_for_a_request_inside_its_scope(client):
    for tag in ("", "extract"):  # untagged requests are judged by form and length
        result = _asked(client, tag=tag)
        assert result.strategy.calibration == SCOPED
        assert result.rule_choice.reason == opb.RULE_REASON_DEFAULT_CALIBRATION


def test_a_tagged_request_runs_its_tags_own_fit_in_place_of_a_default_fitted_on_several(client):
    result = _asked(client, tag="lookup")
    assert result.strategy.calibration == LOOKUP
    assert result.rule_choice.reason == opb.RULE_REASON_DEFAULT_CALIBRATION
    assert result.rule_choice.detail == f"the fit for tag 'lookup', in place of {SCOPED!r}"
    named = _asked(client, strategy=fusion_strategy(calibration=LOOKUP))
    assert named.text == result.text
    outside = _asked(client, tag="lookup", max_new_tokens=CAP + 2)  # outside both scopes
    assert outside.rule_choice.reason == opb.RULE_REASON_OUTSIDE_SCOPE


@pytest.mark.parametrize(
    ("prompt", "options", "says"),
    [
        (
            [{"role": "user", "content": "Tell me about rivers."}],
            {},
            "the request's prompt is chat; it was fitted on plain prompts",
        ),
        (
            PROMPT,
            {"max_new_tokens": CAP + 2},
            f"allows {CAP + 2} new tokens; it was fitted on answers of at most {CAP}",
        ),
        (PROMPT, {"tag": "support"}, "the request's tag is 'support'; it was fitted on tags extract, lookup"),
    ],
)
def test_outside_its_scope_a_request_gets_the_unfitted_default_and_is_told_why(client, prompt, options, says):
    result = _asked(client, prompt, **options)
    assert result.rule_choice.reason == opb.RULE_REASON_OUTSIDE_SCOPE
    assert says in result.rule_choice.detail and f"default calibration {SCOPED!r}" in result.rule_choice.detail
    assert result.strategy.calibration == "" and result.strategy.aggregation == opb.AGGREGATION_NLL_MEAN
    unfitted = _asked(client, prompt, **options, strategy=fusion_strategy("nll_mean", "stop"))
    assert unfitted.text == result.text and unfitted.rule_choice.reason == opb.RULE_REASON_REQUESTED


def test_other_workers_get_the_unfitted_default_and_are_told_why(client):
    result = _asked(client, workers=("bpe", "char"))
    assert result.rule_choice.reason == opb.RULE_REASON_OTHER_WORKERS and result.strategy.calibration == ""
    assert "was fitted for workers ['char', 'bpe']" in result.rule_choice.detail


def test_a_route_runs_its_calibration_on_its_workers(client):
    result = client.fuse(PROMPT, FuseOptions(route=ROUTE, max_new_tokens=CAP))
    assert result.strategy.calibration == ROUTED and result.rule_choice.reason == opb.RULE_REASON_ROUTE
    assert [share.worker for share in result.shares] == ["bpe", "metaspace", "char"]
    named = client.fuse(PROMPT, FuseOptions(max_new_tokens=CAP, strategy=fusion_strategy(calibration=ROUTED)))
    assert named.text == result.text and named.rule_choice.reason == opb.RULE_REASON_REQUESTED
    routes = client.describe().routes
    assert [(r.name, r.calibration, list(r.workers)) for r in routes] == [(ROUTE, ROUTED, ["bpe", "metaspace", "char"])]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"route": "coolfusion/nope"}, "unknown route 'coolfusion/nope'; routes: coolfusion/chat"),
        (
            {"route": ROUTE, "strategy": fusion_strategy(calibration=SCOPED)},
            f"runs calibration {ROUTED!r}, not {SCOPED!r}",
        ),
        ({"route": ROUTE, "strategy": fusion_strategy("ppl_mean")}, "which replaces the aggregation"),
        (
            {"route": ROUTE, "workers": ("bpe", "char")},
            "fitted for workers ['bpe', 'metaspace', 'char'], not ['bpe', 'char']",
        ),
        ({"tag": "Not A Tag"}, "tag 'Not A Tag' must be lowercase letters"),
    ],
)
def test_a_bad_route_or_tag_is_refused_saying_what_is_wrong(client, options, says):
    with pytest.raises(InvalidArgumentError) as refused:
        client.fuse(PROMPT, FuseOptions(max_new_tokens=CAP, **options))
    assert says in refused.value.details


@pytest.fixture(scope="module")
def gateway(orchestrator):
    process = wait_ready(launch("calibrated-gateway", gateway_argv(orchestrator.address)), 60)
    try:
        yield f"http://{process.address}/v1"
    finally:
        stop_processes([process])


def test_the_gateway_serves_a_route_as_a_model(gateway):
    with httpx.Client(base_url=gateway, timeout=120, trust_env=False) as http:
        listed = [m["id"] for m in http.get("/models").json()["data"]]
        assert listed == ["coolfusion", ROUTE, "bpe", "metaspace", "char"]
        assert http.get(f"/models/{ROUTE}").json()["calibration"] == ROUTED
        body = {"model": ROUTE, "prompt": PROMPT, "max_tokens": CAP}
        routed = http.post("/completions", json=body).json()["coolfusion"]
        assert routed["calibration"] == ROUTED and routed["rule_choice"] == {"reason": "route", "detail": ""}
        chat = {
            "model": "coolfusion",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "workers": ["char", "bpe"],
        }
        outside = http.post("/chat/completions", json=chat).json()["coolfusion"]
        assert outside["calibration"] is None and outside["rule_choice"]["reason"] == "outside_scope"


def test_explore_a_labelled_file_and_calibrate_per_tag(orchestrator, tmp_path):
    """The documented path on a small file: explore every item, fit per tag and pooled on the
    tuning items, measure the held-out ones; the calibration files say what they were fitted on."""
    data = tmp_path / "items.jsonl"
    lines = [
        {"id": f"{tag}-{n}", "tag": tag, "split": "tuning" if n < 4 else "held-out", "prompt": f"{stem} {n}:",
         "answers": [str(n)], "rule": "number", "max_new_tokens": 3, "stop": ["\n"]}
        for tag, stem in (("count", "Count to"), ("echo", "Say the number")) for n in range(6)
    ]  # fmt: skip
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    trees, fitted = tmp_path / "trees", tmp_path / "fitted"
    argv = ["explore", "--orchestrator", orchestrator.address, "--data", str(data), "--out", str(trees)]
    assert coolfusion([*argv, "--workers", "char,bpe", "--concurrency", "4"]) == 0
    assert coolfusion(["calibrate", str(trees), "--out", str(fitted)]) == 0
    assert sorted(p.name for p in fitted.glob("*.json")) == [
        "count-char-bpe.json",
        "echo-char-bpe.json",
        "pooled-char-bpe.json",
    ]
    pooled = load_calibration(fitted / "pooled-char-bpe.json")
    assert pooled.scope == Scope(("count", "echo"), ("plain",), 3)
    assert pooled.fitted_on["data"]["items"] == 12 and pooled.fitted_on["data"]["split"]["tuning"] == 8
    assert pooled.tuning["items"] == 8 and pooled.held_out["items"] == 4
    assert set(pooled.held_out["alone"]) == {"char", "bpe"} and len(pooled.held_out["gain_interval_95"]) == 2
    assert "Held-out items" in (fitted / "fit.md").read_text()
    assert coolfusion(["report", str(trees), "--calibrations", str(fitted)]) == 0  # the held-out part only
    report = json.loads((trees / "report.json").read_text())
    pooled_modes = next(r for r in report if r["family"] == "pooled")["modes"]
    assert {m["mode"]: m["accuracy"]["total"] for m in pooled_modes}["cool, fitted"] == 4
    lines[0]["prompt"] = "Count to zero:"  # another question under the same id needs its own tree
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(
        SystemExit, match=r"1 items of .* have no tree for their question .* \(first: line 1, id 'count-0'\)"
    ):
        coolfusion(["calibrate", str(trees), "--out", str(fitted)])
