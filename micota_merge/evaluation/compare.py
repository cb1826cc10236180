"""`eval --compare`: finished runs side by side (Markdown, JSON and a bar chart with the intervals), each
difference tested against the first run with a paired bootstrap over the questions both answered."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from micota_merge.core.artifacts import (
    atomic_dir,
    write_json_atomic,
    write_text_atomic,
)
from micota_merge.core.errors import UserError
from micota_merge.evaluation import benchmarks as registry
from micota_merge.evaluation import scoring
from micota_merge.evaluation.summary import acc_cell, describe, fmt_acc, fmt_ci, fmt_tok, load_summary

Echo = Callable[[str], None]


def _labels(runs: Sequence[Path]) -> list[str]:
    labels = [p.name or str(p) for p in runs]
    if len(set(labels)) < len(labels):
        labels = [str(p) for p in runs]
    return labels


def compare_markdown(labels: Sequence[str], summaries: Sequence[dict], tests: Sequence[dict] = ()) -> str:
    benches = [b for b in registry.names() if any(b in s["tasks"] for s in summaries)]
    header = (
        "| benchmark | " + " | ".join(f"{lab} acc % (95 % CI) | {lab} tokens | {lab} trunc %" for lab in labels) + " |"
    )
    rule = "| --- |" + " ---: | ---: | ---: |" * len(labels)
    lines = [header, rule]
    for bench in benches:
        cells = []
        for s in summaries:
            t = s["tasks"].get(bench) or {}
            cells += [acc_cell(t), fmt_tok(t.get("mean_tokens")), fmt_acc(t.get("truncated"))]
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    cells = []
    for s in summaries:
        avg = fmt_acc(s.get("average")) + (f" ({fmt_ci(s['average_ci95'])})" if s.get("average_ci95") else "")
        cells += [f"**{avg}**", fmt_tok(s.get("mean_tokens")), ""]
    lines.append("| **average** | " + " | ".join(cells) + " |")
    notes = [
        f"- {lab}: {s.get('model', '?')}"
        + (f", {describe(s)}" if s.get("protocol") else "")
        + (f", {s['limit']} per task" if s.get("limit") else "")
        + (f", max {s['max_tokens']} tokens" if s.get("max_tokens") else "")
        for lab, s in zip(labels, summaries)
    ]
    if len({tuple(sorted(s["tasks"])) for s in summaries}) > 1:
        notes.append("- the runs scored different benchmarks: each average is over its own, so they do not compare")
    out = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    for test in tests:
        out += "\n" + paired_markdown(test)
    return out


def paired_markdown(test: dict) -> str:
    lines = [
        f"Paired bootstrap, {test['run']} − {test['against']} (points; questions both answered, "
        f"{test['draws']} draws, seed {test['seed']}):",
        "",
        "| benchmark | Δ | 95 % CI | p | questions | verdict |",
        "| --- | ---: | :---: | ---: | ---: | --- |",
    ]
    rows = list(test["tasks"].items()) + ([("**average**", test["average"])] if test.get("average") else [])
    for bench, r in rows:
        if r.get("difference") is None:
            lines.append(f"| {bench} | – | – | – | – | {r.get('note', 'not comparable')} |")
            continue
        verdict = "**significant**" if r["significant"] else "noise (CI includes 0)"
        lines.append(
            f"| {bench} | {100 * r['difference']:+.1f} | {100 * r['ci95'][0]:+.1f} to "
            f"{100 * r['ci95'][1]:+.1f} | {r['p_value']:.3f} | {r.get('questions', '')} | {verdict} |"
        )
    if test.get("average_note"):
        lines += ["", test["average_note"]]
    return "\n".join(lines) + "\n"


def per_question_scores(run: Path, summary: dict, bench: str) -> Optional[dict[int, list[float]]]:
    """{doc_id: [score of each answer]} from a run's per-sample log, None when it is not there."""
    name = (summary.get("files") or {}).get("samples", {}).get(bench)
    path = run / name if name else None
    if path is None or not path.is_file():
        return None
    scores = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            if "samples" in rec:
                scores[int(rec["doc_id"])] = [float(x["correct"]) for x in rec["samples"]]
            elif "correct" in rec:  # a greedy run written before k samples existed
                scores[int(rec["doc_id"])] = [float(rec["correct"])]
    return scores


