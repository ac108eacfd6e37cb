"""Fusion trees and calibrations over real worker processes: a tree replayed offline answers exactly
what the service answers (every strategy, worker subset and order, Cool+R), a calibration runs only
for the workers and models it was fitted for, and explore -> calibrate -> report works end to end."""

from __future__ import annotations

import json
import math

import pytest

from coolfusion.calibration import Calibration, FittedWorker, SelectionRule, WorkerFit, load_calibration
from coolfusion.calibration.file import save_calibration
from coolfusion.cli.cluster import LocalCluster
from coolfusion.cli.main import main as coolfusion
from coolfusion.client import FuseOptions, FusionClient, InvalidArgumentError, fusion_strategy
from coolfusion.orchestrator.replay import Unexplored, replay, rerank
from coolfusion.orchestrator.strategy import DEFAULT, PAPER, Aggregation, RepetitionGuard, Strategy
from coolfusion.orchestrator.tree_proto import tree_from_proto
from coolfusion.v1 import orchestrator_pb2 as opb

from worker_probes import calibrated_orchestrator, wait_for_no_sessions

FAMILIES = ("bpe", "metaspace", "char")
PROMPTS = {
    "text": "Tom has 3 apples and buys 4 more.",
    "few-shot": "The capital of Italy is Rome.\nThe capital of Japan is Tokyo.\nThe capital of Chile is",
    "chat": [{"role": "user", "content": "What is 100 minus 37?"}],
}
STOPS = ("\n", ". ")
CAP = 6  # tokens: random tiny models disagree at every step, so the tree grows about threefold per step
MAX_NODES = 400
TRIO, PAIR = "tiny-trio", "tiny-char-bpe"


@pytest.fixture(scope="module")
def cluster(tiny_model_dirs, tmp_path_factory):
    """Workers that compute every call alone (one session per forward pass), so that a tree explored
    with many sessions at once and a fusion asked on its own see the same numbers to the last bit."""
    log = tmp_path_factory.mktemp("logs") / "cluster.log"
    spec = {f: ["--model", str(tiny_model_dirs[f])] for f in FAMILIES}
    with LocalCluster(spec, log_path=log, worker_flags=("--max-batch-sessions", "1")) as running:
        yield running


@pytest.fixture(scope="module")
def calibration_files(cluster, tmp_path_factory):
    """A trio rule with a lead and a margin, a pair rule with a prior, and one fitted for another model."""
    with FusionClient(cluster.address) as client:
        models = {s.name: s.info.model_id for s in client.list_workers()}
    folder = tmp_path_factory.mktemp("calibrations")
    fits = {
        TRIO: SelectionRule(
            {"bpe": WorkerFit(1.5, 1.0, 0.25), "metaspace": WorkerFit(2.0, 2.0, 0.0), "char": WorkerFit(1.0, 0.5, 0.0)},
            lead="metaspace", margin=0.5,
        ),
        PAIR: SelectionRule({"char": WorkerFit(1.0, 1.0, 0.5), "bpe": WorkerFit(1.0, 1.0, 0.0)}),
        "other-model": SelectionRule({"bpe": WorkerFit(), "char": WorkerFit()}),
    }  # fmt: skip
    order = {TRIO: FAMILIES, PAIR: ("char", "bpe"), "other-model": ("bpe", "char")}
    for name, rule in fits.items():
        fitted = tuple(FittedWorker(w, models[w] if name != "other-model" else "some-other-model") for w in order[name])
        save_calibration(Calibration(name, fitted, rule, "stop"), folder / f"{name}.json")
    return folder


@pytest.fixture(scope="module")
def calibrations(calibration_files) -> dict[str, Calibration]:
    return {c.name: c for c in map(load_calibration, calibration_files.glob("*.json"))}


@pytest.fixture(scope="module")
def orchestrator(cluster, calibration_files, tmp_path_factory):
    """An orchestrator over the cluster's workers with the calibrations loaded, the trio's as default."""
    log = tmp_path_factory.mktemp("logs") / "orchestrator.log"
    with calibrated_orchestrator(cluster, calibration_files, ["--default-calibration", TRIO], log) as process:
        yield process


