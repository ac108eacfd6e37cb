"""Which calibrations a deployment serves: what `coolfusion up` loads, routes and makes its default,
the orchestrator's routes, and the held-out gain's interval that calibration files record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coolfusion.calibration import Calibration, FittedWorker, SelectionRule, WorkerFit, shipped_calibrations
from coolfusion.calibration.file import save_calibration
from coolfusion.cli.common import choose_calibrations, cluster_spec
from coolfusion.cli.quality import paired_difference_interval
from coolfusion.orchestrator.__main__ import parse_settings

TRIO = "smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct"


def test_up_routes_every_shipped_fit_for_its_workers_and_defaults_to_the_pooled_one() -> None:
    chosen = choose_calibrations(cluster_spec(TRIO, []))
    assert chosen.default == "pooled-smollm2-gemma3-qwen"
    assert chosen.routes == {
        f"coolfusion/{scope}": f"{scope}-smollm2-gemma3-qwen"
        for scope in ("arithmetic", "facts", "opposites", "pooled")
    }
    assert len(chosen.files) == len(shipped_calibrations())  # the pairs' fits too: requests may name them
    flags = chosen.flags()
    assert flags[-2:] == ("--default-calibration", "pooled-smollm2-gemma3-qwen")
    assert "coolfusion/facts=facts-smollm2-gemma3-qwen" in flags
    pair = choose_calibrations(cluster_spec("smollm2-135m-instruct,gemma3-270m", []), default="none")
    assert pair.default is None and set(pair.files) == {
        c.name for _, c in shipped_calibrations() if "qwen" not in c.name
    }


def _fit(name: str, workers: dict[str, str]) -> Calibration:
    rule = SelectionRule({w: WorkerFit() for w in workers})
    return Calibration(
        name, tuple(FittedWorker(w, m) for w, m in workers.items()), rule, fitted_on={"scope": "extract"}
    )


def test_up_refuses_at_once_a_calibration_for_other_models(tmp_path: Path) -> None:
    spec = cluster_spec("smollm2-135m-instruct,gemma3-270m", [])
    save_calibration(
        _fit("extract-smollm2-gemma3", {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}),
        tmp_path / "a.json",
    )
    chosen = choose_calibrations(spec, tmp_path, default="extract-smollm2-gemma3")
    assert (
        chosen.routes == {"coolfusion/extract": "extract-smollm2-gemma3"} and chosen.default == "extract-smollm2-gemma3"
    )
    save_calibration(_fit("extract-other", {"smollm2": "smollm2-1.7b", "gemma3": "gemma3-270m"}), tmp_path / "b.json")
    with pytest.raises(
        SystemExit,
        match=r"b.json: calibration 'extract-other' was fitted for smollm2 serving 'smollm2-1.7b'; it serves 'smollm2-135m-instruct'",
    ):
        choose_calibrations(spec, tmp_path)
    with pytest.raises(SystemExit, match="no calibration files"):
        choose_calibrations(spec, tmp_path / "empty")


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    fit = _fit("extract-a-b", {"a": "model-a", "b": "model-b"})
    save_calibration(fit, tmp_path / "extract.json")
    path = tmp_path / "registry.yaml"
    path.write_text(
        json.dumps({
            "workers": [{"name": "a", "address": "127.0.0.1:1"}, {"name": "b", "address": "127.0.0.1:2"}],
            "calibrations": ["extract.json"],
            "routes": [{"name": "coolfusion/extract", "calibration": "extract-a-b"}],
        })
    )  # fmt: skip
    return path


def test_the_orchestrator_takes_routes_from_its_registry_and_flags(registry: Path) -> None:
    settings = parse_settings(["--workers", str(registry), "--route", "extract=extract-a-b"])
    assert settings.routes == {"coolfusion/extract": "extract-a-b", "extract": "extract-a-b"}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--route", "coolfusion/x=nope"], "route 'coolfusion/x' names calibration 'nope', which is not loaded"),
        (["--route", "a=extract-a-b"], "routes ['a'] are named like workers"),
        (["--route", "coolfusion/extract=extract-a-b"], "route 'coolfusion/extract' is given twice"),
        (["--route", "Extract=extract-a-b"], "route 'Extract' must be lowercase"),
        (["--route", "extract"], "--route wants NAME=CALIBRATION"),
    ],
)
def test_the_orchestrator_refuses_to_start_with_a_bad_route(
    registry: Path, flags: list[str], says: str, capsys
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--workers", str(registry), *flags])
    assert says in capsys.readouterr().err


def test_the_gain_interval_is_newcombes_for_paired_proportions() -> None:
    # Fagerland, Lydersen and Laake (2014), the airway hyper-responsiveness example (Bentur et al.
    # 2009): 1 both, 1 only before, 7 only after, 12 neither; the Newcombe hybrid score interval
    # for the difference is -0.507 to -0.026.
    before = [True] * 2 + [False] * 19
    after = [True] + [False] + [True] * 7 + [False] * 12
    difference, low, high = paired_difference_interval(before, after)
    assert round(difference, 3) == -0.286 and (round(low, 3), round(high, 3)) == (-0.507, -0.026)
    same = [True] * 30 + [False] * 10
    assert paired_difference_interval(same, same)[0] == 0.0
    assert paired_difference_interval([True] * 40, [False] * 40)[1] > 0.8  # all discordant one way
