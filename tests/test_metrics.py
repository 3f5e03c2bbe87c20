"""Exact evaluation metrics (`model.metrics`) against sklearn/scipy and naive references.

References used: sklearn's `roc_auc_score`, `log_loss` and `ndcg_score` (linear gains, tie
averaging), scipy's `spearmanr`, a pairwise per-user loop for (G)AUC, a per-user sort loop for
pessimistic-tie NDCG, and the Kaggle cumulative-share formula for the normalised Gini. Hypothesis
draws small data with many ties (scores on a 0.1 grid); hand-computed cases pin each formula.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from model import metrics as m

SETTINGS = settings(max_examples=60, deadline=None)

# (user, label, score on a 0.1 grid, graded relevance): many ties by construction
ROWS = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 1), st.integers(0, 10), st.integers(0, 3)),
    min_size=1,
    max_size=60,
)


def _columns(rows: list[tuple[int, int, int, int]]):
    arr = np.array(rows, dtype=np.int64)
    return arr[:, 0], arr[:, 1].astype(np.float64), np.round(arr[:, 2] / 10, 1), arr[:, 3]


# ------------------------------------------------------------------------------------------
# naive references
# ------------------------------------------------------------------------------------------


def naive_auc(labels, scores) -> float:
    pos = [s for y, s in zip(labels, scores, strict=True) if y == 1]
    neg = [s for y, s in zip(labels, scores, strict=True) if y == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def naive_gauc(labels, scores, groups) -> float:
    num = den = 0.0
    for g in np.unique(groups):
        sel = groups == g
        y = labels[sel]
        if 0 < y.sum() < len(y):
            num += len(y) * naive_auc(y, scores[sel])
            den += len(y)
    return num / den


def naive_ndcg(rel, scores, groups, k, gain="exponential") -> float:
    g = (lambda r: 2.0**r - 1) if gain == "exponential" else (lambda r: float(r))
    values = []
    for u in np.unique(groups):
        sel = groups == u
        r, s = rel[sel], scores[sel]
        if len(r) < 2 or r.max() <= 0:
            continue
        ranked = sorted(zip(s, r, strict=True), key=lambda t: (-t[0], t[1]))  # pessimistic
        dcg = sum(g(rr) / math.log2(i + 2) for i, (_, rr) in enumerate(ranked[:k]))
        ideal = sorted(r, reverse=True)[:k]
        idcg = sum(g(rr) / math.log2(i + 2) for i, rr in enumerate(ideal))
        values.append(dcg / idcg)
    return float(np.mean(values))


def sklearn_ndcg(rel, scores, groups, k) -> float:
    """Mean of sklearn's per-user NDCG@k (linear gains, tie-averaged) over qualifying users."""
    values = [
        ndcg_score([rel[groups == u]], [scores[groups == u]], k=k)
        for u in np.unique(groups)
        if (groups == u).sum() >= 2 and rel[groups == u].max() > 0
    ]
    return float(np.mean(values))


def kaggle_gini(actual, pred) -> float:
    data = np.c_[actual, pred, np.arange(len(actual))].astype(float)
    data = data[np.lexsort((data[:, 2], -data[:, 1]))]
    total = data[:, 0].sum()
    gini_sum = data[:, 0].cumsum().sum() / total - (len(actual) + 1) / 2.0
    return gini_sum / len(actual)


def kaggle_normalised_gini(actual, pred) -> float:
    return kaggle_gini(actual, pred) / kaggle_gini(actual, actual)


# ------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------


def test_auc_hand():
    assert m.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: 0.5 + 1 + 1 + 1 over 4 pairs
    assert m.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == 0.875
    assert m.auc([0, 1], [-np.inf, np.inf]) == 1.0
    assert m.auc([True, False, True], [0.3, 0.3, 0.3]) == 0.5


def test_gauc_hand():
    labels = [1, 0, 0, 0, 1, 1, 1]
    scores = [0.9, 0.5, 0.95, 0.1, 0.3, 0.2, 0.7]
    users = ["a", "a", "a", "b", "b", "c", "c"]  # a: AUC 0.5 (3 rows), b: 1.0 (2), c excluded
    assert m.gauc(labels, scores, users) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5, abs=1e-15)


