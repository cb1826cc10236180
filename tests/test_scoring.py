"""Sampled scores (pass@k, maj@k) and bootstrap intervals against their definitions."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from micota_merge.evaluation import grading, scoring


def test_pass_ks():
    assert scoring.pass_ks(1) == [1]
    assert scoring.pass_ks(4) == [1, 2, 4]
    assert scoring.pass_ks(6) == [1, 2, 4, 6]
    assert scoring.pass_ks(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("n,c", [(4, 0), (4, 1), (4, 3), (6, 2), (8, 8), (5, 4)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_answer(n, c):
    """The unbiased estimator equals the exact share over all k-subsets of the n samples."""
    samples = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        exact = sum(any(s) for s in subsets) / len(subsets)
        assert scoring.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert scoring.pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        scoring.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        scoring.pass_at_k(4, 1, 8)


def test_majority_groups_equivalent_answers():
    same = lambda a, b: grading.equivalent(a, b, "math500")  # noqa: E731
    # 0.5 and \frac{1}{2} are one answer (3 votes) against 7 (2 votes)
    preds = ["7", "0.5", r"\frac{1}{2}", "7", None, r"\tfrac12"]
    winner = scoring.majority(preds, same)
    assert grading.equivalent(preds[winner], "1/2", "math500")
    assert scoring.majority([None, None], same) is None
    # a tie goes to the answer given first
    assert scoring.majority(["3", "4", "4", "3"], same) == 0


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = random.Random(0)
    table = [[float(rng.random() < p) for _ in range(8)] for p in np.linspace(0.05, 0.95, 40)]
    lo, hi = scoring.accuracy_interval(table, seed=3)
    assert scoring.accuracy_interval(table, seed=3) == (lo, hi)
    assert scoring.accuracy_interval(table, seed=4) != (lo, hi)
    mean = float(np.mean(table))
    assert lo < mean < hi
    # questions vary from 5 % to 95 %: the spread between questions dominates, ~ +-9 points
    assert 0.1 < hi - lo < 0.25
    # all correct or all wrong: no uncertainty to report
    assert scoring.accuracy_interval([[1.0]] * 5) == (1.0, 1.0)


def test_nested_samples_widen_the_interval():
    """Same per-question means; one sample per question is noisier than 16."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.3, 0.7, size=30)
    one = [[float(rng.random() < q)] for q in p]
    many = [[float(rng.random() < q) for _ in range(16)] for q in p]
    w1 = np.subtract(*scoring.accuracy_interval(one)[::-1])
    w16 = np.subtract(*scoring.accuracy_interval(many)[::-1])
    assert w16 < w1


def test_paired_bootstrap_tells_a_difference_from_noise():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.1, 0.9, size=60)
    base = [[float(rng.random() < q) for _ in range(4)] for q in p]
    better = [[float(rng.random() < min(q + 0.3, 1)) for _ in range(4)] for q in p]
    same = [[float(rng.random() < q) for _ in range(4)] for q in p]
    up = scoring.paired_bootstrap([better], [base])
    assert up["significant"] and up["difference"] > 0.2 and up["ci95"][0] > 0 and up["p_value"] < 0.01
    noise = scoring.paired_bootstrap([same], [base])
    assert not noise["significant"] and noise["ci95"][0] < 0 < noise["ci95"][1]
    # deterministic
    assert scoring.paired_bootstrap([same], [base], seed=5) == scoring.paired_bootstrap([same], [base], seed=5)
    # on the average over two benchmarks: the observed difference is the mean of the two
    both = scoring.paired_bootstrap([better, same], [base, base])
    assert both["difference"] == pytest.approx((up["difference"] + noise["difference"]) / 2)


def test_pairing_removes_shared_question_difficulty():
    """Two runs that differ by 8 points on every question: unpaired intervals overlap, the
    paired test still sees the difference (question difficulty cancels)."""
    rng = np.random.default_rng(2)
    p = rng.uniform(0.0, 0.9, size=40)
    a = [[q + 0.08] for q in p]  # fractional scores stand for many samples per question
    b = [[q] for q in p]
    ia, ib = scoring.accuracy_interval(a), scoring.accuracy_interval(b)
    assert ia[0] < ib[1]  # the unpaired intervals overlap
    assert scoring.paired_bootstrap([a], [b])["significant"]
