"""Decontamination: training questions checked against the benchmarks the students are scored on.

Public math training sets hold benchmark problems, and a student trained on a test question scores it
from memory. As open-r1 does (its `scripts/decontaminate.py`), every training question is normalised
(lower case, whitespace collapsed) and split into word 8-grams; a question sharing any 8-gram with a
benchmark's question overlaps that benchmark. A question identical to a benchmark question after
normalisation overlaps it too, however short (a question of fewer than 8 words has no 8-gram).

A benchmark whose questions are written from templates (the micro world's: every question ends "How
many coins does Lily have now?", so 8-grams are shared by construction, not by leakage) is registered
with `contamination="exact"`: only identical questions overlap it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from micota_merge.core.errors import UserError
from micota_merge.evaluation import benchmarks as registry

NGRAM = 8  # open-r1's default for MATH-500, AIME and GPQA


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def word_ngrams(text: str, n: int = NGRAM) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def benchmark_questions(name: str) -> list[str]:
    """A registered benchmark's question texts, from its own data file."""
    b = registry.get(name)
    path = b.data_file()
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(str(json.loads(line)[b.question_field]))
    return out


@dataclass
class Index:
    """The benchmarks' 8-grams (and whole questions) and which benchmarks each came from."""

    against: tuple[str, ...]
    n: int = NGRAM
    ngrams: dict[str, set[str]] = field(default_factory=dict)
    exact: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def build(cls, against: Sequence[str], n: int = NGRAM) -> "Index":
        unknown = [b for b in against if b not in registry.names()]
        if unknown:
            raise UserError(
                f"--decontaminate-against: unknown benchmark {unknown[0]!r}: choose from {', '.join(registry.names())}"
            )
        index = cls(tuple(dict.fromkeys(against)), n)
        for name in index.against:
            by_ngram = registry.get(name).contamination == "ngram"
            for q in benchmark_questions(name):
                text = normalize(q)
                index.exact.setdefault(text, set()).add(name)
                if by_ngram:
                    for g in word_ngrams(text, n):
                        index.ngrams.setdefault(g, set()).add(name)
        return index

    def hits(self, question: str) -> set[str]:
        """The benchmarks this question overlaps (empty: none)."""
        text = normalize(question)
        found = set(self.exact.get(text, ()))
        for g in word_ngrams(text, self.n):
            found |= self.ngrams.get(g, set())
        return found


@dataclass
class Report:
    mode: str
    against: list[str]
    n: int
    checked: int = 0
    overlapping: dict[str, int] = field(default_factory=dict)  # benchmark -> questions overlapping it
    ids: list[str] = field(default_factory=list)  # the overlapping questions' ids
    dropped: int = 0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "ngram": self.n,
            "against": self.against,
            "checked": self.checked,
            "overlapping": self.overlapping,
            "overlapping_questions": len(self.ids),
            "dropped": self.dropped,
        }

    def line(self) -> str:
        if not self.ids:
            return f"decontamination: none of {self.checked} questions overlaps {', '.join(self.against)}"
        per = ", ".join(f"{b} {k}" for b, k in self.overlapping.items())
        done = f"dropped {self.dropped}" if self.dropped else "kept (--decontaminate warn)"
        return f"decontamination: {len(self.ids)} of {self.checked} questions overlap a benchmark ({per}); {done}"


def default_against(evaluated=None) -> list[str]:
    """The benchmarks training questions are checked against: the papers' five, and the tasks a pipeline
    evaluates (`evaluated`, an `eval --tasks` spec) when it scores others too."""
    if evaluated is None:
        return list(registry.papers())
    from micota_merge.evaluation.evaluate import parse_tasks

    return list(dict.fromkeys([*registry.papers(), *parse_tasks(evaluated)]))


def decontaminate(
    questions: list[dict], mode: str, against: Optional[Iterable[str]] = None, n: int = NGRAM
) -> tuple[list[dict], Report]:
    """(the questions to use, what was found): `drop` leaves out every overlapping question, `warn` keeps
    them and reports them, `off` checks nothing."""
    against = list(against) if against else default_against()
    report = Report(mode, against, n)
    if mode == "off":
        return questions, report
    index = Index.build(against, n)
    kept = []
    for q in questions:
        found = index.hits(q["question"])
        if found:
            report.ids.append(q["id"])
            for b in sorted(found):
                report.overlapping[b] = report.overlapping.get(b, 0) + 1
        if not found or mode == "warn":
            kept.append(q)
    report.checked, report.dropped = len(questions), len(questions) - len(kept)
    return kept, report
