"""Bootstrap confidence intervals: every metric on many weighted resamples at once, in NumPy.

A bootstrap resample is a vector of counts (how often each row was drawn). The metrics here take a
``(resamples, rows)`` matrix of such counts and compute every resample in one vectorised pass; with
all counts 1 they equal the point metrics of :mod:`detector.evaluation.metrics` (the tests check it).
Resampling is stratified by label: each resample keeps the subset's human and machine counts, so
every resample has both classes whenever the subset does.
"""

from __future__ import annotations

import zlib

import numpy as np

from detector.scoring import DEFAULT_THRESHOLD

METRICS = ("auroc", "f1", "acc", "tpr_at_1fpr", "tpr_at_5fpr", "ece")


def resample_counts(labels: np.ndarray, n_resamples: int, seed: int, key: str = "") -> np.ndarray:
    """``(n_resamples, len(labels))`` draw counts, stratified by label, seeded by ``(seed, key)``.

    ``key`` (a subset's name) gives each subset its own stream, so adding a subset to a report never
    changes another subset's intervals; every system scored on a subset gets the same resamples.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
    counts = np.zeros((n_resamples, len(labels)))
    for value in (0, 1):
        rows = np.flatnonzero(labels == value)
        if rows.size:
            counts[:, rows] = rng.multinomial(rows.size, np.full(rows.size, 1.0 / rows.size), n_resamples)
    return counts


def _roc(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ROC points per resample, from (0, 0), one point per distinct score (descending)."""
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], labels[order], w[:, order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(w * y, axis=1)[:, last_of_tie]
    fp = np.cumsum(w * (1 - y), axis=1)[:, last_of_tie]
    zeros = np.zeros((w.shape[0], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.hstack([zeros, tp]) / tp[:, -1:]
        fpr = np.hstack([zeros, fp]) / fp[:, -1:]
    return fpr, tpr


def macro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """Mean of the machine and human F1, over the classes present in labels or predictions.

    The vectorised twin of :class:`detector.metrics.MacroF1` (torchmetrics' macro average, which skips
    a class with no true positive, false positive or false negative).
    """
    per_class = []
    for hit, false_pos, false_neg in ((tp, fp, fn), (tn, fn, fp)):
        denom = 2 * hit + false_pos + false_neg
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append((np.where(denom > 0, 2 * hit / denom, 0.0), denom > 0))
    present = per_class[0][1].astype(np.float64) + per_class[1][1]
    total = per_class[0][0] * per_class[0][1] + per_class[1][0] * per_class[1][1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, total / present, 0.0)


def weighted_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    counts: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    n_bins: int = 15,
) -> dict[str, np.ndarray]:
    """Every metric of ``METRICS`` per row of ``counts``; NaN where a class is missing (AUROC, TPR)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    fpr, tpr = _roc(scores, labels, counts)
    result = {"auroc": np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)}
    for name, max_fpr in (("tpr_at_1fpr", 0.01), ("tpr_at_5fpr", 0.05)):
        result[name] = np.where(fpr <= max_fpr, tpr, -np.inf).max(axis=1)
        result[name][np.isnan(fpr[:, -1]) | np.isnan(tpr[:, -1])] = np.nan
    result["auroc"][np.isnan(fpr[:, -1]) | np.isnan(tpr[:, -1])] = np.nan
    flagged = (scores > threshold).astype(np.float64)
    tp, fp = counts @ (flagged * labels), counts @ (flagged * (1 - labels))
    fn, tn = counts @ ((1 - flagged) * labels), counts @ ((1 - flagged) * (1 - labels))
    total = counts.sum(axis=1)
    result["f1"] = macro_f1(tp, fp, fn, tn)
    with np.errstate(invalid="ignore", divide="ignore"):
        result["acc"] = counts @ (flagged == labels).astype(np.float64) / total
    bins = np.eye(n_bins)[np.minimum((scores * n_bins).astype(int), n_bins - 1)]
    gap = counts @ (bins * (scores - labels)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        result["ece"] = np.abs(gap).sum(axis=1) / total
    return result


def percentile_intervals(
    samples: dict[str, np.ndarray], confidence: float = 0.95
) -> dict[str, tuple[float, float] | None]:
    """The percentile interval of each metric's bootstrap samples; ``None`` where a sample is NaN."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    tail = 100 * (1 - confidence) / 2
    intervals: dict[str, tuple[float, float] | None] = {}
    for name, values in samples.items():
        if np.isnan(values).any():
            intervals[name] = None
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = (float(low), float(high))
    return intervals
