"""Tests for the pure checkpoint retention policy."""

import math

import pytest

from detector.checkpoint.topk import (
    CheckpointTracker,
    LastN,
    TopK,
    best_name,
    epoch_name,
    is_better,
    step_name,
    top_k_name,
)

NAN, INF = math.nan, math.inf


def run_top_k(scores: list[float], k: int, mode: str = "max") -> tuple[list[str], list[str], list[bool]]:
    """Offer f"c{i}" for each score; return (kept best first, deleted in order, kept flags)."""
    tracker = CheckpointTracker(mode=mode, save_top_k=k)
    flags = [tracker.offer_top_k(score, f"c{i}") for i, score in enumerate(scores)]
    return [r.name for r in tracker.top_k.kept], tracker.deletions, flags


def test_top_k_keeps_best_k_by_score_and_deletes_in_eviction_order() -> None:
    kept, deleted, flags = run_top_k([0.1, 0.5, 0.3, 0.7, 0.2, 0.6], k=2)
    assert kept == ["c3", "c5"]
    assert deleted == ["c0", "c2", "c1"]
    assert flags == [True, True, True, True, False, True]


def test_top_k_min_mode_keeps_lowest() -> None:
    kept, deleted, _ = run_top_k([0.9, 0.4, 0.6, 0.1], k=2, mode="min")
    assert kept == ["c3", "c1"]
    assert deleted == ["c0", "c2"]


def test_top_k_tie_keeps_the_earlier_file() -> None:
    kept, deleted, flags = run_top_k([0.5, 0.5, 0.5], k=1)
    assert kept == ["c0"]
    assert deleted == []
    assert flags == [True, False, False]


def test_top_k_tie_orders_earlier_first_within_kept() -> None:
    kept, _, _ = run_top_k([0.5, 0.7, 0.5, 0.5], k=3)
    assert kept == ["c1", "c0", "c2"]


def test_nan_first_fills_a_free_slot_then_first_finite_score_evicts_it() -> None:
    kept, deleted, flags = run_top_k([NAN, 0.1, 0.2], k=2)
    assert kept == ["c2", "c1"]
    assert deleted == ["c0"]
    assert flags == [True, True, True]


def test_nan_never_displaces_a_finite_score() -> None:
    kept, deleted, flags = run_top_k([0.1, NAN, NAN], k=1)
    assert kept == ["c0"]
    assert deleted == []
    assert flags == [True, False, False]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_infinities_rank_below_every_finite_score(mode: str) -> None:
    kept, deleted, _ = run_top_k([INF, -INF, 0.3, 0.4], k=2, mode=mode)
    assert set(kept) == {"c2", "c3"}
    assert deleted == ["c1", "c0"]  # the later non-finite ranks below the earlier one


def test_non_finite_scores_tie_among_themselves_earlier_first() -> None:
    kept, _, _ = run_top_k([NAN, INF, -INF], k=3)
    assert kept == ["c0", "c1", "c2"]


def test_top_k_zero_keeps_nothing_and_minus_one_keeps_all() -> None:
    assert run_top_k([0.1, 0.2], k=0)[:2] == ([], [])
    assert run_top_k([0.1, 0.3, 0.2], k=-1)[:2] == (["c1", "c2", "c0"], [])


def test_reoffering_a_kept_name_replaces_it() -> None:
    top = TopK(2, "max")
    top.offer(0.5, "a")
    top.offer(0.4, "b")
    assert top.offer(0.9, "b") == (True, [])
    assert [(r.score, r.name) for r in top.kept] == [(0.9, "b"), (0.5, "a")]


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_is_never_non_finite_and_ties_keep_the_earlier(mode: str) -> None:
    tracker = CheckpointTracker(mode=mode)
    sign = 1 if mode == "max" else -1
    results = [tracker.offer_best(s, epoch=i, step=10 * i) for i, s in enumerate([NAN, INF, -INF])]
    assert results == [False, False, False]
    assert tracker.best is None
    results = [tracker.offer_best(sign * s, epoch=i, step=i) for i, s in enumerate([0.2, 0.5, 0.5, 0.3])]
    assert results == [True, True, False, False]
    assert tracker.best == {"score": sign * 0.5, "epoch": 1, "step": 1}
    assert tracker.offer_best(NAN, epoch=9, step=9) is False


def test_is_better_orders_finite_above_non_finite() -> None:
    assert is_better(0.0, NAN, "max") and is_better(0.0, INF, "max") and is_better(0.0, -INF, "min")
    assert (
        not is_better(NAN, 0.0, "max") and not is_better(INF, 0.0, "max") and not is_better(-INF, 0.0, "min")
    )
    assert not is_better(NAN, NAN, "max")


