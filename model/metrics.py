"""Exact, vectorised evaluation metrics for multi-task ranking and continuous targets.

Every metric is computed exactly (no binning, no sampling) with numpy and no Python loop over
rows or users. Inputs are 1-D array-likes (lists, numpy arrays, pandas Series) of any float or
integer dtype; they are promoted to float64 before any arithmetic, so float32 and float64 inputs
give the same result for the same values. Every function raises ``ValueError`` naming the
argument when an input is not 1-D, is empty, has a length different from its siblings, contains
NaN, or when the metric is undefined for the data (for example AUC with one class only).

Conventions:
    * Ranking scores may be ``+-inf`` (only their order is used); values entering arithmetic
      (labels, probabilities, relevances, regression targets and predictions) must be finite.
    * Ties in ranking scores get average ranks (AUC, GAUC, Spearman, Gini), which equals the
      expectation of the metric over random orderings of the tied items. NDCG instead breaks
      ties pessimistically (see :func:`ndcg_at_k`).
    * Groups (users) may be any 1-D array of hashable, sortable values (ints, strings); NaN
      group keys are rejected.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "regression_metrics",
    "auc",
    "gauc",
    "gini",
    "logloss",
    "ndcg_at_k",
    "nmae",
    "nrmse",
    "rela_impr_auc",
    "rela_impr_ndcg",
    "spearman",
    "task_metrics",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def _vector(x: ArrayLike, name: str, *, allow_inf: bool = False) -> FloatArray:
    """Returns ``x`` as a new 1-D float64 array after checking shape, dtype and NaN/inf."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric (bool, int or float), got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    n_nan = int(np.isnan(out).sum())
    if n_nan:
        raise ValueError(f"{name} contains {n_nan} NaN value(s)")
    if not allow_inf:
        n_inf = int(np.isinf(out).sum())
        if n_inf:
            raise ValueError(f"{name} contains {n_inf} infinite value(s)")
    return out


def _same_length(**arrays: np.ndarray) -> int:
    """Returns the common length of ``arrays`` or raises naming every length."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"length mismatch: {detail}")
    return next(iter(lengths.values()))


def _binary(labels: FloatArray, name: str = "labels") -> FloatArray:
    """Checks that ``labels`` only holds 0 and 1."""
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        examples = np.unique(labels[bad])[:5].tolist()
        raise ValueError(f"{name} must be binary 0/1, found other values such as {examples}")
    return labels


def _in_unit_interval(x: FloatArray, name: str) -> FloatArray:
    """Checks that every value of ``x`` lies in [0, 1]."""
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1], got range [{x.min()}, {x.max()}]")
    return x


def _codes(groups: ArrayLike, name: str = "groups") -> tuple[IntArray, int]:
    """Factorises group keys into dense codes ``0..G-1`` (in sorted key order).

    Returns:
        The int64 code of each row and the number of distinct groups ``G``.
    """
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if arr.dtype.kind in "fc" and np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN value(s)")
    try:
        keys, inverse = np.unique(arr, return_inverse=True)
    except TypeError as exc:  # e.g. object arrays mixing None and numbers
        raise ValueError(f"{name} holds keys that cannot be sorted: {exc}") from exc
    return inverse.reshape(-1).astype(np.int64), len(keys)


# --------------------------------------------------------------------------------------------
# ranking helpers
# --------------------------------------------------------------------------------------------


def _starts(flags: NDArray[np.bool_]) -> tuple[IntArray, IntArray]:
    """For run-start ``flags`` returns each run's start position and each row's run id."""
    starts = np.flatnonzero(flags)
    run_id = np.cumsum(flags) - 1
    return starts, run_id


def _group_flags(codes_sorted: IntArray) -> NDArray[np.bool_]:
    """Flags the first row of every group in a group-sorted code array."""
    flags = np.empty(len(codes_sorted), dtype=bool)
    flags[0] = True
    flags[1:] = codes_sorted[1:] != codes_sorted[:-1]
    return flags


def _twice_average_ranks(codes_sorted: IntArray, values_sorted: FloatArray) -> IntArray:
    """Twice the 1-based average rank of each row within its group, as exact integers.

    Rows must be sorted by (group, value) ascending. A tie block occupying sorted positions
    ``[s, e)`` of a group starting at ``g`` gets the average rank ``(s - g + 1 + e - g) / 2``;
    doubling keeps it an integer so that rank sums are exact.
    """
    n = len(codes_sorted)
    new_group = _group_flags(codes_sorted)
    new_block = new_group.copy()
    new_block[1:] |= values_sorted[1:] != values_sorted[:-1]
    block_starts, block_id = _starts(new_block)
    block_ends = np.append(block_starts[1:], n)
    group_starts, group_id = _starts(new_group)
    return (block_starts[block_id] + block_ends[block_id] + 1 - 2 * group_starts[group_id]).astype(
        np.int64
    )


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks of ``x`` with ties given their average rank (original row order)."""
    order = np.argsort(x, kind="stable")
    twice = _twice_average_ranks(np.zeros(len(x), dtype=np.int64), x[order])
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = twice / 2.0
    return ranks


