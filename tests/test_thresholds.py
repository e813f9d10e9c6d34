import math

import numpy as np
import pytest
import torch

from detector.bundle.thresholds import rates_at_threshold, threshold_at_fpr


def _fpr(scores, labels, threshold):
    humans = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    return sum(s > threshold for s in humans) / len(humans)


def _best_tpr_within(scores, labels, target):
    # Brute force over every candidate cut: each distinct score and one below all of them.
    candidates = [*sorted(set(scores)), min(scores) - 1.0]
    best = 0.0
    for t in candidates:
        fpr, tpr = rates_at_threshold(scores, labels, t)
        if fpr <= target:
            best = max(best, tpr)
    return best


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.1, 0.29, 0.5])
def test_threshold_meets_target_fpr_and_is_optimal_with_ties(seed, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    labels = rng.integers(0, 2, n).tolist()
    if 0 not in labels:
        labels[0] = 0
    # Rounded scores create many ties across both classes.
    scores = np.round(rng.random(n), int(rng.integers(1, 3))).tolist()
    t = threshold_at_fpr(scores, labels, target)
    assert _fpr(scores, labels, t) <= target
    assert rates_at_threshold(scores, labels, t)[1] == _best_tpr_within(scores, labels, target)


def test_threshold_is_exact_on_float32_tensors():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    labels = (torch.arange(1000) % 3 == 0).long()
    t = threshold_at_fpr(scores, labels, 0.01)
    assert torch.tensor(t, dtype=torch.float32).item() == t
    humans = scores[labels == 0]
    assert (humans > t).sum().item() == math.floor(0.01 * humans.numel())


def test_one_percent_of_two_hundred_humans_allows_two_false_positives():
    scores = [i / 200 for i in range(200)]
    t = threshold_at_fpr(scores, [0] * 200, 0.01)
    assert t == scores[-3]
    assert _fpr(scores, [0] * 200, t) == 0.01


def test_zero_target_puts_threshold_at_highest_human_score():
    assert threshold_at_fpr([0.2, 0.9, 0.7, 0.95], [0, 0, 1, 1], 0.0) == 0.9


def test_all_equal_scores_predict_nothing_machine():
    t = threshold_at_fpr([0.4] * 10, [0, 1] * 5, 0.5)
    assert t == 0.4
    assert rates_at_threshold([0.4] * 10, [0, 1] * 5, t) == (0.0, 0.0)


def test_only_humans_still_gives_a_threshold():
    assert threshold_at_fpr([0.1, 0.3, 0.2], [0, 0, 0], 0.4) == 0.2


def test_no_human_text_is_an_error():
    with pytest.raises(ValueError, match="no human"):
        threshold_at_fpr([0.1, 0.9], [1, 1])


@pytest.mark.parametrize(
    ("scores", "labels", "target", "match"),
    [
        ([0.1], [0], 1.0, "target_fpr"),
        ([0.1], [0], -0.1, "target_fpr"),
        ([], [], 0.01, "empty"),
        ([0.1, 0.2], [0], 0.01, "differ in length"),
        ([0.1, math.nan], [0, 1], 0.01, "non-finite"),
        ([0.1, 0.2], [0, 2], 0.01, "labels must be"),
    ],
)
def test_bad_input_is_rejected(scores, labels, target, match):
    with pytest.raises(ValueError, match=match):
        threshold_at_fpr(scores, labels, target)


def test_rates_use_strictly_greater_and_nan_for_missing_class():
    assert rates_at_threshold([0.5, 0.6, 0.5, 0.7], [0, 0, 1, 1], 0.5) == (0.5, 0.5)
    fpr, tpr = rates_at_threshold([0.5], [0], 0.1)
    assert fpr == 1.0 and math.isnan(tpr)
