"""Detection quality of P(machine) scores: metrics, calibration, breakdowns and bootstrap intervals.

Plain functions, no Trainer. The point metrics are the ones Lightning's ``test`` logs
(:func:`detector.metrics.classification_metrics`: torchmetrics AUROC, F1 and accuracy at 0.5, and
:func:`detector.metrics.tpr_at_fpr`), so a report and a ``test`` run on the same scores agree.
:func:`detector.evaluation.report.write_report` turns the result of :func:`evaluate` into a report folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_accuracy, binary_auroc

from detector.evaluation.bootstrap import percentile_intervals, resample_counts, weighted_metrics
from detector.metrics import MacroF1, tpr_at_fpr
from detector.scoring import DEFAULT_THRESHOLD

ECE_BINS = 15  # equal-width bins of P(machine) over [0, 1]
BREAKDOWN_COLUMNS = ("source", "generator")


def as_arrays(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[Any, Any]:
    """``(float64 scores, int64 labels)`` checked: same length, finite probabilities, labels 0/1."""
    s, y = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("no scores to evaluate")
    if not (np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()):
        raise ValueError("scores must be probabilities P(machine) in [0, 1]")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (human) or 1 (machine), got {sorted(set(y.tolist()))[:5]}")
    return s, y.astype(np.int64)


def reliability_bins(scores: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Per equal-width bin of P(machine): row count, mean score and share of machine texts.

    Bin ``i`` holds scores in ``[i / n_bins, (i + 1) / n_bins)``; the last bin also holds 1.0. Empty
    bins have count 0 and NaN means.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    scores, labels = as_arrays(scores, labels)
    index = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(index, scores, n_bins) / count
        frac_machine = np.bincount(index, labels.astype(np.float64), n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {"edges": edges, "count": count, "mean_score": mean_score, "frac_machine": frac_machine}


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of P(machine): ``sum_b (n_b / n) * |mean score_b - share of machine texts_b|``.

    Calibration of the machine-class probability itself (not of the max-class confidence), over
    ``n_bins`` equal-width bins (see :func:`reliability_bins`); empty bins contribute nothing.
    """
    bins = reliability_bins(scores, labels, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["mean_score"][filled] - bins["frac_machine"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / np.sum(bins["count"]))


def _macro_f1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    metric = MacroF1(DEFAULT_THRESHOLD)
    metric.update(scores, labels)
    return float(metric.compute())


def point_metrics(scores: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float | None]:
    """AUROC, macro-F1 (human and machine) and accuracy at 0.5, TPR at 1% and 5% FPR, ECE.

    AUROC and the TPRs are ``None`` unless both classes are present.
    """
    scores, labels = as_arrays(scores, labels)
    # Float64, as the module's scores (detector.scoring.prob_machine): float32 would merge near ties.
    s, y = torch.from_numpy(scores), torch.from_numpy(labels)
    both = 0 < labels.sum() < labels.size
    metrics: dict[str, float | None] = {
        "auroc": float(binary_auroc(s, y)) if both else None,
        "f1": _macro_f1(s, y),
        "acc": float(binary_accuracy(s, y, threshold=DEFAULT_THRESHOLD)),
        "tpr_at_1fpr": float(tpr_at_fpr(s, y, 0.01)) if both else None,
        "tpr_at_5fpr": float(tpr_at_fpr(s, y, 0.05)) if both else None,
        "ece": expected_calibration_error(scores, labels, n_bins),
    }
    return metrics


def breakdown_subsets(labels: np.ndarray, extra_columns: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Row indices of each breakdown subset: ``{"by_source": {name: rows}, "by_generator": {...}}``.

    By source: every row of that source (humans and machines). By generator: that generator's
    machine texts against *all* human texts of the data, since a generator has no humans of its
    own; the ``human`` generator is not a subset. Rows whose value is missing are left out.
    """
    labels = np.asarray(labels)
    humans = np.flatnonzero(labels == 0)
    subsets: dict[str, Any] = {}
    for column in BREAKDOWN_COLUMNS:
        values = extra_columns.get(column)
        if values is None:
            continue
        if len(values) != labels.size:
            raise ValueError(f"column {column!r} has {len(values)} values for {labels.size} rows")
        array = np.array([str(v) if v is not None else "" for v in values])
        names = sorted(set(array.tolist()) - {""})
        if column == "source":
            subsets["by_source"] = {name: np.flatnonzero(array == name) for name in names}
        else:
            machine = {n: np.flatnonzero((array == n) & (labels == 1)) for n in names}
            subsets["by_generator"] = {
                n: np.union1d(rows, humans) for n, rows in machine.items() if rows.size
            }
    return subsets


def subset_report(
    systems: Mapping[str, np.ndarray],
    labels: np.ndarray,
    key: str,
    bootstrap: int,
    seed: int,
    confidence: float,
) -> dict[str, dict[str, Any]]:
    """Per system: counts, point metrics and (``bootstrap > 0``) percentile intervals ``ci``."""
    counts = resample_counts(labels, bootstrap, seed, key) if bootstrap > 0 else None
    report = {}
    for name, scores in systems.items():
        entry: dict[str, Any] = {
            "n": int(labels.size),
            "n_human": int((labels == 0).sum()),
            "n_machine": int((labels == 1).sum()),
            **point_metrics(scores, labels),
        }
        if counts is not None:
            entry["ci"] = percentile_intervals(weighted_metrics(scores, labels, counts), confidence)
        report[name] = entry
    return report


def evaluate(
    systems: Mapping[str, Sequence[float] | np.ndarray],
    labels: Sequence[int] | np.ndarray,
    extra_columns: Mapping[str, Sequence[Any]] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Metrics of each system overall and per breakdown subset, with bootstrap intervals.

    Args:
        systems: P(machine) per row for each system, e.g. ``{"model": ..., "tfidf_baseline": ...}``.
        labels: 0 (human) / 1 (machine) per row.
        extra_columns: optional ``source`` and ``generator`` columns (see :func:`breakdown_subsets`).
        bootstrap: resamples per subset (0: no intervals); stratified by label, shared by the systems.
        seed: seed of the resamples: the same seed gives the same intervals.
        confidence: coverage of the percentile intervals.

    Returns:
        ``{"overall": {system: entry}, "by_source": {name: {system: entry}}, "by_generator": ...}``,
        an entry holding ``n``, ``n_human``, ``n_machine``, the metrics and ``ci`` (metric -> [low, high]).
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not systems:
        raise ValueError("no system to evaluate")
    checked = {name: as_arrays(scores, labels) for name, scores in systems.items()}
    y = next(iter(checked.values()))[1]
    scores = {name: pair[0] for name, pair in checked.items()}
    result: dict[str, Any] = {"overall": subset_report(scores, y, "overall", bootstrap, seed, confidence)}
    for group, subsets in breakdown_subsets(y, extra_columns or {}).items():
        result[group] = {
            name: subset_report(
                {k: v[rows] for k, v in scores.items()},
                y[rows],
                f"{group}/{name}",
                bootstrap,
                seed,
                confidence,
            )
            for name, rows in subsets.items()
        }
    return result
