"""Probes that stop early (sweep.early_stop): the stopping rule by hand, and on the micro world a sweep
whose far points stop after a chunk, choosing what the full probes choose, resumable both ways."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import world_sweep_recipe

from micota_merge.merge.recipe import SweepSettings
from micota_merge.merge.sweep import run as sweep_run
from micota_merge.merge.sweep.run import EarlyStop


def test_the_rule_by_hand():
    rule = EarlyStop(chunk=16, confidence=0.95, target=150.0, floor=0.5)
    assert rule.z == pytest.approx(1.959964, abs=1e-6)
    short = [80] * 15 + [100]
    mean, sd = 81.25, math.sqrt((15 * 1.25**2 + 18.75**2) / 15)
    why = rule.reason(short, [True] * 16)
    assert why.startswith("short of the target") and f"{mean:.1f} ± {1.959964 * sd / 4:.1f}" in why
    assert rule.reason([300, 310, 290, 305], [True] * 4).startswith("past the target")
    # lengths on both sides of the target: the interval holds it, the point may be the one
    assert rule.reason([100, 200, 120, 180, 140, 160], [True] * 6) is None
    # Wilson at 95 %: 50 of 100 reaches 0.5962 (above the floor 0.5), 20 of 100 at most 0.2888
    near = [150] * 100
    assert rule.reason(near, [True] * 50 + [False] * 50) is None
    why = rule.reason(near, [True] * 20 + [False] * 80)
    assert why.startswith("below the accuracy floor") and "28.9%" in why
    assert rule.reason([80], [True]) is None  # one answer has no spread to judge by


def test_the_defaults_follow_the_search():
    assert SweepSettings().search == "adaptive" and SweepSettings().stops_early
    listed = SweepSettings(ratios=[0.3, 0.5])
    assert listed.search == "grid" and not listed.stops_early  # a grid measures every point it lists
    assert SweepSettings(ratios=[0.3], early_stop=True).stops_early
    assert not SweepSettings(search="adaptive", early_stop=False).stops_early


def _recipe(tmp_path: Path, **sweep) -> Path:
    return world_sweep_recipe(tmp_path, limit=32, **{"ratios": [0.5, 0.7, 0.9], "chunk": 8, **sweep})


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_far_points_stop_and_the_choice_is_the_full_probes(tmp_path):
    full = sweep_run.sweep(
        sweep_run.SweepOptions(recipe=str(_recipe(tmp_path / "full")), keep_all=True), echo=lambda m: None
    )
    path = _recipe(tmp_path / "early", early_stop=True)
    said: list[str] = []
    early = sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path), keep_all=True), echo=said.append)
    assert early["chosen"] == full["chosen"] == 0.7
    # early stopping's settings are part of the identity only where it is on: grids keep their old one
    assert "chunk" not in full["identity"]["sweep"] and early["identity"]["sweep"]["chunk"] == 8
    rows = {r["ratio"]: r for r in early["ratios"]}
    # ratio 0.5 answers as the short expert does (~84 tokens against a target of ~150): one chunk says so
    assert rows[0.5]["records"] == 8 and rows[0.5]["stopped_early"].startswith("short of the target")
    assert rows[0.9]["records"] < 32 and rows[0.9]["stopped_early"].startswith("past the target")
    assert len(_lines(Path(rows[0.5]["probe_file"]))) == 8
    assert all(r["records"] == 32 for r in full["ratios"]) and not any(r["stopped_early"] for r in full["ratios"])
    assert early["endpoints"]["long_cot"]["records"] == 32  # the experts answer every question
    assert "probe of ratio-0.5 stopped early" in "\n".join(said)
    assert "(stopped)" in early["table_md"] and "probes stopped early (sweep.early_stop)" in early["table_md"]
    # the same answers as the full probe gives those questions: a stopped probe is part of the full one
    full_05 = {
        r["id"]: r["messages"] for r in _lines(Path(next(r["probe_file"] for r in full["ratios"] if r["ratio"] == 0.5)))
    }
    stopped_05 = {r["id"]: r["messages"] for r in _lines(Path(rows[0.5]["probe_file"]))}
    assert len(stopped_05) == 8 and all(full_05[i] == m for i, m in stopped_05.items())

    # the same recipe without early stopping: the stopped probes resume where they stopped, to the full result
    data = yaml.safe_load(path.read_text())
    data["sweep"]["early_stop"] = False
    path.write_text(yaml.safe_dump(data))
    again = sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path), keep_all=True, force=True), echo=lambda m: None)
    by = {r["ratio"]: r for r in again["ratios"]}
    for r, row in {r["ratio"]: r for r in full["ratios"]}.items():
        assert by[r]["records"] == 32 and by[r]["mean_tokens"] == row["mean_tokens"], r
        assert by[r]["accuracy"] == row["accuracy"] and by[r]["stopped_early"] is None
    assert again["chosen"] == full["chosen"]


def test_a_killed_early_stopping_probe_resumes_to_the_same_rows(tmp_path, monkeypatch):
    path = _recipe(tmp_path / "a", early_stop=True)
    from micota_merge.generation import generate as gen

    real, calls = gen.generate, []

    def killed(opts, echo=print):
        calls.append(opts.limit)
        if "ratio-0.7" in opts.out and opts.limit == 16:
            raise KeyboardInterrupt  # killed during its second chunk
        return real(opts, echo=echo)

    monkeypatch.setattr(gen, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path)), echo=lambda m: None)
    monkeypatch.setattr(gen, "generate", real)
    resumed = sweep_run.sweep(sweep_run.SweepOptions(recipe=str(path)), echo=lambda m: None)
    straight = sweep_run.sweep(
        sweep_run.SweepOptions(recipe=str(_recipe(tmp_path / "b", early_stop=True))), echo=lambda m: None
    )
    keys = ("ratio", "records", "accuracy", "mean_tokens", "median_tokens", "stopped_early")
    assert [{k: r[k] for k in keys} for r in resumed["ratios"]] == [{k: r[k] for k in keys} for r in straight["ratios"]]
    assert resumed["chosen"] == straight["chosen"]