def test_ndcg_hand():
    # ranking gives rel 1, 0, 1; @2: DCG = 1, IDCG = 1 + 1/log2(3)
    assert m.ndcg_at_k([1, 0, 1], [0.9, 0.8, 0.1], [7, 7, 7], 2) == pytest.approx(
        1 / (1 + 1 / math.log2(3)), abs=1e-15
    )
    # graded: ranked rel 1, 0, 2 -> gains 1, 0, 3 ; ideal 3, 1, 0
    expected = (1 + 3 / 2) / (3 + 1 / math.log2(3))
    assert m.ndcg_at_k([2, 0, 1], [0.1, 0.5, 0.9], [1, 1, 1], 3) == pytest.approx(expected)
    linear = (1 + 2 / 2) / (2 + 1 / math.log2(3))
    assert m.ndcg_at_k([2, 0, 1], [0.1, 0.5, 0.9], [1, 1, 1], 3, gain="linear") == (
        pytest.approx(linear)
    )
    # pessimistic ties: user 1 scores 0 (relevant item put last); user 2 perfect (1);
    # user 3 has a single item and user 4 no positive: both excluded
    rel = [1, 0, 1, 0, 1, 0, 0]
    scores = [0.5, 0.5, 0.9, 0.1, 0.3, 0.2, 0.4]
    users = [1, 1, 2, 2, 3, 4, 4]
    assert m.ndcg_at_k(rel, scores, users, 1) == 0.5
    # k larger than every user: whole lists
    assert m.ndcg_at_k(rel, scores, users, 10) == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_logloss_hand():
    assert m.logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert m.logloss([0.3], [0.5]) == pytest.approx(math.log(2))
    assert m.logloss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7))
    assert m.logloss([1], [0.0], eps=1e-3) == pytest.approx(-math.log(1e-3))


def test_relative_improvements_hand():
    assert m.rela_impr_auc(0.75, 0.7) == pytest.approx(0.25)
    assert m.rela_impr_auc(0.7, 0.7) == 0.0
    assert m.rela_impr_ndcg(0.33, 0.3) == pytest.approx(0.1)


def test_regression_hand():
    y, yhat = [1, 2, 3], [1, 2, 5]
    assert m.nrmse(y, yhat) == pytest.approx(math.sqrt(4 / 3) / 2)
    assert m.nmae(y, yhat) == pytest.approx(1 / 3)
    assert m.gini(y, y) == pytest.approx(1.0)
    assert m.gini(y, [3, 2, 1]) == pytest.approx(-1.0)
    assert m.gini(y, [0.5, 0.5, 0.5]) == 0.0
    assert m.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert m.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_task_metrics():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 400)
    labels = (rng.random(400) < 0.3).astype(np.int64)
    scores = np.clip(labels * 0.2 + rng.random(400) * 0.8, 0, 1).round(1)
    grades = labels * rng.integers(1, 4, 400)
    out = m.task_metrics(labels, scores, users, k=5)
    assert set(out) == {"auc", "gauc", "ndcg@5", "logloss", "n"}
    assert out["auc"] == m.auc(labels, scores)
    assert out["gauc"] == m.gauc(labels, scores, users)
    assert out["ndcg@5"] == m.ndcg_at_k(labels, scores, users, 5)
    assert out["logloss"] == m.logloss(labels, scores)
    assert out["n"] == 400.0
    graded = m.task_metrics(labels, scores, users, k=3, relevance=grades)
    assert graded["ndcg@3"] == m.ndcg_at_k(grades, scores, users, 3)
    assert all(isinstance(v, float) for v in graded.values())


# ------------------------------------------------------------------------------------------
# against sklearn / scipy / naive loops, with ties and random sizes
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(ROWS)
def test_auc_matches_sklearn_and_pairs(rows):
    _, labels, scores, _ = _columns(rows)
    assume(0 < labels.sum() < len(labels))
    got = m.auc(labels, scores)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got == pytest.approx(naive_auc(labels, scores), abs=1e-12)
    assert m.auc(labels.astype(np.float32), scores.astype(np.float32)) == m.auc(
        labels, scores.astype(np.float32).astype(np.float64)
    )