def test_periodic_retention_keeps_last_n_of_each_kind_independently() -> None:
    tracker = CheckpointTracker(keep_last_epochs=2, keep_last_steps=1)
    for epoch in range(4):
        tracker.add_epoch(epoch_name(epoch))
    for step in (100, 200, 300):
        tracker.add_step(step_name(step))
    assert tracker.epochs.kept == ["checkpoint_epoch_2.safetensors", "checkpoint_epoch_3.safetensors"]
    assert tracker.steps.kept == ["checkpoint_step_300.safetensors"]
    assert tracker.deletions == [
        "checkpoint_epoch_0.safetensors",
        "checkpoint_epoch_1.safetensors",
        "checkpoint_step_100.safetensors",
        "checkpoint_step_200.safetensors",
    ]


def test_last_n_keep_all_and_re_adding_moves_to_end() -> None:
    everything = LastN(-1, "keep_last_steps")
    assert [everything.add(n) for n in "abc"] == [[], [], []]
    last_two = LastN(2, "keep_last_steps")
    last_two.add("a")
    last_two.add("b")
    assert last_two.add("a") == []
    assert last_two.add("c") == ["b"]
    assert last_two.kept == ["a", "c"]


def test_deletions_never_name_a_file_still_kept_and_clear() -> None:
    tracker = CheckpointTracker(keep_last_steps=1)
    tracker.add_step("s1")
    tracker.add_step("s2")
    assert tracker.deletions == ["s1"]
    tracker.add_step("s1")
    assert tracker.deletions == ["s2"]
    tracker.clear_deletions()
    assert tracker.deletions == []


def feed(tracker: CheckpointTracker, scores: list[float], first: int) -> None:
    """Register epoch ``first + i`` with ``scores[i]`` the way the callback does at each validation."""
    for i, score in enumerate(scores, start=first):
        tracker.offer_top_k(score, top_k_name("val_f1", i, 10 * i, score))
        tracker.offer_best(score, i, 10 * i)
        tracker.add_epoch(epoch_name(i))
        tracker.record(i, 10 * i, {"val_f1": score})


def test_state_round_trip_continues_rotation_exactly() -> None:
    scores = [0.3, NAN, 0.8, 0.5, 0.9, 0.1, 0.85]
    limits = {"mode": "max", "save_top_k": 2, "keep_last_epochs": 2}
    uninterrupted, first_half, resumed = (CheckpointTracker(**limits) for _ in range(3))
    feed(uninterrupted, scores, 0)
    feed(first_half, scores[:3], 0)
    resumed.load_state_dict(first_half.state_dict())
    feed(resumed, scores[3:], 3)
    got, want = resumed.state_dict(), uninterrupted.state_dict()
    assert [h["epoch"] for h in got["history"]] == list(range(7))
    assert math.isnan(got["history"][1]["metrics"]["val_f1"])
    del got["history"], want["history"]
    assert got == want
    assert want["top_k"] == [
        [0.9, "checkpoint_top_epoch_4_step_40_val_f1_0.9000.safetensors"],
        [0.85, "checkpoint_top_epoch_6_step_60_val_f1_0.8500.safetensors"],
    ]
    assert want["best"] == {"score": 0.9, "epoch": 4, "step": 40}
    assert want["epochs"] == ["checkpoint_epoch_5.safetensors", "checkpoint_epoch_6.safetensors"]


def test_load_state_with_other_mode_fails() -> None:
    state = CheckpointTracker(mode="min").state_dict()
    with pytest.raises(ValueError, match="mode='min'"):
        CheckpointTracker(mode="max").load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_top_k": -2}, "save_top_k must be an int >= 0 or -1"),
        ({"keep_last_epochs": 0}, "keep_last_epochs must be an int >= 1 or -1"),
        ({"keep_last_steps": 1.5}, "keep_last_steps must be an int >= 1 or -1"),
        ({"mode": "maximum"}, "mode must be one of"),
    ],
)
def test_bad_limits_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointTracker(**kwargs)


def test_file_names_are_safe_and_documented() -> None:
    assert best_name("val_f1") == "checkpoint_best_val_f1.safetensors"
    assert best_name("val/f1 score") == "checkpoint_best_val_f1_score.safetensors"
    assert (
        top_k_name("val_f1", 3, 400, 0.81234) == "checkpoint_top_epoch_3_step_400_val_f1_0.8123.safetensors"
    )
    assert top_k_name("val_loss", 0, 5, NAN) == "checkpoint_top_epoch_0_step_5_val_loss_nan.safetensors"
    assert epoch_name(2) == "checkpoint_epoch_2.safetensors"
    assert step_name(500) == "checkpoint_step_500.safetensors"
