import math

import numpy as np
import pytest
import torch

from detector.bundle.thresholds import rates_at_threshold, threshold_at_fpr, threshold_at_fpr_closest_to


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


def _changed(scores, reference, t):
    return sum((s > t) != said for s, said in zip(scores, reference, strict=True))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("target", [0.0, 0.01, 0.1, 0.29])
def test_closest_threshold_meets_the_target_and_changes_the_fewest_decisions(seed, target):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    labels = rng.integers(0, 2, n).tolist()
    labels[0] = 0
    scores = np.round(rng.random(n), int(rng.integers(1, 3))).tolist()  # ties across both classes
    reference = (rng.random(n) < 0.5).tolist()
    t = threshold_at_fpr_closest_to(scores, labels, reference, target)
    assert _fpr(scores, labels, t) <= target
    assert t in scores
    # Brute force over every threshold that gives distinct decisions and meets the target.
    allowed = [c for c in sorted(set(scores)) if _fpr(scores, labels, c) <= target]
    fewest = min(_changed(scores, reference, c) for c in allowed)
    assert _changed(scores, reference, t) == fewest
    assert t == min(c for c in allowed if _changed(scores, reference, c) == fewest)


def test_a_swap_of_two_top_human_scores_does_not_move_the_closest_threshold_past_the_texts_between():
    # 100 humans at 1% FPR: one false positive allowed, the threshold is the second-highest human score.
    # The float model: humans 0.80, 0.758, 0.753 on top, so its threshold is 0.758 and the four machine
    # texts at 0.754-0.757 are called human. The int8 copy scores the 0.758 human at 0.752 and the
    # 0.753 one at 0.7525: the lowest threshold meeting 1% falls to 0.7525 and flips all four.
    machines = [0.754, 0.755, 0.756, 0.757, 0.9]
    labels = [0] * 100 + [1] * 5
    float_scores = [0.80, 0.758, 0.753] + [0.3] * 97 + machines
    float_threshold = threshold_at_fpr(float_scores, labels, 0.01)
    assert float_threshold == 0.758
    float_says = [s > float_threshold for s in float_scores]
    int8 = [0.80, 0.752, 0.7525] + [0.3] * 97 + machines
    lowest = threshold_at_fpr(int8, labels, 0.01)
    assert (lowest, _changed(int8, float_says, lowest)) == (0.7525, 4)
    closest = threshold_at_fpr_closest_to(int8, labels, float_says, 0.01)
    assert (closest, _changed(int8, float_says, closest)) == (0.757, 0)
    assert _fpr(int8, labels, closest) == 0.01


def test_closest_threshold_rejects_a_reference_of_another_length():
    with pytest.raises(ValueError, match="reference and scores differ in length: 1 vs 2"):
        threshold_at_fpr_closest_to([0.1, 0.2], [0, 1], [True], 0.1)