@SETTINGS
@given(ROWS)
def test_gauc_matches_naive_loop(rows):
    users, labels, scores, _ = _columns(rows)
    mixed = [0 < labels[users == u].sum() < (users == u).sum() for u in np.unique(users)]
    if not any(mixed):
        with pytest.raises(ValueError, match="GAUC is undefined"):
            m.gauc(labels, scores, users)
        return
    got = m.gauc(labels, scores, users)
    assert got == pytest.approx(naive_gauc(labels, scores, users), abs=1e-12)
    perm = np.random.default_rng(len(rows)).permutation(len(rows))
    assert m.gauc(labels[perm], scores[perm], users[perm]) == pytest.approx(got, abs=1e-15)
    assert m.gauc(labels, scores.astype(np.float32), users.astype(str)) == pytest.approx(
        got, abs=1e-15
    )


@SETTINGS
@given(ROWS, st.integers(1, 8))
def test_ndcg_ties_match_naive_and_bound_sklearn(rows, k):
    users, _, scores, grades = _columns(rows)
    valid = [(users == u).sum() >= 2 and grades[users == u].max() > 0 for u in np.unique(users)]
    if not any(valid):
        with pytest.raises(ValueError, match="NDCG is undefined"):
            m.ndcg_at_k(grades, scores, users, k)
        return
    for gain in ("exponential", "linear"):
        got = m.ndcg_at_k(grades, scores, users, k, gain=gain)
        assert got == pytest.approx(naive_ndcg(grades, scores, users, k, gain), abs=1e-12)
        perm = np.random.default_rng(k).permutation(len(rows))
        assert m.ndcg_at_k(grades[perm], scores[perm], users[perm], k, gain=gain) == (
            pytest.approx(got, abs=1e-12)
        )
    # pessimistic tie-breaking is a lower bound of sklearn's tie-averaged NDCG
    linear = m.ndcg_at_k(grades, scores, users, k, gain="linear")
    assert linear <= sklearn_ndcg(grades, scores, users, k) + 1e-12


