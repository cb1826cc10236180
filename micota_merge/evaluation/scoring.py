"""Scores over k sampled answers per question, and their uncertainty.

- `avg@k` (reported as `accuracy`): the mean over all samples of all questions. With k = 1
  and greedy decoding it is the papers' pass@1.
- `pass@k`: the unbiased estimator of the Codex paper (Chen et al., 2021):
  per question with n samples, c of them correct, 1 - C(n-c, k) / C(n, k); then the mean.
  Reported for k = 1, the powers of two below n, and n (`pass_ks`).
- `maj@k`: the answer most samples give (answers grouped by the grader's equivalence,
  ties to the answer seen first) is correct; unanswered samples do not vote.
- intervals: a percentile bootstrap over questions with the samples of each drawn question
  drawn again (two-stage: both the questions and the sampling vary between reruns).
  `paired_bootstrap` resamples the same questions for two runs of one benchmark, so the
  question difficulty they share cancels out of the difference.

Every bootstrap takes a seed, so a report is reproducible to the digit.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

BOOTSTRAP_DRAWS = 2000
CONFIDENCE = 0.95
SEED = 0


def pass_ks(n: int) -> list[int]:
    """k for which pass@k is reported with n samples per question: 1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    ks.append(n)
    return ks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: n samples, c correct (Chen et al. 2021, eq. 1)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # the product form of the paper: no huge binomials for n = 64
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority(preds: Sequence[Optional[str]], same: Callable[[str, str], bool]) -> Optional[int]:
    """Index of a sample carrying the majority answer (None when no sample answered).

    Answers are grouped by `same` (the grader's equivalence), after exact duplicates are
    merged, so k = 64 samples cost one comparison per distinct answer pair at most.
    """
    groups: list[list[int]] = []  # sample indices, first member is the representative
    exact: dict[str, int] = {}  # answer string -> group index
    for i, p in enumerate(preds):
        if p is None:
            continue
        key = p.strip()
        if key in exact:
            groups[exact[key]].append(i)
            continue
        for g, members in enumerate(groups):
            if same(key, preds[members[0]].strip()):
                members.append(i)
                exact[key] = g
                break
        else:
            exact[key] = len(groups)
            groups.append([i])
    if not groups:
        return None
    best = max(groups, key=len)  # max keeps the first of equal-sized groups: the earliest answer
    return best[0]


# ------------------------------------------------------------------------------- bootstrap


def _matrix(per_question: Sequence[Sequence[float]]) -> np.ndarray:
    """Questions x samples; questions with fewer samples (never in one run) are refused."""
    lengths = {len(row) for row in per_question}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError("every question needs the same, positive number of samples")
    return np.asarray(per_question, dtype=float)


def bootstrap_draws(
    per_question: Sequence[Sequence[float]],
    rng: np.random.Generator,
    questions: Optional[np.ndarray] = None,
    draws: int = BOOTSTRAP_DRAWS,
) -> np.ndarray:
    """`draws` bootstrap replicates of the mean score: questions resampled, samples nested.

    `questions` (draws x Q indices) lets two runs share the same resampled questions.
    """
    m = _matrix(per_question)
    q, k = m.shape
    if questions is None:
        questions = rng.integers(q, size=(draws, q))
    if k == 1:
        return m[questions, 0].mean(axis=1)
    samples = rng.integers(k, size=(questions.shape[0], q, k))
    return m[questions[:, :, None], samples].mean(axis=(1, 2))


def interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def accuracy_interval(
    per_question: Sequence[Sequence[float]], seed: int = SEED, draws: int = BOOTSTRAP_DRAWS
) -> tuple[float, float]:
    """95 % percentile interval of the mean score (avg@k) of one benchmark."""
    return interval(bootstrap_draws(per_question, np.random.default_rng(seed), draws=draws))


def average_interval(
    tables: Sequence[Sequence[Sequence[float]]], seed: int = SEED, draws: int = BOOTSTRAP_DRAWS
) -> tuple[float, float]:
    """Interval of the plain average over benchmarks (each resampled on its own)."""
    rng = np.random.default_rng(seed)
    reps = np.mean([bootstrap_draws(t, rng, draws=draws) for t in tables], axis=0)
    return interval(reps)


def paired_bootstrap(
    a: Sequence[Sequence[Sequence[float]]],
    b: Sequence[Sequence[Sequence[float]]],
    seed: int = SEED,
    draws: int = BOOTSTRAP_DRAWS,
) -> dict:
    """Paired test of mean(a) - mean(b) over one or more benchmarks (the average of their means).

    a[t][q] and b[t][q] are the sample scores of run A and B on question q of benchmark t
    (the same questions, any number of samples each). Returns the observed difference, its
    95 % interval, a two-sided bootstrap p-value (twice the smaller share of replicates on
    either side of 0, ties at 0 split evenly) and `significant` (the interval excludes 0).
    """
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs the same benchmarks in both runs")
    rng = np.random.default_rng(seed)
    diffs = np.zeros(draws)
    observed = 0.0
    for ta, tb in zip(a, b):
        if len(ta) != len(tb):
            raise ValueError("paired_bootstrap needs the same questions in both runs")
        questions = rng.integers(len(ta), size=(draws, len(ta)))
        diffs += bootstrap_draws(ta, rng, questions) - bootstrap_draws(tb, rng, questions)
        observed += _matrix(ta).mean() - _matrix(tb).mean()
    diffs /= len(a)
    observed /= len(a)
    lo, hi = interval(diffs)
    # ties at 0 are common (a question where both runs are always right or always wrong): they
    # count half to each side, else they alone would push p towards 1
    ties = float(np.mean(diffs == 0))
    p = min(1.0, 2 * min(float(np.mean(diffs < 0)), float(np.mean(diffs > 0))) + ties)
    return {"difference": float(observed), "ci95": [lo, hi], "p_value": p, "significant": bool(lo > 0 or hi < 0)}
