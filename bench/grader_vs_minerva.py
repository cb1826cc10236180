"""Our grader (micota_merge.evaluation.grading) against lm-eval's built-in minerva_math exact match.

Both judge the same responses, whose right verdicts are known:
  table      tests/data/grading_cases.jsonl: hand-judged responses for all five benchmarks
  synth500   responses built from every MATH-500 gold by rewrites whose verdict is known by
             construction (the gold verbatim, in minerva's "Final Answer: ..." sentence, spaces
             dropped, \\dfrac/\\left removed, 1234 -> 1,234, \\frac{a}{b} -> a/b or a decimal,
             90^\\circ -> 90, \\text{(B)} -> B are right; n -> n+1, a/b -> b/a, x -> -x,
             swapped ordered pairs, another choice letter are wrong)

lm-eval's minerva_math is scored two ways, both with its own code
(lm_eval/tasks/minerva_math/utils.py):
  minerva-em     its exact_match as shipped: get_unnormalized_answer (only reads
                 "Final Answer: The final answer is X. I hope it is correct."),
                 normalize_final_answer, is_equiv (sympy parse_latex + simplify)
  minerva-boxed  the same normalize_final_answer + is_equiv on the last \\boxed{} (its own
                 last_boxed_only_string/remove_boxed), falling back to the sentence above

minerva_math needs antlr4-python3-runtime 4.11 while math-verify needs 4.13, so the minerva side
runs in a subprocess with a 4.11 copy on its path (installed once with pip into --antlr-dir).

    python bench/grader_vs_minerva.py [--examples 8] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "grading_cases.jsonl"
DEFAULT_ANTLR = Path.home() / ".cache" / "micota-merge" / "antlr4-4.11"

MINERVA = r"""
import json, sys
import lm_eval.tasks.minerva_math.utils as u
out = []
for line in open(sys.argv[1]):
    c = json.loads(line)
    gold = u.normalize_final_answer(c["gold_text"])
    em_pred = u.normalize_final_answer(u.get_unnormalized_answer(c["response"]))
    box = u.last_boxed_only_string(c["response"])
    try:
        raw = u.remove_boxed(box) if box else u.get_unnormalized_answer(c["response"])
    except AssertionError:
        raw = u.get_unnormalized_answer(c["response"])
    boxed_pred = u.normalize_final_answer(raw)
    out.append({"em": bool(u.is_equiv(em_pred, gold)), "em_pred": em_pred,
                "boxed": bool(u.is_equiv(boxed_pred, gold)), "boxed_pred": boxed_pred})