def paired_tests(
    paths: Sequence[Path],
    labels: Sequence[str],
    summaries: Sequence[dict],
    seed: int = 0,
    draws: int = scoring.BOOTSTRAP_DRAWS,
) -> list[dict]:
    """Each run after the first against the first: per benchmark and on the average."""
    tests = []
    base_dir = paths[0] if paths[0].is_dir() else paths[0].parent
    for path, lab, s in zip(paths[1:], labels[1:], summaries[1:]):
        run_dir = path if path.is_dir() else path.parent
        test = {"run": lab, "against": labels[0], "seed": seed, "draws": draws, "tasks": {}}
        pairs = []
        for bench in [b for b in registry.names() if b in s["tasks"] and b in summaries[0]["tasks"]]:
            a = per_question_scores(run_dir, s, bench)
            b = per_question_scores(base_dir, summaries[0], bench)
            if not a or not b:
                test["tasks"][bench] = {"difference": None, "note": "per-sample log missing"}
                continue
            common = sorted(set(a) & set(b))
            if not common:
                test["tasks"][bench] = {"difference": None, "note": "no question in common"}
                continue
            ta, tb = [a[q] for q in common], [b[q] for q in common]
            test["tasks"][bench] = {
                **scoring.paired_bootstrap([ta], [tb], seed=seed, draws=draws),
                "questions": len(common),
            }
            pairs.append((ta, tb))
        if pairs:
            test["average"] = {
                **scoring.paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], seed=seed, draws=draws)
            }
            if len(pairs) < len(set(s["tasks"]) | set(summaries[0]["tasks"])):
                test["average_note"] = (
                    f"The average test is over the {len(pairs)} benchmarks both runs "
                    "scored, on the questions both answered."
                )
        tests.append(test)
    return tests


def _or_nan(x) -> float:
    """A missing score draws no bar (0 would claim a result that was never measured)."""
    return float("nan") if x is None else float(x)


