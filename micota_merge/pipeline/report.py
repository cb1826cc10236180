"""`run`'s report: report.md with the sweep, the data, every model's scores and the students over seeds,
and the score chart (students grouped by data set, mean ± sd over seeds, teachers apart).

Figures use `eval --compare`'s formats (percent with one decimal); a missing figure is "–", never 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from micota_merge.core.artifacts import now, write_json_atomic, write_text_atomic
from micota_merge.core.stats import spread
from micota_merge.evaluation.benchmarks import VERIFIED_METRICS
from micota_merge.merge.recipe import PipelineSettings, Recipe


def write_report(
    workdir: Path,
    recipe: Recipe,
    settings: PipelineSettings,
    ta_dir: Path,
    data: dict[str, tuple[Path, str]],
    evals: dict[str, Path],
) -> None:
    from micota_merge.evaluation.summary import load_summary

    summaries = {name: load_summary(run) for name, run in evals.items()}
    report_dir = workdir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {recipe.name or 'micota-merge'}: pipeline report",
        "",
        f"Work folder: `{settings.workdir}` · written {now()}",
        "",
    ]
    lines += _chain_section(recipe, settings)
    lines += _sweep_section(ta_dir, report_dir)
    lines += _data_section(data)
    lines += _scores_section(summaries)
    groups = seed_groups(summaries)
    lines += _seeds_section(summaries, groups)
    lines += _chains_section(summaries, groups)
    lines += _question_groups_section(summaries, groups, evals)
    scores_chart(summaries, report_dir / "scores.png")
    lines += ["", "![scores](report/scores.png)", ""]
    losses = sorted((workdir / "students").glob("**/model/loss.png"))  # students/<data>[/seed-<n>]/model
    if losses:
        lines += ["## Training loss", ""] + [
            f"![{p.parent.parent.relative_to(workdir / 'students')}]({p.relative_to(workdir)})" for p in losses
        ]
    write_text_atomic(workdir / "report.md", "\n".join(lines) + "\n")
    write_json_atomic(
        report_dir / "summary.json",
        {"scores": summaries, "students": groups, "data": {n: str(f) for n, (f, _) in data.items()}},
    )


def _chain_section(recipe: Recipe, settings: PipelineSettings) -> list[str]:
    chain = settings.chain
    if chain is None:
        return []
    zero = recipe.models.base_is_short_cot()
    over = "short_cot itself (its task vector is zero)" if zero else f"`{recipe.models.base}`"
    return [
        "## The chain: long_cot made by the pipeline",
        "",
        f"The teacher `{chain.teacher}` answered the training questions (data set `teacher`); the TA's parent, "
        f"short_cot `{recipe.models.short_cot}`, was fine-tuned on its verified answers into long_cot "
        f"`{recipe.models.long_cot}`; the TA merges long_cot with short_cot by {recipe.merge.method} over {over}. "
        "The teacher and long_cot are scored below as `teacher:teacher` and `teacher:long_cot`.",
        "",
    ]


def _sweep_section(ta_dir: Path, report_dir: Path) -> list[str]:
    sweep_json = ta_dir / "sweep" / "sweep.json"
    if not sweep_json.is_file():
        return []
    sw = json.loads(sweep_json.read_text())
    shutil.copyfile(ta_dir / "sweep" / "sweep.png", report_dir / "sweep.png")
    lines = [
        "## Teacher assistant: merge-ratio sweep",
        "",
        sw["table_md"],
        "",
        f"Chosen: {sw['reason']}",
        "",
        *([f"Probe questions: {sw['probe_questions']}.", ""] if sw.get("probe_questions") else []),
        "![sweep](report/sweep.png)",
        "",
    ]
    if (ta_dir / "sweep" / "front.png").is_file():
        shutil.copyfile(ta_dir / "sweep" / "front.png", report_dir / "front.png")
        lines += ["![length-accuracy front](report/front.png)", ""]
    return lines


def _data_section(data: dict[str, tuple[Path, str]]) -> list[str]:
    from micota_merge.evaluation.summary import fmt_acc

    stats = {}
    for name, (file, _) in data.items():
        stats_file = file.parent / "data.stats.json"
        stats[name] = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    # where a verifier read whole answers (the micro world): how many of all answers were right by it
    verified = any("chain_correct" in st for st in stats.values())
    extra = " right by the final number / whole chain / its numbers (% of all answers) | kept by |" if verified else ""
    lines = [
        "## Distillation data",
        "",
        "| data | records kept | acceptance rate (%) | mean tokens | questions left out as benchmark overlap |" + extra,
        "| --- | ---: | ---: | ---: | ---: |" + (" ---: | --- |" if verified else ""),
    ]
    for name, (file, _) in data.items():
        st = stats[name]
        if "kept" in st:  # generate's statistics (a mix writes its composition under the same name)
            row = (
                f"| {name} | {st['kept']} | {fmt_acc(st.get('acceptance_rate'))} | "
                f"{_fmt_num((st.get('accepted_num_tokens') or {}).get('mean'))} | {_overlap(st)} |"
            )
            if verified:
                n = st.get("records") or 0
                shares = [
                    st.get(k) / n if n and st.get(k) is not None else None
                    for k in ("correct", "chain_correct", "values_correct")
                ]
                row += " " + " / ".join(fmt_acc(x) for x in shares) + f" | {st.get('keep', 'correct')} |"
            lines.append(row)
        else:
            recs = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
            mean = sum(r.get("num_tokens", 0) for r in recs) / len(recs) if recs else None
            lines.append(
                f"| {name} (mix) | {len(recs)} | – | {_fmt_num(mean)} | – |" + (" – | – |" if verified else "")
            )
    return lines


def _overlap(stats: dict) -> str:
    """ "dropped of checked (per benchmark)" from generate's decontamination; "–" where nothing was checked."""
    d = stats.get("decontamination") or {}
    if not d or d.get("mode") == "off":
        return "–"
    per = ", ".join(f"{b} {k}" for b, k in d.get("overlapping", {}).items())
    kept = " kept" if d.get("mode") == "warn" and d.get("overlapping_questions") else ""
    return f"{d.get('dropped', 0)} of {d.get('checked', 0)}" + (f" ({per}{kept})" if per else "")