def _grouped_auc(
    labels: FloatArray, scores: FloatArray, codes: IntArray, n_groups: int
) -> tuple[FloatArray, IntArray, NDArray[np.bool_]]:
    """Exact per-group Mann-Whitney AUC.

    Returns:
        Per-group AUC (NaN where a group lacks a class), per-group row counts, and the mask of
        groups holding both classes.
    """
    order = np.lexsort((scores, codes))
    codes_sorted = codes[order]
    positive = labels[order].astype(np.int64)
    twice = _twice_average_ranks(codes_sorted, scores[order])
    group_starts = np.flatnonzero(_group_flags(codes_sorted))
    twice_rank_sum = np.add.reduceat(twice * positive, group_starts)  # exact int64
    n_rows = np.bincount(codes, minlength=n_groups).astype(np.int64)
    n_pos = np.add.reduceat(positive, group_starts)
    n_neg = n_rows - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    twice_u = twice_rank_sum - n_pos * (n_pos + 1)
    per_group = np.full(n_groups, np.nan)
    per_group[valid] = twice_u[valid] / (2.0 * n_pos[valid] * n_neg[valid])
    return per_group, n_rows, valid


# --------------------------------------------------------------------------------------------
# ranking metrics
# --------------------------------------------------------------------------------------------


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney U statistic normalised by ``n_pos * n_neg``).

    Tied scores get average ranks, so a positive/negative pair with equal scores counts 1/2.
    Rank sums are accumulated in int64, making the result exact up to the final division.

    Args:
        labels: Binary 0/1 (or bool) labels.
        scores: Ranking scores; higher means more likely positive. May contain ``+-inf``.

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: On invalid inputs, or if only one class is present.
    """
    y = _binary(_vector(labels, "labels"))
    s = _vector(scores, "scores", allow_inf=True)
    _same_length(labels=y, scores=s)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        only = "positive" if n_pos else "negative"
        raise ValueError(f"AUC is undefined: labels hold only one class ({only}, n={len(y)})")
    per_group, _, _ = _grouped_auc(y, s, np.zeros(len(y), dtype=np.int64), 1)
    return float(per_group[0])


def paired_auc_difference(
    labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike
) -> tuple[float, float, float]:
    """(AUC of a, AUC of b, standard error of AUC_b - AUC_a) of two scorings of the same rows:
    DeLong, DeLong & Clarke-Pearson (1988), in the midrank form of Sun & Xu (2014).

    The error is that of the rows as a sample: two models whose scores agree closely have a
    small one even where each AUC alone is uncertain (a rare label), so a difference can be
    judged against it. Each AUC is the Mann-Whitney statistic, as :func:`auc`.

    Raises:
        ValueError: On invalid inputs, or if only one class is present.
    """
    y = _binary(_vector(labels, "labels"))
    a = _vector(scores_a, "scores_a", allow_inf=True)
    b = _vector(scores_b, "scores_b", allow_inf=True)
    _same_length(labels=y, scores_a=a, scores_b=b)
    pos = y == 1
    m, n = int(pos.sum()), int((~pos).sum())
    if m == 0 or n == 0:
        only = "positive" if m else "negative"
        raise ValueError(f"AUC is undefined: labels hold only one class ({only}, n={len(y)})")
    aucs, v10, v01 = [], [], []
    for s in (a, b):
        # a positive's placement: the share of negatives it outranks (ties 1/2), from its rank
        # among all rows less its rank among the positives; a negative's, the share of
        # positives that outrank it
        all_ranks = _average_ranks(s)
        pos_ranks, neg_ranks = _average_ranks(s[pos]), _average_ranks(s[~pos])
        v10.append((all_ranks[pos] - pos_ranks) / n)
        v01.append(1.0 - (all_ranks[~pos] - neg_ranks) / m)
        aucs.append(float(v10[-1].mean()))
    s10 = np.cov(np.vstack(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack(v01)) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = max(float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]), 0.0)
    return aucs[0], aucs[1], float(np.sqrt(var))


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """Group (user) AUC: per-user AUC averaged with impression weights.

    ``GAUC = sum_u n_u * AUC_u / sum_u n_u`` where ``n_u`` is the number of impressions (rows) of
    user ``u``. Users whose labels hold a single class are excluded from both sums. Computed
    without a loop over users: rows are sorted by (user, score) and per-user rank sums are taken
    with ``np.add.reduceat``; ties within a user get average ranks.

    Args:
        labels: Binary 0/1 labels.
        scores: Ranking scores. May contain ``+-inf``.
        groups: User (or request) key of each row.

    Returns:
        The impression-weighted mean of per-user AUCs.

    Raises:
        ValueError: On invalid inputs, or if no user holds both classes.
    """
    y = _binary(_vector(labels, "labels"))
    s = _vector(scores, "scores", allow_inf=True)
    codes, n_groups = _codes(groups)
    _same_length(labels=y, scores=s, groups=codes)
    per_group, n_rows, valid = _grouped_auc(y, s, codes, n_groups)
    if not valid.any():
        raise ValueError(f"GAUC is undefined: none of the {n_groups} groups holds both classes")
    weights = n_rows[valid].astype(np.float64)
    return float(np.dot(weights, per_group[valid]) / weights.sum())


def ndcg_at_k(
    relevance: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike,
    k: int,
    *,
    gain: Literal["exponential", "linear"] = "exponential",
) -> float:
    """Mean over users of NDCG@k.

    ``DCG@k = sum_{i<k} g(rel_i) / log2(i + 2)`` over the user's items in descending score
    order (``i`` 0-based), with ``g(r) = 2**r - 1`` (``gain="exponential"``, default) or
    ``g(r) = r`` (``gain="linear"``, as in ``sklearn.metrics.ndcg_score``). The ideal DCG uses
    the same formula on the user's relevances sorted in descending order. Users with fewer
    than ``k`` items are scored on all their items.

    Ties in scores are broken pessimistically and deterministically: among items with equal
    scores, the one with lower relevance is ranked first. The result therefore does not depend
    on row order and is a lower bound on the tie-averaged NDCG.

    Only users with at least two items and at least one positive relevance count; the others
    are excluded from the mean.

    Args:
        relevance: Non-negative relevance per row, binary (0/1) or graded (e.g. bin index).
        scores: Ranking scores. May contain ``+-inf``.
        groups: User (or request) key of each row.
        k: Cut-off, a positive integer.
        gain: ``"exponential"`` (``2**rel - 1``) or ``"linear"`` (``rel``).

    Returns:
        The mean NDCG@k over qualifying users.

    Raises:
        ValueError: On invalid inputs, a non-positive ``k``, an unknown ``gain``, or if no user
            qualifies.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if gain not in ("exponential", "linear"):
        raise ValueError(f"gain must be 'exponential' or 'linear', got {gain!r}")
    rel = _vector(relevance, "relevance")
    if rel.min() < 0:
        raise ValueError(f"relevance must be non-negative, got minimum {rel.min()}")
    s = _vector(scores, "scores", allow_inf=True)
    codes, n_groups = _codes(groups)
    _same_length(relevance=rel, scores=s, groups=codes)

    gains = np.exp2(rel) - 1.0 if gain == "exponential" else rel
    ranked = np.lexsort((rel, -s, codes))  # by user, score desc, then relevance asc
    ideal = np.lexsort((-rel, codes))  # by user, relevance desc
    codes_sorted = codes[ranked]  # identical for both orders: users are contiguous, same sizes
    group_starts, group_id = _starts(_group_flags(codes_sorted))
    position = np.arange(len(codes_sorted)) - group_starts[group_id]
    in_top = position < k
    discount = np.zeros(len(position))
    discount[in_top] = 1.0 / np.log2(position[in_top] + 2.0)
    dcg = np.bincount(codes_sorted, weights=gains[ranked] * discount, minlength=n_groups)
    idcg = np.bincount(codes_sorted, weights=gains[ideal] * discount, minlength=n_groups)
    n_rows = np.bincount(codes, minlength=n_groups)
    valid = (n_rows >= 2) & (idcg > 0)
    if not valid.any():
        raise ValueError(
            f"NDCG is undefined: none of the {n_groups} groups has >= 2 items and a positive "
            "relevance"
        )
    return float(np.mean(dcg[valid] / idcg[valid]))