@SETTINGS
@given(st.integers(2, 80), st.integers(1, 6), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_ndcg_distinct_scores_match_sklearn(n, n_users, k, seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    grades = rng.integers(0, 4, n)
    scores = rng.random(n)  # continuous: no ties, so tie handling does not matter
    assume(any((users == u).sum() >= 2 and grades[users == u].max() > 0 for u in range(n_users)))
    assert m.ndcg_at_k(grades, scores, users, k, gain="linear") == pytest.approx(
        sklearn_ndcg(grades, scores, users, k), abs=1e-12
    )
    # exponential gains == linear gains on 2**rel - 1 (same ideal order)
    assert m.ndcg_at_k(grades, scores, users, k) == pytest.approx(
        sklearn_ndcg(2.0**grades - 1, scores, users, k), abs=1e-12
    )
    assert m.ndcg_at_k(grades, scores.astype(np.float32), users, k) == pytest.approx(
        m.ndcg_at_k(grades, scores.astype(np.float32).astype(np.float64), users, k), abs=0
    )


@SETTINGS
@given(st.integers(1, 200), st.integers(0, 2**32 - 1))
def test_logloss_matches_sklearn(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = rng.uniform(0.01, 0.99, n)
    expected = log_loss(labels, probs, labels=[0, 1])
    assert m.logloss(labels, probs) == pytest.approx(expected, rel=1e-12)
    assert m.logloss(labels.astype(np.float32), probs.astype(np.float32)) == pytest.approx(
        expected, rel=1e-6
    )


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=2, max_size=60),
)
def test_spearman_matches_scipy_with_ties(pairs):
    y = np.array([a for a, _ in pairs], dtype=np.float64) / 2
    yhat = np.array([b for _, b in pairs], dtype=np.float32) / 3
    assume(np.ptp(y) > 0 and np.ptp(yhat) > 0)
    assert m.spearman(y, yhat) == pytest.approx(spearmanr(y, yhat).statistic, abs=1e-12)


@SETTINGS
@given(st.integers(2, 100), st.integers(0, 2**32 - 1))
def test_gini_matches_kaggle_without_ties(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.exponential(size=n) * (rng.random(n) < 0.6)
    assume(np.ptp(y) > 0)
    yhat = y + rng.normal(size=n)
    assert m.gini(y, yhat) == pytest.approx(kaggle_normalised_gini(y, yhat), abs=1e-12)


def test_gini_ties_equal_expectation_over_orders():
    y = np.array([0.0, 3.0, 1.0, 0.0, 2.0, 5.0])
    yhat = np.array([0.2, 0.2, 0.5, 0.2, 0.5, 0.9])
    expected = np.mean(
        [
            kaggle_normalised_gini(y[list(p)], yhat[list(p)])
            for p in itertools.permutations(range(6))
        ]
    )
    assert m.gini(y, yhat) == pytest.approx(expected, abs=1e-12)


def test_large_inputs_match_references():
    rng = np.random.default_rng(1)
    n = 20_000
    users = rng.integers(0, 300, n)
    labels = (rng.random(n) < 0.2).astype(np.int64)
    scores = (labels * 0.3 + rng.random(n)).round(2).astype(np.float32)
    assert m.auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    per_user = [
        ((users == u).sum(), roc_auc_score(labels[users == u], scores[users == u]))
        for u in np.unique(users)
        if 0 < labels[users == u].sum() < (users == u).sum()
    ]
    weights, aucs = np.array(per_user).T
    assert m.gauc(labels, scores, users) == pytest.approx(np.dot(weights, aucs) / weights.sum())
    y = rng.gamma(2.0, size=n)
    yhat = (y + rng.normal(size=n)).round(1)
    assert m.spearman(y, yhat) == pytest.approx(spearmanr(y, yhat).statistic, abs=1e-12)
    assert m.nrmse(y, yhat) == pytest.approx(np.sqrt(np.mean((y - yhat) ** 2)) / y.mean())
    assert m.nmae(y, yhat) == pytest.approx(np.mean(np.abs(y - yhat)) / y.mean())


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: m.auc([0, 1, 1], [0.1, 0.2]), "length mismatch: labels=3, scores=2"),
        (lambda: m.auc([0, 1], [0.1, np.nan]), "scores contains 1 NaN"),
        (lambda: m.auc([0, np.nan], [0.1, 0.2]), "labels contains 1 NaN"),
        (lambda: m.auc([1, 1, 1], [0.1, 0.2, 0.3]), "only one class"),
        (lambda: m.auc([0, 2], [0.1, 0.2]), "labels must be binary"),
        (lambda: m.auc([[0, 1]], [[0.1, 0.2]]), "labels must be 1-D"),
        (lambda: m.auc([], []), "labels is empty"),
        (lambda: m.auc(["a", "b"], [0.1, 0.2]), "labels must be numeric"),
        (lambda: m.gauc([0, 1], [0.1, 0.2], [1, 1, 2]), "length mismatch"),
        (lambda: m.gauc([0, 1], [0.1, 0.2], [1.0, np.nan]), "groups contains 1 NaN"),
        (lambda: m.gauc([0, 1], [0.1, 0.2], [1, 2]), "GAUC is undefined"),
        (lambda: m.ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], 0), "k must be a positive integer"),
        (lambda: m.ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], 1.5), "k must be a positive integer"),
        (lambda: m.ndcg_at_k([1, 0], [0.1, 0.2], [1, 1], 1, gain="log"), "gain must be"),
        (lambda: m.ndcg_at_k([1, -1], [0.1, 0.2], [1, 1], 1), "non-negative"),
        (lambda: m.ndcg_at_k([1, 0], [0.1, 0.2], [1, 2], 1), "NDCG is undefined"),
        (lambda: m.ndcg_at_k([0, 0], [0.1, 0.2], [1, 1], 1), "NDCG is undefined"),
        (lambda: m.ndcg_at_k([1, 0], [0.1, np.nan], [1, 1], 1), "scores contains 1 NaN"),
        (lambda: m.logloss([0, 1], [0.1, 1.2]), r"probs must lie in \[0, 1\]"),
        (lambda: m.logloss([0, 1.5], [0.1, 0.2]), r"labels must lie in \[0, 1\]"),
        (lambda: m.logloss([0, 1], [0.1, np.inf]), "probs contains 1 infinite"),
        (lambda: m.logloss([0, 1], [0.1, 0.2], eps=0.0), "eps must lie"),
        (lambda: m.logloss([0, 1], [0.1]), "length mismatch: labels=2, probs=1"),
        (lambda: m.rela_impr_auc(0.7, 0.5), "auc_base == 0.5"),
        (lambda: m.rela_impr_ndcg(0.7, 0.0), "ndcg_base == 0"),
        (lambda: m.nrmse([1, 2], [1, 2, 3]), "length mismatch: y=2, yhat=3"),
        (lambda: m.nrmse([0, 0], [1, 2]), "mean\\(y\\) must be positive"),
        (lambda: m.nmae([1, np.nan], [1, 2]), "y contains 1 NaN"),
        (lambda: m.gini([2, 2, 2], [1, 2, 3]), "y is constant"),
        (lambda: m.spearman([1, 2, 3], [1, 1, 1]), "yhat is constant"),
        (lambda: m.spearman([1], [1]), "at least two rows"),
        (lambda: m.task_metrics([0, 1], [0.2, 0.7], [1, 1, 1], k=3), "length mismatch"),
        (lambda: m.task_metrics([0, 1], [0.2, 0.7], [1, 1], k=3, relevance=[1]), "relevance=1"),
        (lambda: m.task_metrics([0, 1], [0.2, 3.0], [1, 1], k=3), "probs must lie"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _delong_by_pairs(labels, a, b):
    """DeLong's paired variance straight from its definition: per-row structural components
    as means of the pairwise kernel (1 above, 1/2 tied), O(positives x negatives)."""

    def components(s):
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)

    auc_a, v10a, v01a = components(a)
    auc_b, v10b, v01b = components(b)
    m_, n_ = len(v10a), len(v01a)

    def cov(u, v):
        return ((u - u.mean()) * (v - v.mean())).sum() / (len(u) - 1)

    var = (cov(v10a, v10a) + cov(v10b, v10b) - 2 * cov(v10a, v10b)) / m_
    var += (cov(v01a, v01a) + cov(v01b, v01b) - 2 * cov(v01a, v01b)) / n_
    return auc_a, auc_b, math.sqrt(max(var, 0.0))