def _run_colors(n: int) -> list:
    """n distinct colours: tab10 up to 10 runs, tab20 up to 20, then a continuous map (never a repeat)."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / (n - 1)) for i in range(n)]


def compare_chart(labels: Sequence[str], summaries: Sequence[dict], path: Path) -> None:
    """Grouped bars: accuracy per benchmark (and the average, when there are several) with 95 %
    intervals; mean tokens per benchmark with the length cap drawn and the share truncated written
    on each bar. One colour per run, the legend outside the axes; with many runs the values are
    written upright so that neighbours do not collide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in registry.names() if any(b in s["tasks"] for s in summaries)]
    groups = benches + (["average"] if len(benches) > 1 else [])  # one task's average is the task
    n = max(len(summaries), 1)
    width = 0.8 / n
    upright = n > 4  # side by side, horizontal values overlap past a few bars
    fig, (ax_acc, ax_tok) = plt.subplots(
        1,
        2,
        figsize=(min(20, 4 + max(len(groups), 1) * max(2.0, 0.45 * n)), 5.2),
        gridspec_kw={"width_ratios": [len(groups), max(len(benches), 1)]},
    )
    colors = _run_colors(n)
    top_acc, top_tok = 1.0, 1.0
    label_kw = dict(textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90 if upright else 0)
    for i, (lab, s) in enumerate(zip(labels, summaries)):
        color = colors[i]
        rows = [(s["tasks"].get(b) or {}) for b in benches]
        acc = [100 * _or_nan(t.get("accuracy")) for t in rows]
        cis = [t.get("ci95") for t in rows]
        if len(groups) > len(benches):
            acc.append(100 * _or_nan(s.get("average")))
            cis.append(s.get("average_ci95"))
        err = [
            [0.0 if not ci or math.isnan(a) else max(a - 100 * ci[0], 0.0) for a, ci in zip(acc, cis)],
            [0.0 if not ci or math.isnan(a) else max(100 * ci[1] - a, 0.0) for a, ci in zip(acc, cis)],
        ]
        offs = [x + (i - (n - 1) / 2) * width for x in range(len(groups))]
        ax_acc.bar(
            offs,
            acc,
            width,
            label=lab,
            color=color,
            yerr=err,
            capsize=min(3, 30 / n),
            ecolor="black",
            error_kw={"lw": 0.8},
        )
        for x, a, hi in zip(offs, acc, err[1]):
            if not math.isnan(a):
                # the value on every bar, so a 0 % bar is seen as measured, not missing
                ax_acc.annotate(f"{a:.1f}" if a < 10 else f"{a:.0f}", (x, a + hi), xytext=(0, 2), **label_kw)
                top_acc = max(top_acc, a + hi)
        tok = [_or_nan(t.get("mean_tokens")) for t in rows]
        ax_tok.bar(offs[: len(benches)], tok, width, label=lab, color=color)
        for x, ntok, t in zip(offs, tok, rows):
            if not math.isnan(ntok):
                trunc = t.get("truncated")
                cut = f"{100 * trunc:.0f}% cut" if trunc else ""
                text = f"{ntok:.0f}" + ((f" ({cut})" if upright else f"\n{cut}") if cut else "")
                ax_tok.annotate(text, (x, ntok), xytext=(0, 2), **label_kw)
                top_tok = max(top_tok, ntok)
    # the length cap: answers at it were cut off (one black line when every run had the same)
    caps = [s.get("max_tokens") for s in summaries]
    for i, cap in enumerate(caps):
        if not cap or (len(set(caps)) == 1 and i > 0):
            continue
        color = "black" if len(set(caps)) == 1 else colors[i]
        ax_tok.axhline(cap, color=color, ls="--", lw=1)
        top_tok = max(top_tok, cap)
    # head room for the values written above the bars (upright ones are taller)
    room = 1.3 if upright else 1.15
    ax_acc.set_ylim(0, min(100, top_acc) * room + 2)
    ax_acc.set_yticks([t for t in ax_acc.get_yticks() if 0 <= t <= 100])  # head room is not a score
    ax_tok.set_ylim(0, top_tok * (room + 0.05))
    tilt = {"rotation": 20, "ha": "right"} if len(groups) > 3 else {}
    ax_acc.set_xticks(range(len(groups)), groups, **tilt)
    ax_acc.set_ylabel("accuracy (%), 95 % CI")
    sampled = any((t.get("samples") or 1) > 1 for s in summaries for t in s["tasks"].values())
    ax_acc.set_title("avg@k (pass@1 over k samples)" if sampled else "pass@1", pad=10)
    ax_tok.set_xticks(range(len(benches)), benches, **tilt)
    ax_tok.set_ylabel("mean response tokens")
    cap_text = (
        f"dashed: length cap {caps[0]}"
        if caps and caps[0] and len(set(caps)) == 1
        else "dashed: length caps"
        if any(caps)
        else ""
    )
    ax_tok.set_title("CoT length" + (f" ({cap_text})" if cap_text else ""), pad=10)
    # the legend right of the axes, never on the bars or the tick labels
    handles, names = ax_acc.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(
        handles,
        names,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize="small",
        frameon=False,
        ncol=1 if n <= 20 else 2,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# Settings that must match for two runs' scores to be comparable.
_COMPARABLE = ("limit", "max_tokens", "backend", "samples", "temperature", "top_p", "protocol")


def compare_warnings(labels: Sequence[str], summaries: Sequence[dict]) -> list[str]:
    """What differs between the runs besides the model: scores over other questions, budgets or
    samplers are not the same measurement."""
    out = []
    tasks = [tuple(sorted(s["tasks"])) for s in summaries]
    if len(set(tasks)) > 1:
        out.append(
            "the runs scored different tasks: " + "; ".join(f"{lab}: {', '.join(t)}" for lab, t in zip(labels, tasks))
        )
    ns = {
        bench: [(s["tasks"].get(bench) or {}).get("n") for s in summaries]
        for bench in sorted({b for s in summaries for b in s["tasks"]})
    }
    for bench, values in ns.items():
        present = [v for v in values if v is not None]
        if len(set(present)) > 1:
            out.append(
                f"{bench}: the runs scored different numbers of questions (n = "
                + ", ".join(f"{lab}: {v}" for lab, v in zip(labels, values) if v is not None)
                + ")"
            )
    for key in _COMPARABLE:
        values = [s.get(key) for s in summaries]
        if key == "backend":  # a run scored before the rename says hf: the same backend as transformers
            from micota_merge.generation.backends import ALIASES

            values = [ALIASES.get(v, v) for v in values]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            out.append(f"the runs differ in {key}: " + ", ".join(f"{lab}: {v}" for lab, v in zip(labels, values)))
    return out


def compare(
    runs: Sequence[str], output: Optional[str] = None, force: bool = False, seed: int = 0, echo: Echo = print
) -> str:
    """Markdown table (and, with `output`, compare.md, compare.json, compare.png) of several runs."""
    if not runs:
        raise UserError("--compare needs run folders: micota-merge eval --compare RUN_DIR RUN_DIR ...")
    paths = [Path(r) for r in runs]
    summaries = [load_summary(p) for p in paths]
    labels = _labels(paths)
    for warning in compare_warnings(labels, summaries):
        echo(f"warning: {warning}")
    tests = paired_tests(paths, labels, summaries, seed=seed)
    table = compare_markdown(labels, summaries, tests)
    echo(table)
    if output:
        with atomic_dir(output, "eval-compare", force=force, inputs={f"run {p}": p for p in paths}) as staging:
            write_text_atomic(staging / "compare.md", table)
            write_json_atomic(
                staging / "compare.json",
                {
                    "runs": [{"label": lab, "dir": str(p), **s} for lab, p, s in zip(labels, paths, summaries)],
                    "tests": tests,
                },
            )
            compare_chart(labels, summaries, staging / "compare.png")
        echo(f"wrote {output}/compare.md, compare.json, compare.png")
    return table
