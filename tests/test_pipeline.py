"""run: stage skipping, restart after a kill, reruns of what a changed option touches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from micota_merge.cli import cli
from micota_merge.pipeline.run import Runner


def _runner(tmp_path, **kw):
    return Runner(tmp_path, echo=lambda *_: None, **kw)


def test_done_stage_is_skipped_and_changed_one_reruns_fresh(tmp_path):
    calls = []
    r = _runner(tmp_path)
    assert r.stage("generate", "gen", tmp_path / "g", "fp1", lambda fresh: calls.append(fresh))
    r2 = _runner(tmp_path)
    assert not r2.stage("generate", "gen", tmp_path / "g", "fp1", lambda fresh: calls.append(fresh))
    assert r2.skipped == ["gen"]
    r3 = _runner(tmp_path)
    assert r3.stage("generate", "gen", tmp_path / "g", "fp2", lambda fresh: calls.append(fresh))
    assert calls == [False, True], "a first run resumes (nothing to lose); a changed fingerprint starts over"
    assert json.loads((tmp_path / "g" / "stage.json").read_text())["status"] == "done"


def test_killed_stage_resumes_instead_of_starting_over(tmp_path):
    def killed(fresh):
        raise KeyboardInterrupt  # stands for a kill in the middle of the stage

    with pytest.raises(KeyboardInterrupt):
        _runner(tmp_path).stage("distill", "d", tmp_path / "d", "fp", killed)
    assert json.loads((tmp_path / "d" / "stage.json").read_text())["status"] == "running"
    calls = []
    _runner(tmp_path).stage("distill", "d", tmp_path / "d", "fp", lambda fresh: calls.append(fresh))
    assert calls == [False]


def test_from_forces_later_stages_and_until_stops(tmp_path):
    for kind in ("build", "generate", "eval"):
        _runner(tmp_path).stage(kind, kind, tmp_path / kind, "fp", lambda fresh: None)
    r = _runner(tmp_path, run_from="generate", until="eval")
    calls = {}
    for kind in ("build", "generate", "eval"):
        r.stage(kind, kind, tmp_path / kind, "fp", lambda fresh, k=kind: calls.setdefault(k, fresh))
    assert calls == {"generate": True, "eval": True} and r.skipped == ["build"]
    assert r.active("eval") and not r.active("report")


def test_bare_recipe_runs_only_the_build_and_then_nothing(tiny_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {k: str(v) for k, v in tiny_family.items()},
                "merge": {"method": "linear", "ratio": 0.5, "dtype": "bfloat16"},
                "output": str(tmp_path / "ta"),
            }
        )
    )
    first = CliRunner().invoke(cli, ["run", str(recipe)])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ta" / "micota.json").is_file() and "[run ] build" in first.output
    second = CliRunner().invoke(cli, ["run", str(recipe)])
    assert second.exit_code == 0 and "nothing to run" in second.output and "[done] build" in second.output
    # a changed option reruns the build
    data = yaml.safe_load(recipe.read_text())
    data["merge"]["ratio"] = 0.25
    recipe.write_text(yaml.safe_dump(data))
    third = CliRunner().invoke(cli, ["run", str(recipe)])
    assert third.exit_code == 0 and "[redo] build" in third.output
    assert json.loads((tmp_path / "ta" / "micota.json").read_text())["recipe"]["merge"]["ratio"] == 0.25


def test_pipeline_section_is_validated(tiny_family, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {k: str(v) for k, v in tiny_family.items()},
                "merge": {"method": "linear"},
                "output": str(tmp_path / "ta"),
                "pipeline": {"workdir": str(tmp_path / "w"), "student": "s", "mix": {"ta": 1, "long": 4}},
            }
        )
    )
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 2 and "mix part 'long'" in result.output
    result = CliRunner().invoke(cli, ["run", str(recipe), "--from", "nowhere"])
    assert result.exit_code == 2


def test_demo_pipeline_end_to_end_small(tmp_path):
    """The embedded default, shrunk: every stage runs for real and the report has numbers."""
    repo = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((repo / "micota_merge" / "recipes" / "pipeline" / "demo-pipeline.yaml").read_text())
    for role in ("long_cot", "short_cot", "base"):
        data["models"][role] = str(repo / data["models"][role])
    data["output"] = str(tmp_path / "w" / "ta")
    data["sweep"]["ratios"] = [0.3, 0.8]
    data["sweep"]["probe"].update(limit=12, questions=str(repo / data["sweep"]["probe"]["questions"]))
    p = data["pipeline"]
    student = tmp_path / "student"  # a copy, so its weights can be changed in place below
    shutil.copytree(repo / p["student"], student)
    p.update(
        workdir=str(tmp_path / "w"),
        student=str(student),
        questions=str(repo / p["questions"]),
        question_limit=40,
        baselines=["long_cot"],
        eval_teachers=False,
        distill_seeds=[0, 1],
    )
    p["distill"].update(epochs=1)
    p["eval"].update(limit=12)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(data))

    plan = CliRunner().invoke(cli, ["run", str(pipeline), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    for stage in (
        "build: teacher assistant (sweep)",
        "generate: ta data",
        "generate: long_cot data",
        "distill: student on ta data (seed 1)",
        "eval: student+long_cot@seed1",
        "report",
    ):
        assert f"[plan] {stage}: would run" in plan.output, plan.output
    assert not (tmp_path / "w").exists()  # a plan writes nothing

    first = CliRunner().invoke(cli, ["run", str(pipeline)])
    assert first.exit_code == 0, first.output
    report = (tmp_path / "w" / "report.md").read_text()
    for row in (
        "| student |",
        "| student+ta@seed0 |",
        "| student+long_cot@seed1 |",
        "| TA **chosen** |",
        "| student+ta | 2 |",
        "| student+long_cot | 2 |",
    ):
        assert row in report
    summary = json.loads((tmp_path / "w" / "report" / "summary.json").read_text())
    assert set(summary["scores"]) == {
        "student",
        "student+ta@seed0",
        "student+ta@seed1",
        "student+long_cot@seed0",
        "student+long_cot@seed1",
    }
    for s in summary["scores"].values():
        assert s["tasks"]["microworld"]["n"] == 12 and 0.0 <= s["average"] <= 1.0
    # the micro world's own check of whole answers, scored beside the final number: what the verifier
    # says of the very answers lm-eval saved
    from micota_merge.demo.verify import verify_records

    samples = next((tmp_path / "w" / "eval" / "student-ta-seed0").glob("**/samples_*.jsonl"))
    v = verify_records(samples)
    task = summary["scores"]["student+ta@seed0"]["tasks"]["microworld"]
    assert task["chain_accuracy"] == pytest.approx(v["chain_right"] / 12)
    assert task["values_accuracy"] == pytest.approx(v["values_right"] / 12)
    assert task["accuracy"] == pytest.approx(v["final_right"] / 12)
    assert "### Whole answers" in report and "| student+ta (2 seeds) |" in report
    # by difficulty: each model's share right on each group of questions is the verifier's on those questions
    from micota_merge.evaluation.summary import group_scores

    groups = group_scores(samples.parent, "microworld")
    want = {d: c for d, c in v["by_difficulty"].items()}
    assert {d: g["n"] for d, g in groups.items()} == {d: c["records"] for d, c in want.items()}
    for d, g in groups.items():
        assert g["accuracy"] == pytest.approx(want[d]["final_right"] / want[d]["records"])
        assert g["chain_accuracy"] == pytest.approx(want[d]["chain_right"] / want[d]["records"])
    assert "### microworld by question group" in report
    section = report.split("### microworld by question group", 1)[1]
    header = next(ln for ln in section.splitlines() if ln.startswith("| model |"))
    assert all(f"{d} ({c['records']})" in header for d, c in want.items())
    # each distillation seed is its own student (the seed reaches the trainer), and the report's
    # spread is over exactly those students
    from safetensors.torch import load_file

    w0, w1 = (
        load_file(tmp_path / "w" / "students" / "ta" / f"seed-{k}" / "model" / "model.safetensors") for k in (0, 1)
    )
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    group = summary["students"]["student+ta"]
    accs = [summary["scores"][f"student+ta@seed{k}"]["average"] for k in (0, 1)]
    assert group["seeds"] == [0, 1] and group["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert group["accuracy"]["min"] == min(accs) and group["accuracy"]["max"] == max(accs)
    sweep = json.loads((tmp_path / "w" / "ta" / "sweep" / "sweep.json").read_text())
    # Both ratios were possible answers (they write answers of clearly different lengths); the
    # choice must be the rule applied to what was measured: the closest mean length to the target
    # among the ratios within `tolerance` points of the best accuracy.
    rows = {r["ratio"]: r for r in sweep["ratios"]}
    assert abs(rows[0.3]["mean_tokens"] - rows[0.8]["mean_tokens"]) > 10
    best = max(r["accuracy"] for r in rows.values())
    eligible = [r for r in rows.values() if r["accuracy"] >= best - sweep["tolerance"] / 100 - 1e-12]
    expected = min(eligible, key=lambda r: abs(r["mean_tokens"] - sweep["target_tokens"]))["ratio"]
    assert sweep["chosen"] == expected
    for stage in ("data/ta", "students/ta/seed-0", "students/ta/seed-1", "eval/student-ta-seed1"):
        assert json.loads((tmp_path / "w" / stage / "stage.json").read_text())["status"] == "done"
    assert (tmp_path / "w" / "students" / "ta" / "seed-0" / "model" / "micota.json").is_file()
    # each distilled student's model card has its scores once they are known; the report states the
    # probe's questions and the data's decontamination
    from micota_merge.core import cards

    _, body = cards.read(tmp_path / "w" / "students" / "ta" / "seed-1" / "model")
    acc = summary["scores"]["student+ta@seed1"]["tasks"]["microworld"]["accuracy"]
    assert "## Scores" in body and f"{100 * acc:.1f}" in body
    assert "Probe questions: the first 12 of" in report and "| 0 of 40 |" in report

    again = CliRunner().invoke(cli, ["run", str(pipeline)])
    assert again.exit_code == 0 and "nothing to run" in again.output and "[run" not in again.output

    # Same path, same config, same shapes, other weights: the stages that read the student rerun,
    # the TA and its data do not (stage skipping decides by content, not by path or header).
    from safetensors.torch import save_file

    weights = load_file(student / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01
    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    plan = CliRunner().invoke(cli, ["run", str(pipeline), "--dry-run"])
    assert plan.exit_code == 0 and "[done] build" in plan.output, plan.output
    assert (
        f"[plan] distill: student on ta data (seed 0): would start over; replaces "
        f"{tmp_path / 'w' / 'students' / 'ta' / 'seed-0' / 'model'}"
    ) in plan.output
    assert "[plan] eval: student: would start over" in plan.output
    third = CliRunner().invoke(cli, ["run", str(pipeline)])
    assert third.exit_code == 0, third.output
    assert "[done] build" in third.output and "[done] generate: ta data" in third.output
    assert "[redo] distill: student on ta data" in third.output and "[redo] eval: student" in third.output


def test_spread_and_seed_groups():
    from micota_merge.pipeline.report import seed_groups, spread

    s = spread([0.2, 0.4, 0.3])  # core.stats' one spread: the report's students use it too
    assert {k: s[k] for k in ("mean", "sd", "min", "max", "n")} == pytest.approx(
        {"mean": 0.3, "sd": 0.1, "min": 0.2, "max": 0.4, "n": 3}
    )
    assert spread([0.5])["sd"] == 0.0
    scores = {
        "student": {"average": 0.1, "tasks": {"t": {"mean_tokens": 9}}},
        "teacher:ta": {"average": 0.9, "tasks": {"t": {"mean_tokens": 50}}},
        "student+ta@seed0": {"average": 0.2, "tasks": {"t": {"mean_tokens": 10}}},
        "student+ta@seed2": {"average": 0.4, "tasks": {"t": {"mean_tokens": 30}}},
        "student+mix_long": {"average": 0.3, "tasks": {"t": {"mean_tokens": 20}}},
    }
    groups = seed_groups(scores)
    assert set(groups) == {"student+ta", "student+mix_long"}
    assert groups["student+ta"]["seeds"] == [0, 2]
    assert groups["student+ta"]["accuracy"]["mean"] == pytest.approx(0.3)
    assert groups["student+ta"]["mean_tokens"]["sd"] == pytest.approx(14.142, abs=1e-3)
    assert groups["student+mix_long"]["seeds"] == [None]
    assert groups["student+ta"]["runs"] == ["student+ta@seed0", "student+ta@seed2"]
    # per task too; a figure a run lacks is left out of its spread, not counted as 0
    assert groups["student+ta"]["tasks"]["t"]["mean_tokens"]["mean"] == pytest.approx(20.0)
    assert groups["student+ta"]["tasks"]["t"]["accuracy"] is None
    scores["student+ta@seed1"] = {"average": None, "tasks": {"t": {"mean_tokens": None}, "u": {"accuracy": 0.5}}}
    groups = seed_groups(scores)
    assert groups["student+ta"]["seeds"] == [0, 2, 1]
    assert groups["student+ta"]["accuracy"]["n"] == 2 and groups["student+ta"]["mean_tokens"]["n"] == 2
    u = groups["student+ta"]["tasks"]["u"]["accuracy"]
    assert {k: u[k] for k in ("mean", "sd", "min", "max", "n")} == pytest.approx(
        {"mean": 0.5, "sd": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    )


def _summary(tasks: dict, average=None, max_tokens=400):
    """An eval summary.json as `micota-merge eval` writes it (only what the report reads)."""
    accs = [t["accuracy"] for t in tasks.values() if t.get("accuracy") is not None]
    return {
        "model": "m",
        "tasks": {n: {"samples": 1, "n": 200, **t} for n, t in tasks.items()},
        "average": (sum(accs) / len(accs) if accs else None) if average is None else average,
        "average_ci95": None,
        "max_tokens": max_tokens,
    }


def _write_runs(tmp_path, summaries: dict) -> dict:
    evals = {}
    for name, s in summaries.items():
        run = tmp_path / "eval" / name.replace(":", "-").replace("+", "-").replace("@", "-") / "run"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(s))
        evals[name] = run
    return evals


def _task(acc, ci, tokens, cut=0.0):
    return {"accuracy": acc, "ci95": ci, "mean_tokens": tokens, "truncated": cut}


def test_report_scores_table_and_chart(tmp_path, monkeypatch):
    """The report's score table: intervals as `eval --compare` writes them, Δ for distilled students
    only, "–" for what is missing, no average column for one task; the chart one bar per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from micota_merge.merge.recipe import PipelineSettings, Recipe
    from micota_merge.pipeline.report import chart_bars, write_report

    summaries = {
        "student": _summary({"microworld": _task(0.165, [0.115, 0.215], 117.1, 0.01)}),
        "student+ta@seed0": _summary({"microworld": _task(0.255, [0.195, 0.32], 210.6)}),
        "student+ta@seed1": _summary({"microworld": _task(0.205, [0.15, 0.265], 234.8)}),
        "student+long_cot@seed0": _summary({"microworld": _task(0.09, None, None)}),
        "student+long_cot@seed1": _summary({"microworld": _task(0.11, [0.07, 0.155], 331.7)}),
        "teacher:ta": _summary({"microworld": _task(0.98, [0.96, 0.995], 190.7)}),
    }
    evals = _write_runs(tmp_path, summaries)
    data_file = tmp_path / "data" / "ta" / "data.correct.jsonl"
    data_file.parent.mkdir(parents=True)
    data_file.write_text(json.dumps({"num_tokens": 10}) + "\n")
    recipe = Recipe.model_validate(
        {
            "name": "r",
            "models": {"long_cot": "a", "short_cot": "b"},
            "merge": {"method": "linear", "ratio": 0.5},
            "output": str(tmp_path / "ta"),
        }
    )
    settings = PipelineSettings(workdir=str(tmp_path), student="s")
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    write_report(tmp_path, recipe, settings, tmp_path / "ta", {"ta": (data_file, "")}, evals)
    report = (tmp_path / "report.md").read_text()
    assert "| model | microworld acc % (95 % CI) | microworld tokens | microworld cut % | Δ |" in report
    assert not [line for line in report.splitlines() if line.startswith("| model |") and "average" in line]
    assert "| student | 16.5 (11.5–21.5) | 117.1 | 1.0 |  |" in report  # not "(12%–22%)"
    assert "| student+ta@seed0 | 25.5 (19.5–32.0) | 210.6 | 0.0 | +9.0 |" in report
    assert "| student+long_cot@seed0 | 9.0 | – | 0.0 | -7.5 |" in report  # no interval, no tokens: "–", not 0
    assert "| teacher:ta | 98.0 (96.0–99.5) | 190.7 | 0.0 |  |" in report  # no Δ for a teacher
    assert "| student+ta | 2 | 23.0 ± 3.5 (20.5–25.5) | 222.7 ± 17.1 | +6.5 |" in report
    assert "| student+long_cot | 2 | 10.0 ± 1.4 (9.0–11.0) | 331.7 ± 0.0 | -6.5 |" in report
    assert "| ta | 1 | – | 10.0 |" not in report and "| ta (mix) | 1 | – | 10.0 |" in report
    assert (tmp_path / "report" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the chart: the untrained student, one bar per data set, the teachers; grey for the runs that are not
    # distilled students, a colour of its own for each data set
    bars = chart_bars(summaries)
    assert [b["kind"] for b in bars] == ["student", "distilled", "distilled", "teacher"]
    assert bars[1]["runs"] == ["student+ta@seed0", "student+ta@seed1"] and bars[1]["seeds"] == [0, 1]
    colors = [b["color"] for b in bars]
    assert len({colors[1], colors[2]}) == 2 and colors[0] not in colors[1:3] and colors[3] not in colors[1:3]
    fig = figs[-1]
    acc_ax = fig.axes[0]
    assert [t.get_text() for t in acc_ax.get_xticklabels()] == [b["label"] for b in bars]
    assert len(fig.axes) == 2  # one task: accuracy and length, no average panels
    values = sorted(t.get_text() for t in acc_ax.texts)  # one value per bar, the seeds' spread with it
    assert values == ["10.0\n±1.4", "16.5", "23.0\n±3.5", "98.0"]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:  # the legend below the axes and their tick labels, not over them
        assert legend.y1 <= ax.get_tightbbox(renderer).y0
    # several tasks: an average row, tasks in --compare's order
    more = {
        n: _summary({"gsm8k": _task(s["average"], None, 40.0), "math500": _task(0.1, None, 50.0)})
        for n, s in summaries.items()
    }
    from micota_merge.pipeline.report import scores_chart

    scores_chart(more, tmp_path / "more.png")
    titles = [ax.get_title() for ax in figs[-1].axes]
    assert titles == [
        "math500: accuracy",
        "math500: length",
        "gsm8k: accuracy",
        "gsm8k: length",
        "average over tasks: accuracy",
        "average over tasks: length",
    ]


def test_distill_seeds_must_be_distinct():
    from micota_merge.merge.recipe import PipelineSettings

    with pytest.raises(ValueError, match="distill_seeds must be distinct"):
        PipelineSettings(workdir="w", student="s", distill_seeds=[1, 1])
    with pytest.raises(ValueError):
        PipelineSettings(workdir="w", student="s", distill_seeds=[])