@SETTINGS
@given(ROWS, st.integers(0, 2**32 - 1))
def test_paired_auc_difference_matches_delong_by_pairs(rows, seed):
    _, labels, scores, _ = _columns(rows)
    assume(1 < labels.sum() < len(labels) - 1)
    # a second scoring: the first with noise on the same 0.1 grid (ties within and across)
    noise = np.random.default_rng(seed).integers(-2, 3, len(scores))
    other = np.clip(scores + noise, 0, 10).astype(np.float64)
    got = m.paired_auc_difference(labels, scores, other)
    want = _delong_by_pairs(labels, scores, other)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(m.auc(labels, scores), abs=1e-12)


def test_paired_auc_difference_hand():
    # the same scores: no difference and no error; one class only: undefined
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.8, 0.3, 0.6, 0.2, 0.5])
    a, b, se = m.paired_auc_difference(y, s, s)
    assert a == b == pytest.approx(7 / 9) and se == 0.0
    # the top positive and the top negative swapped: 7 of 9 pairs in order -> 5 (by hand)
    t = np.array([0.1, 0.5, 0.3, 0.6, 0.2, 0.8])
    a, b, se = m.paired_auc_difference(y, s, t)
    assert (a, b) == (pytest.approx(7 / 9), pytest.approx(5 / 9)) and se > 0
    with pytest.raises(ValueError, match="only one class"):
        m.paired_auc_difference(np.ones(3), s[:3], s[:3])