def _delta(summaries: dict[str, dict], name: str, value: Optional[float]) -> str:
    """Accuracy change against the untrained student, for the distilled students only."""
    before = summaries.get("student")
    if before is None or not name.startswith("student+") or value is None or before.get("average") is None:
        return ""
    return f"{(value - before['average']) * 100:+.1f}"


def _scores_section(summaries: dict[str, dict]) -> list[str]:
    # the figures in the formats of `eval --compare`: percent with one decimal, "–" for what is missing
    from micota_merge.evaluation.summary import acc_cell, fmt_acc

    tasks = _task_order(summaries)
    several = len(tasks) > 1  # one task's average is the task itself: no average column
    lines = [
        "",
        "## Scores",
        "",
        "Accuracy in % (avg@k; with one greedy answer the papers' pass@1) with its 95 % "
        "bootstrap interval, mean response tokens and the share of answers cut at the length cap (%) per task; "
        "Δ is a distilled student's accuracy change in points against the untrained student "
        "(`micota-merge eval --compare` tests it).",
        "",
    ]
    header = (
        "| model | "
        + " | ".join(f"{t} acc % (95 % CI) | {t} tokens | {t} cut %" for t in tasks)
        + (" | average % | Δ avg |" if several else " | Δ |")
    )
    lines += [header, "| --- |" + " ---: | ---: | ---: |" * len(tasks) + (" ---: | ---: |" if several else " ---: |")]
    for name, s in summaries.items():
        cells = []
        for t in tasks:
            r = s["tasks"].get(t) or {}
            cells += [acc_cell(r), _fmt_num(r.get("mean_tokens")), fmt_acc(r.get("truncated"))]
        if several:
            cells.append(fmt_acc(s.get("average")))
        cells.append(_delta(summaries, name, s.get("average")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _seeds_section(summaries: dict[str, dict], groups: dict[str, dict]) -> list[str]:
    if not any(len(g["seeds"]) > 1 for g in groups.values()):
        return []
    several = len(_task_order(summaries)) > 1
    lines = [
        "",
        "### Students over distillation seeds",
        "",
        "Mean ± sample standard deviation over the seeds (min–max in brackets) of the "
        + ("average " if several else "")
        + "accuracy (%) and of the mean response tokens; "
        "Δ in points against the untrained student.",
        "",
        "| student data | seeds | accuracy % | mean tokens | Δ |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, g in groups.items():
        acc, tok = g["accuracy"], g["mean_tokens"]
        lines.append(
            f"| {name} | {len(g['seeds'])} | {_fmt_spread(acc, 100)} | "
            f"{_fmt_spread(tok, 1, brackets=False)} | {_delta(summaries, name, acc['mean'] if acc else None)} |"
        )
    return lines


def _chains_section(summaries: dict[str, dict], groups: dict[str, dict]) -> list[str]:
    """Where a benchmark checks whole answers (the micro world): the final number, the whole chain and
    its numbers, side by side; the distilled students over their seeds."""
    from micota_merge.evaluation.summary import fmt_acc

    tasks = [
        t
        for t in _task_order(summaries)
        if any(VERIFIED_METRICS.keys() & (s["tasks"].get(t) or {}).keys() for s in summaries.values())
    ]
    if not tasks:
        return []
    lines = [
        "",
        "### Whole answers",
        "",
        "Right by the final number, by the whole chain (every person, thing, amount and value the question "
        "states: `micota_merge/demo/verify.py`) and by the chain's numbers alone, in %; the distilled "
        "students as mean ± sample sd over their seeds.",
        "",
        "| model | " + " | ".join(f"{t} final number | {t} whole chain | {t} numbers" for t in tasks) + " |",
        "| --- |" + " ---: | ---: | ---: |" * len(tasks),
    ]
    grouped = {run for g in groups.values() for run in g["runs"] if len(g["runs"]) > 1}
    for name, s in summaries.items():
        if name in grouped:
            continue
        cells = [fmt_acc((s["tasks"].get(t) or {}).get(k)) for t in tasks for k in VERIFIED_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, g in groups.items():
        if len(g["runs"]) < 2:
            continue
        cells = [_fmt_spread(g["tasks"][t].get(k), 100, brackets=False) for t in tasks for k in VERIFIED_KEYS]
        lines.append(f"| {name} ({len(g['runs'])} seeds) | " + " | ".join(cells) + " |")
    return lines


VERIFIED_KEYS = ("accuracy", *VERIFIED_METRICS)


def _question_groups_section(summaries: dict[str, dict], groups: dict[str, dict], evals: dict[str, Path]) -> list[str]:
    """Where a benchmark groups its questions (the micro world's difficulty): every model's final-number
    accuracy (and whole-chain accuracy where verified) by group; the distilled students over their seeds."""
    from micota_merge.evaluation import benchmarks
    from micota_merge.evaluation.summary import fmt_acc, group_scores

    lines: list[str] = []
    grouped = {run for g in groups.values() for run in g["runs"] if len(g["runs"]) > 1}
    for task in _task_order(summaries):
        scores = {name: group_scores(evals[name], task) for name in summaries if name in evals}
        scores = {name: sc for name, sc in scores.items() if sc}
        if not scores:
            continue
        names = list(dict.fromkeys(g for sc in scores.values() for g in sc))
        verified = any(VERIFIED_METRICS.keys() & sc[g].keys() for sc in scores.values() for g in sc)
        keys = ("accuracy", "chain_accuracy") if verified else ("accuracy",)
        counts = {g: max(sc[g]["n"] for sc in scores.values() if g in sc) for g in names}
        lines += [
            "",
            f"### {task} by question group",
            "",
            "Right by the final number" + (" / by the whole chain" if verified else "") + ", in %, per group of "
            f"questions (`{benchmarks.get(task).groups}`); the distilled students as mean ± sample sd over their "
            "seeds.",
            "",
            "| model | " + " | ".join(f"{g} ({counts[g]})" for g in names) + " |",
            "| --- |" + " ---: |" * len(names),
        ]
        for name, sc in scores.items():
            if name not in grouped:
                cells = [" / ".join(fmt_acc((sc.get(g) or {}).get(k)) for k in keys) for g in names]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for base, g in groups.items():
            runs = [r for r in g["runs"] if r in scores]
            if len(runs) < 2:
                continue
            cells = []
            for grp in names:
                parts = [_spread_or_none([(scores[r].get(grp) or {}).get(k) for r in runs]) for k in keys]
                cells.append(" / ".join(_fmt_spread(sp, 100, brackets=False) for sp in parts))
            lines.append(f"| {base} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return lines


def _task_order(summaries: dict[str, dict]) -> list[str]:
    """The tasks scored, in `eval --compare`'s order (the known tasks first, then any other by name)."""
    from micota_merge.evaluation import benchmarks

    known = benchmarks.papers() + tuple(b for b in benchmarks.names() if b not in benchmarks.papers())
    names = {t for s in summaries.values() for t in s["tasks"]}
    return [t for t in known if t in names] + sorted(names - set(known))


def _fmt_num(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.1f}"


def _fmt_spread(sp: Optional[dict], scale: float, brackets: bool = True) -> str:
    """mean ± sd (min–max), one decimal, scaled (100 for shares in %); "–" when nothing was measured."""
    if not sp:
        return "–"
    text = f"{scale * sp['mean']:.1f} ± {scale * sp['sd']:.1f}"
    return text + (f" ({scale * sp['min']:.1f}–{scale * sp['max']:.1f})" if brackets else "")


def _spread_or_none(values: list[Optional[float]]) -> Optional[dict]:
    present = [v for v in values if v is not None]
    return spread(present) if present else None


def _mean_tokens(summary: dict) -> Optional[float]:
    toks = [t.get("mean_tokens") for t in summary["tasks"].values() if t.get("mean_tokens") is not None]
    return sum(toks) / len(toks) if toks else None


def seed_groups(summaries: dict[str, dict]) -> dict[str, dict]:
    """The distilled students grouped over their distillation seeds ("student+ta@seed1" -> "student+ta"):
    for each data set its seeds, runs, the spread of the average accuracy and of the mean tokens, and
    per task the spread of accuracy, mean tokens and truncated share. A missing figure is left out of
    its spread (a spread of nothing is None)."""
    groups: dict[str, dict] = {}
    for name, s in summaries.items():
        if not name.startswith("student+"):
            continue
        base, _, seed = name.partition("@seed")
        g = groups.setdefault(base, {"seeds": [], "runs": [], "acc": [], "tok": [], "tasks": {}})
        g["seeds"].append(int(seed) if seed else None)
        g["runs"].append(name)
        g["acc"].append(s.get("average"))
        g["tok"].append(_mean_tokens(s))
        for task in s["tasks"]:
            g["tasks"].setdefault(task, None)
    out = {}
    for base, g in groups.items():
        per_task = {}
        for task in g["tasks"]:
            rows = [summaries[run]["tasks"].get(task) or {} for run in g["runs"]]
            per_task[task] = {
                key: _spread_or_none([r.get(key) for r in rows])
                for key in ("accuracy", "mean_tokens", "truncated", *VERIFIED_METRICS)
            }
        out[base] = {
            "seeds": g["seeds"],
            "runs": g["runs"],
            "accuracy": _spread_or_none(g["acc"]),
            "mean_tokens": _spread_or_none(g["tok"]),
            "tasks": per_task,
        }
    return out


# ------------------------------------------------------------------ the score chart

# one colour per data set; grey is kept for the untrained student and the teachers
_DATA_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def chart_bars(summaries: dict[str, dict]) -> list[dict]:
    """The score chart's bars, left to right: the untrained student, one bar per data set (its
    distilled students over their seeds), then the teachers (and any other run), each with its
    kind ("student", "distilled", "teacher", "other"), label, colour and runs."""
    groups = seed_groups(summaries)
    bars = []
    if "student" in summaries:
        bars.append({"kind": "student", "label": "untrained\nstudent", "color": "0.45", "runs": ["student"]})
    for i, (name, g) in enumerate(groups.items()):
        data_name = name.removeprefix("student+")
        n = len(g["seeds"])
        bars.append(
            {
                "kind": "distilled",
                "label": f"on {data_name}" + (f"\n{n} seeds" if n > 1 else ""),
                "color": _DATA_COLORS[i % len(_DATA_COLORS)],
                "runs": g["runs"],
                "seeds": g["seeds"],
            }
        )
    for name in summaries:
        if name.startswith("teacher:"):
            bars.append(
                {
                    "kind": "teacher",
                    "label": "teacher\n" + name.removeprefix("teacher:"),
                    "color": "0.75",
                    "runs": [name],
                }
            )
        elif name != "student" and not name.startswith("student+"):
            bars.append({"kind": "other", "label": name, "color": "0.75", "runs": [name]})
    return bars


def _values(summaries: dict[str, dict], runs: list[str], task: Optional[str], key: str) -> list[Optional[float]]:
    """One figure per run: a task's accuracy / mean_tokens / truncated, or (task None) the average."""
    out = []
    for run in runs:
        s = summaries[run]
        if task is None:
            if key == "accuracy":
                out.append(s.get("average"))
            elif key == "mean_tokens":
                out.append(_mean_tokens(s))
            else:
                cuts = [t.get("truncated") for t in s["tasks"].values() if t.get("truncated") is not None]
                out.append(sum(cuts) / len(cuts) if cuts else None)
        else:
            out.append((s["tasks"].get(task) or {}).get(key))
    return out


def scores_chart(summaries: dict[str, dict], path: Path) -> None:
    """Accuracy and mean response tokens per task (and the average, with several tasks): one
    coloured bar per data set at the mean over its distillation seeds, ± their standard deviation,
    with each seed's score as a dot; the untrained student and the teachers (one run each, with
    their 95 % interval) in grey, set apart. Values are written once per bar; the legend sits below
    the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = chart_bars(summaries)
    tasks = _task_order(summaries)
    rows: list[Optional[str]] = tasks + ([None] if len(tasks) > 1 else [])  # None: the average
    xs, seps = _bar_positions(bars)
    panel_w = max(5.0, 0.8 * len(bars) + 1.2)
    fig, axes = plt.subplots(len(rows), 2, figsize=(2 * panel_w, 4.4 * len(rows)), squeeze=False)
    sampled = any((t.get("samples") or 1) > 1 for s in summaries.values() for t in s["tasks"].values())
    caps = {s.get("max_tokens") for s in summaries.values()}
    cap = next(iter(caps)) if len(caps) == 1 else None
    for row, task in zip(axes, rows):
        for ax, key in zip(row, ("accuracy", "mean_tokens")):
            top = max([1.0] + [_bar(ax, b, bx, summaries, task, key) for b, bx in zip(bars, xs)])
            for sx in seps:
                ax.axvline(sx, color="0.6", ls=":", lw=0.8)
            _style_panel(ax, key, task, top, cap, sampled)
            ax.set_xticks(xs, [b["label"] for b in bars], fontsize=8)
            ax.set_xlim(xs[0] - 0.6, xs[-1] + 0.6) if xs else None
    fig.tight_layout()
    handles = _legend_handles(bars, cap)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _bar_positions(bars: list[dict]) -> tuple[list[float], list[float]]:
    """x positions with a gap between the untrained student, the distilled students and the teachers,
    and where the separating lines go."""
    xs, x, last = [], 0.0, None
    for b in bars:
        kind = "single" if b["kind"] in ("teacher", "other") else b["kind"]
        if last is not None and kind != last:
            x += 0.5
        xs.append(x)
        x += 1.0
        last = kind
    seps = [(xs[i - 1] + xs[i]) / 2 for i in range(1, len(bars)) if xs[i] - xs[i - 1] > 1.0]
    return xs, seps


def _bar(ax, b: dict, bx: float, summaries: dict[str, dict], task: Optional[str], key: str) -> float:
    """One bar with its spread (seeds) or interval (one run), its seeds as dots and its value written once;
    returns how high it reaches (0 for a bar with nothing measured, which is not drawn: a 0 would claim a
    result)."""
    scale = 100.0 if key == "accuracy" else 1.0
    vals = [scale * v for v in _values(summaries, b["runs"], task, key) if v is not None]
    if not vals:
        return 0.0
    mean = sum(vals) / len(vals)
    sd = spread(vals)["sd"]
    seeds = b["kind"] == "distilled" and len(vals) > 1
    lo = hi = 0.0
    if seeds:
        lo = hi = sd
    elif key == "accuracy" and len(b["runs"]) == 1:
        t = summaries[b["runs"][0]]
        ci = t.get("average_ci95") if task is None else (t["tasks"].get(task) or {}).get("ci95")
        if ci:
            lo, hi = max(mean - 100 * ci[0], 0.0), max(100 * ci[1] - mean, 0.0)
    edge = "0.25" if b["kind"] != "distilled" else None
    ax.bar(bx, mean, 0.7, color=b["color"], edgecolor=edge, lw=0.6, zorder=2)
    if lo or hi:
        ax.errorbar(bx, mean, yerr=[[lo], [hi]], fmt="none", ecolor="black", capsize=4, lw=1, zorder=3)
    if seeds:
        jitter = [(-0.18 + 0.36 * k / (len(vals) - 1)) for k in range(len(vals))]
        ax.scatter([bx + j for j in jitter], vals, s=16, color="white", edgecolors="black", lw=0.8, zorder=4)
    peak = max([mean + hi] + vals)
    text = f"{mean:.1f}" if key == "accuracy" else f"{mean:.0f}"
    if seeds:
        text += f"\n±{sd:.1f}" if key == "accuracy" else f"\n±{sd:.0f}"
    if key == "mean_tokens":
        cut = [c for c in _values(summaries, b["runs"], task, "truncated") if c is not None]
        if cut and sum(cut) / len(cut) > 0:
            text += f"\n{100 * sum(cut) / len(cut):.0f}% cut"
    ax.annotate(
        text,
        (bx, peak),
        xytext=(0, 5),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=7.5,
        linespacing=1.0,
        zorder=5,
        bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.3},
    )
    return peak


def _style_panel(ax, key: str, task: Optional[str], top: float, cap: Optional[int], sampled: bool) -> None:
    where = task or "average over tasks"
    if key == "accuracy":
        ax.set_ylim(0, min(100.0, top) * 1.25 + 2)
        ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
        ax.set_ylabel("avg@k (%)" if sampled else "accuracy (%, pass@1)")
        ax.set_title(f"{where}: accuracy", pad=8)
    else:
        if cap:
            ax.axhline(cap, color="black", ls="--", lw=1, zorder=1)
            top = max(top, cap)
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel("mean response tokens")
        ax.set_title(f"{where}: length", pad=8)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)


def _legend_handles(bars: list[dict], cap: Optional[int]) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="0.45", edgecolor="0.25", label="untrained student (one run, bar: 95 % CI)")]
    seeded = any(b["kind"] == "distilled" and len(b["runs"]) > 1 for b in bars)
    if any(b["kind"] == "distilled" for b in bars):
        handles.append(
            Patch(
                facecolor="tab:blue",
                label="distilled student, one colour per data set"
                + (": mean ± sd over distillation seeds" if seeded else ""),
            )
        )
    if seeded:
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="black", label="one distillation seed"))
    if any(b["kind"] in ("teacher", "other") for b in bars):
        handles.append(Patch(facecolor="0.75", edgecolor="0.25", label="teacher (one run, bar: 95 % CI)"))
    if cap:
        handles.append(Line2D([], [], color="black", ls="--", lw=1, label=f"length cap ({cap} tokens)"))
    return handles
