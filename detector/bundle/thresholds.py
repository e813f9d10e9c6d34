"""Decision thresholds on P(machine) for a target false-positive rate, chosen on validation data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from detector.scoring import DEFAULT_THRESHOLD

__all__ = [
    "DEFAULT_TARGET_FPR",
    "DEFAULT_THRESHOLD",
    "rates_at_threshold",
    "threshold_at_fpr",
    "threshold_at_fpr_closest_to",
]

DEFAULT_TARGET_FPR = 0.01

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_arrays(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = scores.detach().cpu().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    s, y = s.astype(np.float64).reshape(-1), y.reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.size == 0:
        raise ValueError("scores is empty: a threshold needs validation predictions")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite value(s)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (human) or 1 (machine), got {sorted(set(y.tolist()) - {0, 1})}")
    return s, y.astype(np.int64)


def _allowed_false_positives(target_fpr: float, n_humans: int) -> int:
    # The largest k with k / n <= target in float arithmetic, the same test callers apply.
    k = math.floor(target_fpr * n_humans)
    while k + 1 <= n_humans and (k + 1) / n_humans <= target_fpr:
        k += 1
    while k > 0 and k / n_humans > target_fpr:
        k -= 1
    return k


def threshold_at_fpr(scores: ArrayLike, labels: ArrayLike, target_fpr: float = DEFAULT_TARGET_FPR) -> float:
    """The lowest threshold whose false-positive rate on ``(scores, labels)`` is at most ``target_fpr``.

    Tie rule: a text is predicted machine when ``score > threshold`` (strictly greater), so a score
    equal to the threshold is human. With the 0.5 default this matches argmax over the two logits,
    which picks human on a tie, as ``transformers.pipeline`` does.

    The threshold is one of the human scores itself (the (k+1)-th highest, where k is the number
    of false positives the target allows), so it is exact in float32 and in JSON, and the rate
    ``#{human: score > threshold} / #humans`` is at most ``target_fpr`` on this data, ties included.
    Among all thresholds meeting the target it predicts the most texts machine (highest TPR).

    Args:
        scores: P(machine) per text (any real scores work; only their order matters).
        labels: 0 for human, 1 for machine, one per score.
        target_fpr: the highest false-positive rate allowed, in ``[0, 1)``.

    Returns:
        The threshold as a Python float.

    Raises:
        ValueError: on empty or mismatched input, non-finite scores, labels outside {0, 1}, a target
            outside ``[0, 1)``, or no human text (the false-positive rate is then undefined).
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    s, y = _as_arrays(scores, labels)
    humans = np.sort(s[y == 0])[::-1]
    if humans.size == 0:
        raise ValueError("no human (label 0) text among the labels: the false-positive rate is undefined")
    return float(humans[_allowed_false_positives(target_fpr, humans.size)])


def threshold_at_fpr_closest_to(
    scores: ArrayLike, labels: ArrayLike, reference: ArrayLike, target_fpr: float = DEFAULT_TARGET_FPR
) -> float:
    """Of the thresholds meeting ``target_fpr``, the one whose decisions differ least from ``reference``.

    For a second model of the same task (the int8 copy of a float model): every threshold at or above
    :func:`threshold_at_fpr`'s keeps the false-positive rate on ``(scores, labels)`` within the target,
    and of those this returns the one at which the fewest texts' decisions (``score > threshold``)
    differ from ``reference``, the first model's decisions on the same texts; ties go to the lowest,
    which predicts the most texts machine. Where a small score change swaps two of the top human
    texts, :func:`threshold_at_fpr`'s moves past every text scored between the two; this one need not.

    Args:
        scores: P(machine) per text from the second model.
        labels: 0 for human, 1 for machine, one per score.
        reference: the first model's decision per text (True: machine).
        target_fpr: the highest false-positive rate allowed, in ``[0, 1)``.

    Returns:
        The threshold as a Python float: one of ``scores`` (exact in float32 and JSON, like
        :func:`threshold_at_fpr`'s).

    Raises:
        ValueError: as :func:`threshold_at_fpr`, or when ``reference`` differs from ``scores`` in length.
    """
    s, y = _as_arrays(scores, labels)
    said = np.asarray(reference, dtype=bool).reshape(-1)
    if said.shape != s.shape:
        raise ValueError(f"reference and scores differ in length: {said.shape[0]} vs {s.shape[0]}")
    lowest = threshold_at_fpr(s, y, target_fpr)
    candidates = np.unique(s[s >= lowest])  # sorted; between two scores the decisions do not change
    machine_said, human_said = np.sort(s[said]), np.sort(s[~said])
    turned_human = np.searchsorted(machine_said, candidates, side="right")  # said machine, score <= t
    turned_machine = human_said.size - np.searchsorted(human_said, candidates, side="right")
    return float(candidates[np.argmin(turned_human + turned_machine)])  # argmin: the first (lowest) on ties


def rates_at_threshold(scores: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[float, float]:
    """``(fpr, tpr)`` when machine is predicted for ``score > threshold``; NaN for a class with no text."""
    s, y = _as_arrays(scores, labels)
    predicted = s > threshold
    humans, machines = y == 0, y == 1
    fpr = float(predicted[humans].mean()) if humans.any() else math.nan
    tpr = float(predicted[machines].mean()) if machines.any() else math.nan
    return fpr, tpr
