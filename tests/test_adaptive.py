"""The adaptive sweep (sweep.search: adaptive): it brackets the target length between the experts and
finds the ratio a full grid finds, with fewer probes; a killed adaptive sweep resumes to the same choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import world_sweep_recipe

from micota_merge.cli import cli
from micota_merge.merge.sweep.adaptive import next_ratios


def _search(curve, target: float, resolution=0.05, per_round=1, tolerance=0.0) -> tuple[dict, list]:
    measured = {0.0: curve(0.0), 1.0: curve(1.0)}
    steps = []
    while True:
        step = next_ratios(measured, target, resolution, per_round, tolerance)
        steps.append(step)
        if not step.ratios:
            return measured, steps
        measured.update({r: curve(r) for r in step.ratios})


def _grid_choice(curve, target: float, resolution=0.05) -> float:
    grid = [round(k * resolution, 6) for k in range(1, round(1 / resolution))]
    return min(grid, key=lambda r: (abs(curve(r) - target), r))


@pytest.mark.parametrize(
    "curve",
    [
        lambda r: 85 + 190 * r,  # linear
        lambda r: 85 * math.exp(r * math.log(272 / 85)),  # geometric
        lambda r: 85 + 190 / (1 + math.exp(-(r - 0.47) * 40)),  # a switch, as the micro world's
    ],
    ids=["linear", "geometric", "switch"],
)
@pytest.mark.parametrize("per_round", [1, 2])
def test_the_search_finds_the_grid_choice_with_fewer_probes(curve, per_round):
    target = math.sqrt(curve(0.0) * curve(1.0))
    measured, steps = _search(curve, target, per_round=per_round)
    probed = [r for r in measured if 0 < r < 1]
    found = min(probed, key=lambda r: (abs(measured[r] - target), r))
    assert found == _grid_choice(curve, target)
    assert len(probed) < 19 / 2  # the 0.05 grid probes 19 points
    assert "no wider than the resolution" in steps[-1].why or "within" in steps[-1].why


def test_the_search_says_when_length_is_not_monotone_and_when_the_target_is_out_of_reach():
    smooth = {0.0: 85.0, 0.25: 120.0, 0.5: 200.0, 1.0: 272.0}
    step = next_ratios(smooth, 150.0, 0.05)
    assert step.ratios == [0.4] and step.note == ""  # bisects 0.25-0.5 (0.375 on the 0.05 grid)
    bumpy = {0.0: 85.0, 0.25: 300.0, 0.5: 100.0, 1.0: 272.0}  # back on the short side past the first crossing
    step = next_ratios(bumpy, 150.0, 0.05)
    assert all(0 < r < 0.25 for r in step.ratios) and "not monotone" in step.note
    out = next_ratios({0.0: 85.0, 1.0: 272.0}, 400.0, 0.05)
    assert out.ratios == [] and "outside the experts' lengths" in out.why
    close = next_ratios({0.0: 85.0, 0.5: 149.0, 1.0: 272.0}, 150.0, 0.05, tolerance=0.05)
    assert close.ratios == [] and "within 5%" in close.why


def _recipe(tmp_path: Path, **sweep) -> Path:
    return world_sweep_recipe(tmp_path, shipped="demo-chain", **sweep)


@pytest.mark.slow  # about a dozen micro-world probes
def test_adaptive_on_the_micro_world_matches_the_grid_and_resumes(tmp_path, monkeypatch):
    """The direct micro-world merge over its base: the grid (0.05 steps from 0.3 to 0.9) and the adaptive
    search choose the same ratio, the search with fewer probes; killed after its first round, it resumes
    to the same choice without probing again what it had."""
    grid = [round(0.3 + 0.05 * k, 2) for k in range(13)]
    g = _recipe(tmp_path / "g", ratios=grid)
    result = CliRunner().invoke(cli, ["sweep", str(g)])
    assert result.exit_code == 0, result.output
    by_grid = json.loads((tmp_path / "g" / "ta" / "sweep" / "sweep.json").read_text())

    a = _recipe(tmp_path / "a", search="adaptive", resolution=0.05)
    from micota_merge.merge.sweep import run as sweep_run

    real, calls = sweep_run._Points.probe, []

    def killed(self, points, **extra):
        calls.append(points)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second round
        return real(self, points, **extra)

    monkeypatch.setattr(sweep_run._Points, "probe", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep_run.sweep(sweep_run.SweepOptions(recipe=str(a)), echo=lambda m: None)
    monkeypatch.setattr(sweep_run._Points, "probe", real)
    said: list[str] = []
    result = sweep_run.sweep(sweep_run.SweepOptions(recipe=str(a)), echo=said.append)
    assert result["chosen"] == by_grid["chosen"], (result["table_md"], by_grid["table_md"])
    assert result["search"]["probed"] < len(grid)
    assert "adaptive search:" in result["table_md"] and "round 1" in result["table_md"]