def logloss(labels: ArrayLike, probs: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy.

    ``-mean(y * log(p) + (1 - y) * log(1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]``.

    Args:
        labels: Targets in [0, 1]; soft labels are allowed.
        probs: Predicted probabilities in [0, 1] (not logits).
        eps: Clipping constant, in (0, 0.5).

    Returns:
        The mean log loss in nats.

    Raises:
        ValueError: On invalid inputs, values outside [0, 1], or an invalid ``eps``.
    """
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps}")
    y = _in_unit_interval(_vector(labels, "labels"), "labels")
    p = _in_unit_interval(_vector(probs, "probs"), "probs")
    _same_length(labels=y, probs=p)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def rela_impr_auc(auc: float, auc_base: float) -> float:
    """Relative AUC improvement over a base model: ``(auc - 0.5) / (auc_base - 0.5) - 1``.

    Raises:
        ValueError: If ``auc_base`` is 0.5 (the ratio is undefined).
    """
    if auc_base == 0.5:
        raise ValueError("rela_impr_auc is undefined for auc_base == 0.5")
    return (auc - 0.5) / (auc_base - 0.5) - 1.0


def rela_impr_ndcg(ndcg: float, ndcg_base: float) -> float:
    """Relative NDCG improvement over a base model: ``ndcg / ndcg_base - 1``.

    Raises:
        ValueError: If ``ndcg_base`` is 0.
    """
    if ndcg_base == 0:
        raise ValueError("rela_impr_ndcg is undefined for ndcg_base == 0")
    return ndcg / ndcg_base - 1.0


def task_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    users: ArrayLike,
    *,
    k: int,
    relevance: ArrayLike | None = None,
) -> dict[str, float]:
    """All ranking metrics of one task.

    Args:
        labels: Binary 0/1 labels of the task.
        scores: Predicted probabilities in [0, 1] (used for ranking and for the log loss).
        users: User key of each row.
        k: NDCG cut-off.
        relevance: Relevance for NDCG (e.g. graded bin index); defaults to ``labels``.

    Returns:
        ``{"auc", "gauc", f"ndcg@{k}", "logloss", "n"}`` where ``n`` is the number of rows.

    Raises:
        ValueError: As raised by the individual metrics (invalid inputs or undefined metric).
    """
    y = _binary(_vector(labels, "labels"))
    s = _vector(scores, "scores")
    codes, _ = _codes(users, "users")
    _same_length(labels=y, scores=s, users=codes)
    rel = y if relevance is None else _vector(relevance, "relevance")
    _same_length(labels=y, relevance=rel)
    return {
        "auc": auc(y, s),
        "gauc": gauc(y, s, codes),
        f"ndcg@{k}": ndcg_at_k(rel, s, codes, k),
        "logloss": logloss(y, s),
        "n": float(len(y)),
    }


# --------------------------------------------------------------------------------------------
# regression metrics (continuous targets)
# --------------------------------------------------------------------------------------------


def _regression_pair(y: ArrayLike, yhat: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validates a (target, prediction) pair of finite 1-D vectors of equal length."""
    t = _vector(y, "y")
    p = _vector(yhat, "yhat")
    _same_length(y=t, yhat=p)
    return t, p


def _positive_mean(t: FloatArray) -> float:
    """Mean of ``t``, the normaliser of NRMSE/NMAE; must be positive."""
    mean = float(np.mean(t))
    if mean <= 0:
        raise ValueError(f"normaliser mean(y) must be positive, got {mean}")
    return mean


def nrmse(y: ArrayLike, yhat: ArrayLike) -> float:
    """Normalised RMSE: ``sqrt(mean((y - yhat)**2)) / mean(y)``.

    The normaliser is the mean of the target ``y``.

    Raises:
        ValueError: On invalid inputs or if ``mean(y) <= 0``.
    """
    t, p = _regression_pair(y, yhat)
    return float(np.sqrt(np.mean((t - p) ** 2)) / _positive_mean(t))


def nmae(y: ArrayLike, yhat: ArrayLike) -> float:
    """Normalised MAE: ``mean(|y - yhat|) / mean(y)``.

    The normaliser is the mean of the target ``y``.

    Raises:
        ValueError: On invalid inputs or if ``mean(y) <= 0``.
    """
    t, p = _regression_pair(y, yhat)
    return float(np.mean(np.abs(t - p)) / _positive_mean(t))


def gini(y: ArrayLike, yhat: ArrayLike) -> float:
    """Normalised Gini coefficient of ``y`` ranked by ``yhat``: ``Gini(y, yhat) / Gini(y, y)``.

    ``Gini(y, s)`` is the area between the cumulative share of ``y`` (items sorted by ``s``
    descending) and the diagonal, i.e. the usual Kaggle definition. It equals
    ``cov(y, rank(s)) / (n * mean(y))``, so the normalised value is
    ``cov(y, rank(yhat)) / cov(y, rank(y))``. Ties in ``yhat`` get average ranks, which equals
    the expected Gini over random orderings of the tied items (the Kaggle reference instead
    breaks ties by row order). 1 is a perfect ordering, 0 a random one, negative worse.

    Raises:
        ValueError: On invalid inputs or if ``y`` is constant (``Gini(y, y) == 0``).
    """
    t, p = _regression_pair(y, yhat)
    centred = t - t.mean()
    denominator = float(np.dot(centred, _average_ranks(t)))
    if denominator <= 0:
        raise ValueError("normalised Gini is undefined: y is constant")
    return float(np.dot(centred, _average_ranks(p)) / denominator)


def spearman(y: ArrayLike, yhat: ArrayLike) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks).

    Raises:
        ValueError: On invalid inputs, fewer than two rows, or a constant ``y`` or ``yhat``.
    """
    t, p = _regression_pair(y, yhat)
    if len(t) < 2:
        raise ValueError("Spearman correlation needs at least two rows")
    rt = _average_ranks(t)
    rp = _average_ranks(p)
    rt -= rt.mean()
    rp -= rp.mean()
    st, sp = float(np.dot(rt, rt)), float(np.dot(rp, rp))
    if st == 0 or sp == 0:
        which = "y" if st == 0 else "yhat"
        raise ValueError(f"Spearman correlation is undefined: {which} is constant")
    return float(np.clip(np.dot(rt, rp) / np.sqrt(st * sp), -1.0, 1.0))


def regression_metrics(y: ArrayLike, yhat: ArrayLike) -> dict[str, float]:
    """NRMSE, NMAE, normalised Gini and Spearman of a continuous target, plus ``n``."""
    t, p = _regression_pair(y, yhat)
    return {
        "nrmse": nrmse(t, p),
        "nmae": nmae(t, p),
        "gini": gini(t, p),
        "spearman": spearman(t, p),
        "n": float(len(t)),
    }