json.dump(out, open(sys.argv[2], "w"))
"""


def gold_text(gold, benchmark: str | None) -> str:
    """The gold as one LaTeX string, for minerva (which takes a string)."""
    from micota_merge.evaluation.grading import parse_gold

    return ", ".join(parse_gold(gold, benchmark))


# ---------------------------------------------------------------------------- synthesis

_INT = re.compile(r"-?\d+")
_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_TUPLE = re.compile(r"\\left\(\s*(.*?)\s*\\right\)|\((.*)\)")
_CHOICE = re.compile(r"\\text\{\(([A-E])\)\}")


def _box(ans: str) -> str:
    return f"Putting it together, the answer is $\\boxed{{{ans}}}$."


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + [cur.strip()]


def synthesise(answer: str) -> list[tuple[str, bool, str]]:
    """(response, right verdict, rewrite name) for one MATH-500 gold."""
    out = [
        (_box(answer), True, "verbatim box"),
        (f"Final Answer: The final answer is ${answer}$. I hope it is correct.", True, "minerva sentence"),
    ]
    nospace = re.sub(r"\s*([,()\[\]=+\-])\s*", r"\1", answer)
    if nospace != answer:
        out.append((_box(nospace), True, "spaces dropped"))
    plain = answer.replace("\\dfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    if plain != answer:
        out.append((_box(plain), True, "dfrac/left/right dropped"))
    if _INT.fullmatch(answer):
        n = int(answer)
        out.append((_box(str(n + 1)), False, "n+1"))
        if abs(n) >= 1000:
            out.append((_box(f"{n:,}"), True, "thousands commas"))
        if n != 0:
            out.append((_box(str(-n)), False, "sign flipped"))
    m = _FRAC.fullmatch(answer)
    if m:
        sign, a, b = m.group(1), int(m.group(2)), int(m.group(3))
        out.append((_box(f"{sign}{a}/{b}"), True, "a/b"))
        if a != b:
            out.append((_box(f"{sign}\\frac{{{b}}}{{{a}}}"), False, "reciprocal"))
        q = b
        for p in (2, 5):
            while q % p == 0:
                q //= p
        if q == 1:
            dec = f"{a / b:.10f}".rstrip("0").rstrip(".")
            out.append((_box(f"{sign}{dec}"), True, "exact decimal"))
        out.append((_box(("" if sign else "-") + f"\\frac{{{a}}}{{{b}}}"), False, "sign flipped"))
    if _NUMBER.fullmatch(answer) and not _INT.fullmatch(answer) and float(answer) != 0:
        neg = answer[1:] if answer.startswith("-") else "-" + answer
        out.append((_box(neg), False, "sign flipped"))
    deg = re.fullmatch(r"(\d+)\^\\circ", answer)
    if deg:
        out.append((_box(deg.group(1)), True, "degree sign dropped"))
        out.append((_box(f"{int(deg.group(1)) + 1}^\\circ"), False, "angle+1"))
    ch = _CHOICE.fullmatch(answer)
    if ch:
        other = "A" if ch.group(1) != "A" else "B"
        out.append((_box(ch.group(1)), True, "bare letter"))
        out.append((_box(f"\\text{{({other})}}"), False, "other letter"))
    tm = _TUPLE.fullmatch(answer)
    if tm:
        inner = tm.group(1) or tm.group(2)
        items = _split_top(inner)
        if len(items) >= 2 and items[0] != items[1]:
            swapped = ", ".join([items[1], items[0], *items[2:]])
            out.append((_box(f"({swapped})"), False, "ordered pair swapped"))
    return out


def synth_cases() -> list[dict]:
    rows = [
        json.loads(line)
        for line in (ROOT / "micota_merge" / "evaluation" / "tasks" / "data" / "math500" / "test.jsonl")
        .read_text()
        .splitlines()
        if line
    ]
    cases = []
    for i, row in enumerate(rows):
        for response, verdict, name in synthesise(row["answer"]):
            cases.append(
                {
                    "benchmark": "math500",
                    "src": i,
                    "gold": row["answer"],
                    "response": response,
                    "correct": verdict,
                    "why": name,
                }
            )
    return cases


# ---------------------------------------------------------------------------- running


def ensure_antlr(path: Path) -> Path:
    if (path / "antlr4").is_dir():
        return path
    print(f"installing antlr4-python3-runtime 4.11 (for lm-eval's minerva_math) into {path}", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(path),
            "antlr4-python3-runtime==4.11.1",
        ],
        check=True,
    )
    return path


def run_minerva(cases: list[dict], antlr: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.jsonl", Path(tmp) / "out.json"
        with src.open("w") as f:
            for c in cases:
                f.write(json.dumps({"response": c["response"], "gold_text": c["gold_text"]}) + "\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(antlr), *filter(None, [os.environ.get("PYTHONPATH")])]))
        subprocess.run([sys.executable, "-c", MINERVA, str(src), str(dst)], check=True, env=env)
        return json.loads(dst.read_text())


def report(name: str, cases: list[dict], n_examples: int) -> dict:
    n = len(cases)
    summary = {"cases": n, "right_true": sum(c["correct"] for c in cases)}
    print(
        f"\n== {name}: {n} responses ({summary['right_true']} right, "
        f"{n - summary['right_true']} wrong by construction/reading)"
    )
    print(f"{'grader':<16}{'agrees with verdict':>22}{'false pos':>11}{'false neg':>11}")
    for key in ("ours", "minerva_em", "minerva_boxed"):
        agree = sum(c[key] == c["correct"] for c in cases)
        fp = sum(c[key] and not c["correct"] for c in cases)
        fn = sum(c["correct"] and not c[key] for c in cases)
        summary[key] = {"agree": agree, "accuracy": agree / n, "false_pos": fp, "false_neg": fn}
        print(f"{key:<16}{agree:>10}/{n} ({100 * agree / n:5.1f}%){fp:>11}{fn:>11}")
    both = sum(c["ours"] == c["minerva_boxed"] for c in cases)
    summary["ours_vs_minerva_boxed_same_verdict"] = both
    print(f"ours and minerva-boxed give the same verdict on {both}/{n} ({100 * both / n:.1f}%)")
    benches = sorted({c["benchmark"] or "None" for c in cases})
    if len(benches) > 1:
        print(f"{'benchmark':<15}{'n':>5}{'ours right':>12}{'minerva-boxed right':>21}")
        for b in benches:
            sub = [c for c in cases if (c["benchmark"] or "None") == b]
            o = sum(c["ours"] == c["correct"] for c in sub)
            m = sum(c["minerva_boxed"] == c["correct"] for c in sub)
            print(f"{b:<15}{len(sub):>5}{o:>12}{m:>21}")
    diff = [c for c in cases if c["ours"] != c["minerva_boxed"]]
    # ours wrong first, then wrong answers minerva accepts, then right ones it rejects
    diff.sort(key=lambda c: (c["ours"] == c["correct"], c["correct"]))
    kinds = Counter(c["why"] for c in diff)
    if diff:
        print(f"where they differ ({len(diff)}), by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common(8)))
    for c in diff[:n_examples]:
        who = "ours" if c["ours"] == c["correct"] else "minerva"
        print(
            f"  [{who} right] gold={c['gold_text']!r} response={c['response'][-70:]!r}\n"
            f"      ours pred={c['pred']!r} -> {c['ours']}, minerva pred={c['minerva_pred']!r}"
            f" -> {c['minerva_boxed']}, right={c['correct']} ({c['why']})"
        )
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=8, help="differing examples shown per set")
    ap.add_argument(
        "--antlr-dir",
        type=Path,
        default=DEFAULT_ANTLR,
        help="where the antlr4 4.11 copy for minerva_math lives (pip-installed once)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from micota_merge.evaluation.grading import grade

    sets = {
        "table": [json.loads(line) for line in TABLE.read_text().splitlines() if line],
        "synth500": synth_cases(),
    }
    antlr = ensure_antlr(args.antlr_dir)
    results = {}
    for name, cases in sets.items():
        t0 = time.perf_counter()
        for c in cases:
            c["gold_text"] = gold_text(c["gold"], c["benchmark"])
            out = grade(c["response"], c["gold"], c["benchmark"])
            c["ours"], c["pred"] = out["correct"], out["pred"]
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        for c, m in zip(cases, run_minerva(cases, antlr)):
            c["minerva_em"], c["minerva_boxed"], c["minerva_pred"] = m["em"], m["boxed"], m["boxed_pred"]
        t_min = time.perf_counter() - t0
        results[name] = report(name, cases, args.examples)
        results[name]["seconds"] = {"ours": round(t_ours, 1), "minerva_subprocess": round(t_min, 1)}
        print(f"time: ours {t_ours:.1f} s, minerva (subprocess incl. start) {t_min:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
