"""What decontaminating a large training set costs: OpenR1-Math-220k-sized question lists checked
against the papers' five benchmarks (open-r1's word 8-grams), against a baseline of reading the same
question texts and splitting them into words.

    python bench/decontaminate.py [--questions 220000] [--json OUT]

The questions are the shipped GSM8K training questions, repeated with their numbers changed (so the
texts differ and lengths stay realistic), plus every 1000th one a copy of a GSM8K test question, so
the check has something to find. The baseline is the part of the work no check can skip: normalising
each question and cutting its 8-grams (the bytes are in memory; no disk in either row).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from micota_merge.data.decontaminate import (  # noqa: E402
    Index,
    benchmark_questions,
    decontaminate,
    default_against,
    normalize,
    word_ngrams,
)


def questions(n: int) -> list[dict]:
    train = [json.loads(x)["question"] for x in (REPO / "micota_merge/assets/train/gsm8k_train.jsonl").open()]
    test = benchmark_questions("gsm8k")
    rng = random.Random(0)
    out = []
    for i in range(n):
        if i % 1000 == 999:
            q = test[(i // 1000) % len(test)]
        else:
            q = re.sub(r"\d+", lambda m: str(rng.randint(2, 999)), train[i % len(train)])
        out.append({"id": str(i), "question": q})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=220_000)
    ap.add_argument("--json")
    a = ap.parse_args()
    qs = questions(a.questions)
    chars = sum(len(q["question"]) for q in qs)

    t = time.perf_counter()
    n_grams = sum(len(word_ngrams(normalize(q["question"]))) for q in qs)
    base = time.perf_counter() - t

    t = time.perf_counter()
    index = Index.build(default_against())
    build = time.perf_counter() - t
    t = time.perf_counter()
    kept, report = decontaminate(qs, "drop")
    check = time.perf_counter() - t - build  # decontaminate builds its own index: count that once
    row = {
        "questions": len(qs),
        "megabytes": round(chars / 1e6, 1),
        "question_8grams": n_grams,
        "benchmark_8grams": len(index.ngrams),
        "baseline_s": round(base, 2),
        "index_build_s": round(build, 2),
        "check_s": round(check, 2),
        "x_baseline": round(check / base, 2),
        "questions_per_s": round(len(qs) / check),
        "overlapping": report.overlapping,
        "dropped": report.dropped,
    }
    print(json.dumps(row, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
