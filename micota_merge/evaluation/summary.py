"""An eval run's summary (`summary.json`, `summary.md`) from lm-eval's results, and the one renderer of its
figures: percent with one decimal, intervals in brackets, and "–" for a figure that is missing (never 0)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from micota_merge.core.errors import StageFailed, UserError
from micota_merge.evaluation import scoring
from micota_merge.evaluation.benchmarks import VERIFIED_METRICS
from micota_merge.evaluation.tasks import task_name

SUMMARY = "summary.json"


def _metric(task_results: dict, name: str) -> Optional[float]:
    value = task_results.get(f"{name},none")
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    return None if math.isnan(value) else value


LENGTHS = ("mean_tokens", "mean_thinking_tokens", "mean_answer_tokens", "truncated")


def summarize(
    results: dict,
    model: str,
    benchmarks: Sequence[str],
    per_question: Optional[dict[str, list[list[float]]]] = None,
    majority: Optional[dict[str, list[float]]] = None,
    seed: int = 0,
) -> dict:
    """Our summary from lm-eval's results: per task avg@k, pass@k and maj@k with their 95 %
    intervals, lengths, truncation and n; their plain average with its interval."""
    tasks = {}
    for bench in benchmarks:
        name = task_name(bench)
        res = results["results"].get(name)
        if res is None:
            raise StageFailed(f"lm-eval returned no result for {name}")
        n = results.get("n-samples", {}).get(name, {}).get("effective")
        k = int(results.get("configs", {}).get(name, {}).get("repeats") or 1)
        t = {"samples": k, "accuracy": _metric(res, "accuracy"), "ci95": None}
        rows = (per_question or {}).get(bench)
        if rows:
            t["ci95"] = list(scoring.accuracy_interval(rows, seed=seed))
        if k > 1:
            t["pass@k"] = {str(j): _metric(res, f"pass@{j}") for j in scoring.pass_ks(k)}
            t["maj@k"] = {str(k): _metric(res, f"maj@{k}")}
            if rows:  # pass@k is already an expectation per question: questions are resampled
                t["pass@k_ci95"] = {
                    str(j): list(
                        scoring.accuracy_interval(
                            [[scoring.pass_at_k(len(r), int(sum(r)), j)] for r in rows], seed=seed
                        )
                    )
                    for j in scoring.pass_ks(k)
                }
            if (majority or {}).get(bench):
                t["maj@k_ci95"] = {str(k): list(scoring.accuracy_interval([[m] for m in majority[bench]], seed=seed))}
        t.update({m: _metric(res, m) for m in LENGTHS})
        for m in VERIFIED_METRICS:  # a benchmark with a whole-answer verifier (benchmarks.verifier) scores these too
            if _metric(res, m) is not None:
                t[m] = _metric(res, m)
        t["n"] = int(n) if n is not None else None
        tasks[bench] = t
    accs = [t["accuracy"] for t in tasks.values() if t["accuracy"] is not None]
    toks = [t["mean_tokens"] for t in tasks.values() if t["mean_tokens"] is not None]
    # The papers' "Avg." is the plain mean over benchmarks, not weighted by their sizes.
    out = {
        "model": model,
        "tasks": tasks,
        "average": sum(accs) / len(accs) if accs else None,
        "average_ci95": None,
        "mean_tokens": sum(toks) / len(toks) if toks else None,
    }
    if per_question and all(per_question.get(b) for b in benchmarks):
        out["average_ci95"] = list(scoring.average_interval([per_question[b] for b in benchmarks], seed=seed))
    return out


def describe(sampling: dict) -> str:
    if sampling["temperature"] == 0:
        return "greedy"
    ks = sorted(set(sampling["samples"].values()))
    k = ", ".join(f"{b} {n}" for b, n in sampling["samples"].items()) if len(ks) > 1 else str(ks[0])
    name = "r1 protocol" if sampling["protocol"] == "r1" else "sampling"
    return f"{name}: temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}, samples per question {k}"


def fmt_acc(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def fmt_tok(x) -> str:
    return "–" if x is None else f"{x:.0f}"


def fmt_ci(ci) -> str:
    return "–" if not ci else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}"


def _top(t: dict, key: str):
    """pass@k / maj@k at the largest k of a task (None with one sample)."""
    table = t.get(key) or {}
    if not table:
        return None, None
    k = max(table, key=int)
    return k, table[k]


def summary_markdown(summary: dict) -> str:
    sampled = any((t.get("samples") or 1) > 1 for t in summary["tasks"].values())
    what = "avg@k" if sampled else "accuracy"
    lines = [f"### {summary['model']}", ""]
    if summary.get("protocol"):
        lines += [
            f"{describe(summary)}; max {summary.get('max_tokens')} new tokens; "
            "95 % bootstrap intervals over questions (samples nested)",
            "",
        ]
    head = f"| benchmark | k | {what} (%) | 95 % CI |"
    rule = "| --- | ---: | ---: | :---: |"
    if sampled:
        head += " pass@k (%) | maj@k (%) |"
        rule += " ---: | ---: |"
    head += " tokens | thinking | answer | truncated (%) | n |"
    rule += " ---: | ---: | ---: | ---: | ---: |"
    lines += [head, rule]
    for bench, t in summary["tasks"].items():
        row = f"| {bench} | {t.get('samples', 1)} | {fmt_acc(t['accuracy'])} | {fmt_ci(t.get('ci95'))} |"
        if sampled:
            pk, pv = _top(t, "pass@k")
            mk, mv = _top(t, "maj@k")
            pci = (t.get("pass@k_ci95") or {}).get(pk)
            mci = (t.get("maj@k_ci95") or {}).get(mk)
            row += f" {fmt_acc(pv)} (k={pk}{', ' + fmt_ci(pci) if pci else ''}) |" if pk else " – |"
            row += f" {fmt_acc(mv)} (k={mk}{', ' + fmt_ci(mci) if mci else ''}) |" if mk else " – |"
        row += (
            f" {fmt_tok(t.get('mean_tokens'))} | {fmt_tok(t.get('mean_thinking_tokens'))} |"
            f" {fmt_tok(t.get('mean_answer_tokens'))} | {fmt_acc(t.get('truncated'))} | {t['n']} |"
        )
        lines.append(row)
    avg = f"| **average** | | **{fmt_acc(summary['average'])}** | {fmt_ci(summary.get('average_ci95'))} |"
    avg += " | |" if sampled else ""
    avg += f" {fmt_tok(summary.get('mean_tokens'))} | | | | |"
    lines.append(avg)
    passes = [
        f"{bench}: "
        + ", ".join(
            f"pass@{k} {fmt_acc(v)}"
            + (f" ({fmt_ci(t['pass@k_ci95'][k])})" if (t.get("pass@k_ci95") or {}).get(k) else "")
            for k, v in t["pass@k"].items()
        )
        for bench, t in summary["tasks"].items()
        if len(t.get("pass@k") or {}) > 1
    ]
    if passes:
        lines += ["", "pass@k (%), unbiased estimator: " + "; ".join(passes)]
    if summary.get("max_tokens") and any((t.get("truncated") or 0) > 0 for t in summary["tasks"].values()):
        lines += [
            "",
            f"truncated: the share of answers that reached the cap of {summary['max_tokens']} new "
            "tokens (graded as they stand: an unfinished answer is usually wrong)",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- compare


def load_summary(run: str | os.PathLike) -> dict:
    path = Path(run)
    path = path / SUMMARY if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{run}: no {SUMMARY}; give folders written by `micota-merge eval --output DIR`")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(summary.get("tasks"), dict):
        raise UserError(f"{path}: has no 'tasks' table; is it a micota-merge eval summary?")
    return summary


def group_scores(run: str | os.PathLike, bench: str) -> Optional[dict]:
    """A benchmark's scores in an eval run by question group (benchmarks.grouper: the micro world's
    difficulty), from the run's per-sample log: {group: {"n", "accuracy", "mean_tokens", and the verified
    metrics where scored}}, groups in the grouper's `order`; None where the benchmark has no groups or the
    run no samples of it."""
    from micota_merge.evaluation import benchmarks

    group_of = benchmarks.grouper(bench)
    files = sorted(Path(run).glob(f"samples_{task_name(bench)}_*.jsonl"))
    if group_of is None or not files:
        return None
    keys = ("accuracy", "mean_tokens", *VERIFIED_METRICS)
    sums: dict[str, dict] = {}
    for line in files[-1].read_text(encoding="utf-8").splitlines():  # the newest: one run writes one
        if not line.strip():
            continue
        rec = json.loads(line)
        g = sums.setdefault(group_of(rec["doc"]["question"]) or "other", {"n": 0})
        g["n"] += 1
        for k in keys:
            if rec.get(k) is not None:
                g[k] = g.get(k, 0.0) + float(rec[k])
    order = list(getattr(group_of, "order", ())) + sorted(set(sums) - set(getattr(group_of, "order", ())))
    return {g: {k: (v / sums[g]["n"] if k != "n" else v) for k, v in sums[g].items()} for g in order if g in sums}


def acc_cell(t: dict) -> str:
    if not t or t.get("accuracy") is None:
        return "–"
    ci = t.get("ci95")
    return fmt_acc(t["accuracy"]) + (f" ({fmt_ci(ci)})" if ci else "")
