"""sweep: the choice rule, the outputs, and ratio-by-ratio resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.merge.sweep.run import choose, dominates, pareto_front


def _row(ratio, acc, tokens, density=None):
    return {"ratio": ratio, "accuracy": acc, "mean_tokens": tokens, "density": density}


def test_choice_is_closest_length_among_accurate_ratios():
    rows = [
        _row(0.0, 0.60, 100),
        _row(0.3, 0.70, 180),
        _row(0.5, 0.69, 300),
        _row(0.7, 0.62, 330),
        _row(1.0, 0.71, 900),
    ]
    # target 325: 0.7 is closest but 9 points below the best (71%); 0.5 is within 2 points
    chosen, why = choose(rows, 325, tolerance=2.0)
    assert chosen["ratio"] == 0.5
    assert "0.7" in why and "too inaccurate" in why
    # with a wide tolerance the closest length wins
    assert choose(rows, 325, tolerance=10.0)[0]["ratio"] == 0.7
    # zero tolerance: only the most accurate qualifies
    assert choose(rows, 325, tolerance=0.0)[0]["ratio"] == 1.0


def test_pareto_front_keeps_only_undominated_points():
    rows = [
        _row(0.2, 0.60, 100, 0.5),
        _row(0.4, 0.66, 150, 0.5),
        _row(0.6, 0.64, 200, 0.5),  # 0.6 dominated by 0.4
        _row(0.8, 0.70, 400, 0.5),
        _row(0.4, 0.66, 150, 0.7),  # a tie with (0.4, 0.5): neither dominates
        _row(0.6, 0.70, 450, 0.7),  # as accurate as (0.8, 0.5) but longer: dominated
        _row(0.8, 0.55, 90, 0.7),
    ]  # the shortest: on the front however inaccurate
    front = pareto_front(rows)
    assert [(r["ratio"], r["density"]) for r in front] == [(0.8, 0.7), (0.2, 0.5), (0.4, 0.5), (0.4, 0.7), (0.8, 0.5)]
    assert dominates(rows[1], rows[2]) and not dominates(rows[1], rows[4]) and not dominates(rows[4], rows[1])
    assert dominates(rows[3], rows[5])
    for r in rows:  # the definition, checked pairwise
        beaten = any(
            o["mean_tokens"] <= r["mean_tokens"]
            and o["accuracy"] >= r["accuracy"]
            and (o["mean_tokens"], o["accuracy"]) != (r["mean_tokens"], r["accuracy"])
            for o in rows
        )
        assert (r in front) == (not beaten)


def test_choice_is_explained_against_the_front():
    # Two front points qualify (within 2 points of the best): the target length decides between them,
    # and the reason names the other one, which a different target would have picked.
    rows = [
        _row(0.25, 0.60, 120, 0.5),
        _row(0.5, 0.69, 200, 0.5),
        _row(0.75, 0.70, 380, 0.5),
        _row(0.5, 0.68, 260, 0.7),
    ]  # (0.5, 0.7) is dominated by (0.5, 0.5)
    pick, why = choose(rows, target=300, tolerance=2.0)
    assert (pick["ratio"], pick["density"]) == (0.5, 0.7)  # closest to 300 among the accurate-enough
    assert "off the length-accuracy front" in why and "ratio 0.5, density 0.5 (200.0 tokens" in why
    pick, why = choose(rows, target=200, tolerance=2.0)
    assert (pick["ratio"], pick["density"]) == (0.5, 0.5)
    assert "on the length-accuracy front" in why and "ratio 0.75, density 0.5 (380.0 tokens, 70.0%)" in why
    assert "ratio 0.25" not in why.split("front")[-1]  # too inaccurate: not an alternative
    pick, _ = choose(rows, target=400, tolerance=2.0)
    assert (pick["ratio"], pick["density"]) == (0.75, 0.5)  # the other answer, for another target


def test_reason_is_short_sentences_naming_target_qualifiers_and_why():
    rows = [
        _row(0.3, 0.92, 84.4, 0.5),
        _row(0.4, 0.92, 84.4, 0.5),
        _row(0.5, 0.95, 130.0, 0.5),
        _row(0.7, 1.0, 176.7, 0.5),
        _row(0.9, 0.80, 263.0, 0.5),
    ]
    pick, why = choose(rows, target=150.5, tolerance=10.0, target_from="the geometric mean of the experts")
    assert (pick["ratio"], pick["density"]) == (0.5, 0.5)  # 130 is nearer 150.5 than 176.7
    sentences = why.split(". ")
    assert sentences[0] == "ratio 0.5, density 0.5"  # the choice first: "chosen: <reason>" reads as a sentence
    assert "Target: 150.5 mean tokens, the geometric mean of the experts." in why
    # the qualifiers, named once with their shared density; the one left out, with its accuracy
    assert "at least 90.0% (within 10 points of the best, 100.0%): ratios 0.3, 0.4, 0.5, 0.7 at density 0.5." in why
    assert "Left out as too inaccurate: 0.9/0.5 (80.0%)." in why
    assert "closest to the target: 130.0 tokens, 95.0% accurate." in why
    # the front: 0.3 and 0.4 measured alike are named together; 0.9 (dominated, too inaccurate) is no alternative
    alternatives = why.split("which another target would pick: ")[1]
    assert alternatives == (
        "ratios 0.3, 0.4 at density 0.5 (each 84.4 tokens, 92.0%); ratio 0.7, density 0.5 (176.7 tokens, 100.0%)."
    )
    assert len(sentences) == 7  # short sentences, not one run-on clause
    assert all(len(x) < 80 for x in sentences if ":" not in x)  # the prose ones short; lists as long as they are
    # off the front: the dominating point is named, and the target is what decided
    pick, why = choose(rows, target=263.0, tolerance=25.0)
    assert pick["ratio"] == 0.9 and "Target: 263.0 mean tokens." in why
    assert (
        "It is off the length-accuracy front: ratios 0.3, 0.4 at density 0.5 (each 84.4 tokens, 92.0%); "
        "ratio 0.5, density 0.5 (130.0 tokens, 95.0%); ratio 0.7, density 0.5 (176.7 tokens, 100.0%) are as "
        "accurate or more and no longer."
    ) in why
    assert "Only the target length put this one ahead; a target nearer to them would pick one of them." in why
    pick, why = choose([_row(0.2, 0.9, 100), _row(0.6, 0.85, 200)], target=200, tolerance=10.0)
    assert pick["ratio"] == 0.6 and "front: ratio 0.2 (100.0 tokens, 90.0%) is as accurate" in why
    assert "a target nearer to it would pick it." in why
    # no density: ratios alone; a floor set by min_accuracy is said to be
    rows = [_row(0.2, 0.50, 100), _row(0.6, 0.52, 200)]
    _, why = choose(rows, target=150, tolerance=10.0, min_accuracy=0.45)
    assert "ratios 0.2, 0.6." in why and "density" not in why
    _, why = choose(rows, target=150, tolerance=10.0, min_accuracy=0.51)
    assert "at least 51.0%" in why and "sweep.min_accuracy 51.0%" in why and "too inaccurate: 0.2 (50.0%)" in why


def _front_result(rows, chosen, target=150.0):
    return {
        "method": "dare_ties",
        "ratios": rows,
        "front": [[r["ratio"], r["density"]] for r in pareto_front(rows)],
        "chosen": chosen[0],
        "chosen_density": chosen[1],
        "tolerance": 10.0,
        "target_tokens": target,
        "endpoints": {
            "short_cot": {"mean_tokens": 84.4, "accuracy": 1.0},
            "long_cot": {"mean_tokens": 268.3, "accuracy": 1.0},
        },
        "probe": {"max_tokens": 400, "questions": "gsm8k-train"},
        "densities": None,
    }


def _front_texts(result, tmp_path, monkeypatch):
    """plot_front's point labels and its notes, with their boxes on the canvas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from micota_merge.merge.sweep.report import plot_front

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    plot_front(result, tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = figs[0]
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
    return labels, [t.get_text() for t in fig.texts], ax.get_window_extent(renderer)


def test_front_labels_do_not_overprint(tmp_path, monkeypatch):
    # the demo's sweep: four ratios measured alike at one place, two more a few tokens apart
    rows = [_row(r, 1.0, 84.4, 0.5) for r in (0.3, 0.4, 0.5, 0.6)] + [
        _row(0.7, 1.0, 176.7, 0.5),
        _row(0.8, 1.0, 255.8, 0.5),
        _row(0.9, 1.0, 263.0, 0.5),
    ]
    labels, notes, frame = _front_texts(_front_result(rows, (0.7, 0.5)), tmp_path, monkeypatch)
    texts = [t for t, _ in labels]
    assert sorted(texts) == ["0.3, 0.4, 0.5, 0.6", "0.7", "0.8", "0.9"]  # one label for the four alike
    boxes = [b for _, b in labels]
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    assert not notes  # everything labelled: no note
    # a crowded grid: the chosen point and the front are labelled, the rest is left to the table
    rows = [_row(r / 20, 0.5 + r / 50 - d / 10, 100 + 15 * r + 40 * d, d) for r in range(1, 20) for d in (0.3, 0.7)]
    res = _front_result(rows, (0.5, 0.3))
    res["densities"] = [0.3, 0.7]
    labels, notes, _ = _front_texts(res, tmp_path, monkeypatch)
    front = {f"{r:g}/{d:g}" for r, d in res["front"]}
    assert "0.5/0.3" in {t for t, _ in labels} and {t for t, _ in labels} <= front | {"0.5/0.3"}
    assert any("only the chosen point and the front are labelled" in n for n in notes)
    boxes = [b for _, b in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _recipe(tmp_path, family, method="linear", ratios=(0.0, 0.5, 1.0)) -> Path:
    data = {
        "models": {k: str(v) for k, v in family.items()},
        "merge": {"method": method, "ratio": 0.5, "density": 0.5 if method != "linear" else None, "dtype": "bfloat16"},
        "output": str(tmp_path / "ta"),
        # random tiny models answer nothing right and run to the cap: no floor, the machinery is under test
        "sweep": {
            "ratios": list(ratios),
            "probe": {"questions": "gsm8k-train", "limit": 2, "max_tokens": 6, "backend": "transformers"},
            "min_accuracy": 0.0,
            "max_truncated": 1.0,
        },
    }
    if data["merge"]["density"] is None:
        del data["merge"]["density"]
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_sweep_writes_tables_plot_and_keeps_only_the_chosen_ta(tiny_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_family)
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--keep-all"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "ta"
    report = out / "sweep"
    data = json.loads((report / "sweep.json").read_text())
    assert [r["ratio"] for r in data["ratios"]] == [0.0, 0.5, 1.0]
    for r in data["ratios"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0 < r["mean_tokens"] <= 6 and r["records"] == 2
        assert 0.0 <= r["truncation_rate"] <= 1.0
    ends = data["endpoints"]
    expected_target = (ends["short_cot"]["mean_tokens"] * ends["long_cot"]["mean_tokens"]) ** 0.5
    assert data["target_tokens"] == pytest.approx(expected_target, abs=0.01)
    assert data["chosen"] in (0.0, 0.5, 1.0) and "closest to the target" in data["reason"]
    csv_lines = (report / "sweep.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("model,ratio,density,accuracy") and len(csv_lines) == 1 + 2 + 3
    assert "| TA **chosen** |" in (report / "sweep.md").read_text()
    assert (report / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "micota.json").read_text())
    assert manifest["recipe"]["merge"]["ratio"] == data["chosen"]
    # --keep-all leaves the other ratios' TAs in the work folder
    work = tmp_path / "ta.sweep"
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == sorted(
        f"ratio-{r:g}" if r not in (0.0, 1.0) else f"ratio-{r:.1f}" for r in (0.0, 0.5, 1.0) if r != data["chosen"]
    )
    # a finished sweep run again does nothing but report
    again = CliRunner().invoke(cli, ["sweep", str(recipe)])
    assert again.exit_code == 0 and "sweep already done" in again.output


def test_dare_ties_grid_sweep_one_pass_with_front(tiny_family, tmp_path):
    """ratio x density in one pass: every point's TA is a one-pass build equal to `build` at that point."""
    import torch
    from safetensors.torch import load_file

    ratios = (0.0, 0.25, 0.5, 0.75, 1.0)
    recipe = _recipe(tmp_path, tiny_family, method="dare_ties", ratios=ratios)
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--densities", "0.5,0.8", "--keep-all"])
    assert result.exit_code == 0, result.output
    assert "10 teacher assistants written in one pass" in result.output
    report = tmp_path / "ta" / "sweep"
    data = json.loads((report / "sweep.json").read_text())
    assert [(r["ratio"], r["density"]) for r in data["ratios"]] == [(r, d) for d in (0.5, 0.8) for r in ratios]
    assert data["densities"] == [0.5, 0.8] and data["chosen_density"] in (0.5, 0.8)
    rows = {(r["ratio"], r["density"]): r for r in data["ratios"]}
    front = [tuple(p) for p in data["front"]]
    for p, r in rows.items():  # the front written is the front of the rows written
        beaten = any(
            o["mean_tokens"] <= r["mean_tokens"]
            and (o["accuracy"] or 0) >= (r["accuracy"] or 0)
            and (o["mean_tokens"], o["accuracy"]) != (r["mean_tokens"], r["accuracy"])
            for o in rows.values()
        )
        assert (p in front) == (not beaten)
    assert "length-accuracy front" in data["reason"]
    md = (report / "sweep.md").read_text()
    assert "| density |" in md and md.count("| yes |") == len(front)
    assert (report / "sweep.csv").read_text().splitlines()[0].startswith("model,ratio,density,")
    assert (report / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "ta" / "micota.json").read_text())
    assert manifest["one_pass"] is True
    assert (manifest["recipe"]["merge"]["ratio"], manifest["recipe"]["merge"]["density"]) == (
        data["chosen"],
        data["chosen_density"],
    )
    # two kept points against separate builds, bit for bit (tests/test_multiratio.py covers every method)
    for point in [(0.5, 0.8), (1.0, 0.5)]:
        tag = "ratio-0.5-density-0.8" if point == (0.5, 0.8) else "ratio-1.0-density-0.5"
        kept = tmp_path / "ta" if point == (data["chosen"], data["chosen_density"]) else tmp_path / "ta.sweep" / tag
        point_recipe = yaml.safe_load(recipe.read_text())
        point_recipe["merge"].update(ratio=point[0], density=point[1])
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(point_recipe))
        sep = tmp_path / f"sep-{tag}"
        built = CliRunner().invoke(cli, ["build", str(tmp_path / "p.yaml"), "--output", str(sep)])
        assert built.exit_code == 0, built.output
        a, b = load_file(kept / "model.safetensors"), load_file(sep / "model.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), point
    again = CliRunner().invoke(cli, ["sweep", str(recipe), "--densities", "0.5,0.8"])
    assert again.exit_code == 0 and "sweep already done" in again.output


def test_sweep_refuses_densities_without_sparsification(tiny_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_family)  # linear
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--densities", "0.5"])
    assert result.exit_code == 2 and "sweep.densities" in result.output and "no density" in result.output
    recipe = _recipe(tmp_path, tiny_family, method="dare_ties")
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--densities", "0,0.5"])
    assert result.exit_code == 2 and "density must be in (0, 1]" in result.output


def test_sweep_resumes_ratio_by_ratio(tiny_family, tmp_path):
    """Kill the sweep after some ratios were measured: the next run re-measures none of them."""
    recipe = _recipe(tmp_path, tiny_family, method="dare_ties", ratios=(0.25, 0.5, 0.75))
    work = tmp_path / "ta.sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "micota_merge.cli", "sweep", str(recipe)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (work / "ratio-0.25.stats.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "ratio-0.25.stats.json").is_file(), "the sweep never finished its first ratio"
    assert not (tmp_path / "ta").exists()
    done = {
        p.name: p.stat().st_mtime_ns
        for p in work.glob("*.probe.jsonl")
        if (work / p.name.replace(".probe.jsonl", ".stats.json")).is_file()
    }
    assert {"short_cot.probe.jsonl", "long_cot.probe.jsonl", "ratio-0.25.probe.jsonl"} <= set(done)
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--keep-all"])
    assert result.exit_code == 0, result.output
    for name, mtime in done.items():
        assert (work / name).stat().st_mtime_ns == mtime, f"{name} was measured again"
    data = json.loads((tmp_path / "ta" / "sweep" / "sweep.json").read_text())
    assert [r["ratio"] for r in data["ratios"]] == [0.25, 0.5, 0.75]
    assert all(r["records"] == 2 for r in data["ratios"])
    probe = [
        json.loads(line) for line in (tmp_path / "ta" / "sweep" / "ratio-0.5.probe.jsonl").read_text().splitlines()
    ]
    assert len(probe) == 2 and len({r["id"] for r in probe}) == 2


def test_sweep_refuses_bad_ratios(tiny_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_family)
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--ratios", "0.2,1.7"])
    assert result.exit_code == 2 and "between 0 and 1" in result.output
    result = CliRunner().invoke(cli, ["sweep", str(recipe), "--ratios", "a,b"])
    assert result.exit_code == 2