@pytest.fixture(scope="module")
def client(orchestrator):
    with FusionClient(orchestrator.address, timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def trees(client):
    """Each prompt's tree, explored once through the service."""
    options = FuseOptions(max_new_tokens=CAP, stop=STOPS)
    return {name: client.explore(prompt, options, max_nodes=MAX_NODES) for name, prompt in PROMPTS.items()}


def _strategies(calibrations) -> dict[str, tuple[Strategy, object]]:
    """Label -> (the strategy replay runs, what a request sends for it)."""
    calibrated = {
        name: Strategy(repetition_guard=RepetitionGuard.STOP, calibration=calibrations[name]) for name in (TRIO, PAIR)
    }
    return {
        "paper": (PAPER, fusion_strategy("ppl_mean", "off")),
        "default": (DEFAULT, fusion_strategy("nll_mean", "stop")),
        "proposer+steer": (
            Strategy(Aggregation.PROPOSER, repetition_guard=RepetitionGuard.STEER),
            fusion_strategy("proposer", "steer"),
        ),
        "weighted": (
            Strategy(Aggregation.NLL_MEAN, {"bpe": 2.0}, RepetitionGuard.STOP),
            fusion_strategy("nll_mean", "stop", {"bpe": 2.0}),
        ),
        TRIO: (calibrated[TRIO], fusion_strategy(calibration=TRIO)),
        PAIR: (calibrated[PAIR], fusion_strategy(calibration=PAIR)),
    }


CASES = [
    (FAMILIES, "paper"), (FAMILIES, "default"), (FAMILIES, "proposer+steer"), (FAMILIES, "weighted"), (FAMILIES, TRIO),
    (("char", "bpe"), "paper"), (("char", "bpe"), "default"), (("char", "bpe"), PAIR),
    (("metaspace", "char"), "weighted"), (("metaspace",), "default"),
]  # fmt: skip


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(("workers", "label"), CASES, ids=[f"{'+'.join(w)}:{s}" for w, s in CASES])
def test_a_replayed_tree_answers_what_the_service_answers(client, calibrations, trees, prompt, workers, label):
    strategy, asked = _strategies(calibrations)[label]
    options = FuseOptions(workers=workers, max_new_tokens=CAP, stop=STOPS, rerank=True, strategy=asked)
    result = client.fuse(PROMPTS[prompt], options)
    tree = tree_from_proto(trees[prompt])
    assert tree.complete
    fused = {entry.source: entry.text for entry in result.rerank}["fused"]
    assert replay(tree, workers, strategy, CAP).text == fused
    source, best = rerank(tree, workers, strategy, CAP)
    assert (source, best.text) == (result.source, result.text)
    assert result.strategy.calibration == (label if label in (TRIO, PAIR) else "")


def test_the_default_calibration_runs_only_where_it_fits(client, orchestrator):
    options = FuseOptions(max_new_tokens=CAP, stop=STOPS)
    assert client.fuse(PROMPTS["text"], options).strategy.calibration == TRIO  # all workers, in its order
    pair = FuseOptions(workers=("bpe", "char"), max_new_tokens=CAP)
    assert client.fuse(PROMPTS["text"], pair).strategy.calibration == ""
    chosen = FuseOptions(max_new_tokens=CAP, strategy=fusion_strategy("nll_mean"))
    result = client.fuse(PROMPTS["text"], chosen)
    assert result.strategy.calibration == "" and result.strategy.aggregation == opb.AGGREGATION_NLL_MEAN


@pytest.mark.parametrize(
    ("workers", "strategy", "says"),
    [
        (("bpe", "char"), fusion_strategy(calibration=TRIO), "fitted for workers ['bpe', 'metaspace', 'char']"),
        (("bpe", "char"), fusion_strategy(calibration=PAIR), "not ['bpe', 'char']"),  # another order
        ((), fusion_strategy(calibration="nope"), "unknown calibration 'nope'; loaded: other-model, tiny-char-bpe"),
        (("bpe", "char"), fusion_strategy(calibration="other-model"), "'some-other-model'"),
        ((), fusion_strategy("ppl_mean", calibration=TRIO), "a calibration replaces both"),
    ],
)
def test_a_calibration_that_does_not_fit_is_refused_naming_the_difference(client, workers, strategy, says):
    with pytest.raises(InvalidArgumentError) as refused:
        client.fuse(PROMPTS["text"], FuseOptions(workers=workers, max_new_tokens=CAP, strategy=strategy))
    assert says in refused.value.details


def test_an_exploration_cut_by_its_node_limit_says_so(client):
    cut = tree_from_proto(client.explore(PROMPTS["text"], FuseOptions(max_new_tokens=CAP, stop=STOPS), max_nodes=2))
    assert not cut.complete
    assert [n.visited for n in cut.nodes[:2]] == [True, True] and not any(n.visited for n in cut.nodes[2:])
    with pytest.raises(Unexplored):
        for name in FAMILIES:  # some worker's own answer runs past the two visited nodes
            replay(cut, [name], DEFAULT, CAP)
    with pytest.raises(InvalidArgumentError, match="max_nodes is 100000"):
        client.explore(PROMPTS["text"], FuseOptions(max_new_tokens=CAP), max_nodes=100_000)


def test_exploring_leaves_no_session_open(cluster, trees):
    assert wait_for_no_sessions(list(cluster.workers.values())) == [0, 0, 0]


def test_explore_calibrate_report_end_to_end(orchestrator, cluster, tmp_path, capsys):
    tuning, held_out, fitted = tmp_path / "tuning", tmp_path / "held-out", tmp_path / "calibrations"
    for split, out in (("tuning", tuning), ("held-out", held_out)):
        argv = ["explore", "--orchestrator", orchestrator.address, "--split", split, "--limit", "3", "--out", str(out)]
        assert coolfusion([*argv, "--concurrency", "3"]) == 0
    assert coolfusion(["calibrate", str(tuning), "--out", str(fitted)]) == 0
    trio = load_calibration(fitted / "pooled-bpe-metaspace-char.json")
    reached = trio.tuning["reached"]
    assert trio.tuning["correct"] >= max(reached[f"{name} alone"] for name in FAMILIES)  # never below the best
    assert trio.fitted_on["split"] == "tuning" and sum(trio.fitted_on["items"].values()) == 9
    assert len(list(fitted.glob("*.json"))) == 4 * 4  # 3 families + pooled, for 3 pairs + the trio
    assert coolfusion(["report", str(held_out), "--calibrations", str(fitted)]) == 0
    report = json.loads((held_out / "report.json").read_text())
    pooled_trio = next(r for r in report if r["family"] == "pooled" and r["items"] == "bpe, metaspace, char")
    modes = {m["mode"]: m["accuracy"]["total"] for m in pooled_trio["modes"]}
    assert modes["cool, fitted"] == modes["cool_r, fitted"] == modes["bpe alone"] == 9
    with pytest.raises(SystemExit, match="tuning items only"):
        coolfusion(["calibrate", str(held_out), "--out", str(tmp_path / "refused")])
    assert math.isfinite(trio.rule.workers["bpe"].scale)
