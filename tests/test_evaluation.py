import json

import numpy as np
import pytest

from detector.evaluation.bootstrap import METRICS, percentile_intervals, resample_counts, weighted_metrics
from detector.evaluation.metrics import (
    breakdown_subsets,
    evaluate,
    expected_calibration_error,
    point_metrics,
    reliability_bins,
)
from detector.evaluation.report import REPORT_FILES, write_report

# 10 humans scored 0.0, 0.1, ..., 0.9; 10 machines mostly above them.
HUMANS = np.arange(10) / 10
MACHINES = np.array([0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.91, 0.93, 0.97, 0.99])


def hand_case():
    scores = np.concatenate([HUMANS, MACHINES])
    labels = np.array([0] * 10 + [1] * 10)
    return scores, labels


def test_tpr_at_fpr_counts_only_thresholds_flagging_at_most_that_share_of_humans():
    scores, labels = hand_case()
    metrics = point_metrics(scores, labels)
    # The top human scores 0.9: flagging no human catches the 4 machines above it (0.91..0.99).
    # 1% and 5% of 10 humans both allow zero false positives.
    assert metrics["tpr_at_1fpr"] == pytest.approx(0.4)
    assert metrics["tpr_at_5fpr"] == pytest.approx(0.4)
    assert weighted_metrics(scores, labels, np.ones((1, 20)))["tpr_at_1fpr"][0] == pytest.approx(0.4)


def test_f1_and_accuracy_flag_strictly_above_one_half():
    scores, labels = hand_case()
    metrics = point_metrics(scores, labels)
    # Flagged (> 0.5): humans 0.6, 0.7, 0.8, 0.9 (4 FP) and 8 machines from 0.55 up (8 TP, 2 FN).
    # Macro-F1: machine F1 16/22; human F1 (6 TN as hits, 2 FN, 4 FP) 12/18; their mean.
    assert metrics["f1"] == pytest.approx((16 / 22 + 12 / 18) / 2)
    assert weighted_metrics(scores, labels, np.ones((1, 20)))["f1"][0] == pytest.approx(metrics["f1"])
    assert metrics["acc"] == pytest.approx((8 + 6) / 20)
    assert point_metrics(np.array([0.5, 0.5]), np.array([0, 1]))["acc"] == pytest.approx(0.5)


def test_auroc_matches_pair_count():
    scores, labels = hand_case()
    pairs = sum(m > h for m in MACHINES for h in HUMANS) + 0.5 * sum(m == h for m in MACHINES for h in HUMANS)
    assert point_metrics(scores, labels)["auroc"] == pytest.approx(pairs / 100)


def test_ece_hand_computed_with_equal_width_bins():
    scores = np.array([0.1, 0.1, 0.3, 0.9, 0.9, 1.0])
    labels = np.array([0, 1, 0, 1, 1, 0])
    # 2 bins: [0, 0.5) holds 0.1, 0.1, 0.3 (mean 1/6, machine share 1/3);
    #         [0.5, 1] holds 0.9, 0.9, 1.0 (mean 14/15, machine share 2/3).
    expected = 3 / 6 * abs(1 / 6 - 1 / 3) + 3 / 6 * abs(2.8 / 3 - 2 / 3)
    assert expected_calibration_error(scores, labels, n_bins=2) == pytest.approx(expected)
    bins = reliability_bins(scores, labels, n_bins=4)
    assert bins["count"].tolist() == [2, 1, 0, 3]  # 1.0 falls in the last bin
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == 0.0


def test_single_class_subset_has_no_auroc_or_tpr():
    metrics = point_metrics(np.array([0.2, 0.7]), np.array([1, 1]))
    assert metrics["auroc"] is None and metrics["tpr_at_1fpr"] is None
    assert metrics["acc"] == pytest.approx(0.5)


def test_weighted_metrics_with_unit_counts_equal_point_metrics():
    rng = np.random.default_rng(3)
    labels = (rng.random(300) < 0.7).astype(int)
    scores = np.clip(rng.normal(0.45 + 0.2 * labels, 0.2), 0, 1).round(2)  # rounded: many ties
    weighted = weighted_metrics(scores, labels, np.ones((1, 300)))
    for name, value in point_metrics(scores, labels).items():
        assert weighted[name][0] == pytest.approx(value, abs=1e-6), name


def test_weighted_metrics_equal_metrics_of_the_repeated_rows():
    scores, labels = hand_case()
    counts = np.arange(20) % 3  # row i drawn i % 3 times
    rows = np.repeat(np.arange(20), counts)
    weighted = weighted_metrics(scores, labels, counts[None, :].astype(float))
    for name, value in point_metrics(scores[rows], labels[rows]).items():
        assert weighted[name][0] == pytest.approx(value, abs=1e-6), name


def test_resamples_are_stratified_and_deterministic_under_a_seed():
    labels = np.array([0] * 7 + [1] * 13)
    a = resample_counts(labels, 50, seed=1, key="overall")
    assert a.shape == (50, 20)
    assert (a[:, :7].sum(axis=1) == 7).all() and (a[:, 7:].sum(axis=1) == 13).all()
    assert np.array_equal(a, resample_counts(labels, 50, seed=1, key="overall"))
    assert not np.array_equal(a, resample_counts(labels, 50, seed=2, key="overall"))
    assert not np.array_equal(a, resample_counts(labels, 50, seed=1, key="by_source/xsum"))


def test_percentile_intervals():
    samples = {"auroc": np.arange(101, dtype=float), "f1": np.array([0.5, np.nan])}
    intervals = percentile_intervals(samples, confidence=0.9)
    assert intervals["auroc"] == pytest.approx((5.0, 95.0))
    assert intervals["f1"] is None
    with pytest.raises(ValueError, match="confidence"):
        percentile_intervals(samples, confidence=1.0)


def test_breakdowns_by_source_and_generator_vs_all_humans():
    labels = np.array([0, 1, 1, 0, 1, 1])
    extra = {
        "source": ["a", "a", "b", "b", "b", None],
        "generator": ["human", "gpt2", "gpt4", "human", "gpt2", "gpt4"],
    }
    subsets = breakdown_subsets(labels, extra)
    assert {k: v.tolist() for k, v in subsets["by_source"].items()} == {"a": [0, 1], "b": [2, 3, 4]}
    assert {k: v.tolist() for k, v in subsets["by_generator"].items()} == {
        "gpt2": [0, 1, 3, 4],
        "gpt4": [0, 2, 3, 5],
    }
    assert breakdown_subsets(labels, {}) == {}
    with pytest.raises(ValueError, match="column 'source' has 2 values for 6 rows"):
        breakdown_subsets(labels, {"source": ["a", "b"]})


def random_case(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.6).astype(int)
    scores = np.clip(rng.normal(0.4 + 0.25 * labels, 0.2), 0, 1)
    extra = {
        "source": rng.choice(["xsum", "pubmed"], n).tolist(),
        "generator": np.where(labels == 0, "human", rng.choice(["gpt2", "gpt4"], n)).tolist(),
    }
    return scores, labels, extra


def test_evaluate_is_deterministic_under_a_seed_and_pairs_systems():
    scores, labels, extra = random_case()
    systems = {"model": scores, "copy": scores.copy()}
    first = evaluate(systems, labels, extra, bootstrap=200, seed=7)
    assert first == evaluate(systems, labels, extra, bootstrap=200, seed=7)
    assert first["overall"]["model"]["ci"] == first["overall"]["copy"]["ci"]  # same resamples
    other = evaluate(systems, labels, extra, bootstrap=200, seed=8)
    assert other["overall"]["model"]["ci"] != first["overall"]["model"]["ci"]
    assert set(first) == {"overall", "by_source", "by_generator"}
    assert set(first["by_generator"]) == {"gpt2", "gpt4"}
    entry = first["overall"]["model"]
    assert set(entry["ci"]) == set(METRICS)
    for metric in METRICS:
        low, high = entry["ci"][metric]
        assert low <= entry[metric] <= high, metric
    assert evaluate(systems, labels, bootstrap=0)["overall"]["model"].get("ci") is None


def test_write_report_writes_exactly_the_report_files(tmp_path):
    scores, labels, extra = random_case()
    baseline = np.clip(scores + 0.1, 0, 1)
    content = write_report(
        {"detector": scores, "tfidf_baseline": baseline},
        labels,
        extra,
        tmp_path / "r",
        bootstrap=50,
        seed=0,
        data="val.jsonl",
    )
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(REPORT_FILES)
    on_disk = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert on_disk == content
    assert on_disk["settings"]["ece_bins"] == 15 and on_disk["settings"]["bootstrap"] == 50
    assert set(on_disk["overall"]) == {"detector", "tfidf_baseline"}
    assert on_disk["overall"]["detector"]["auroc"] == pytest.approx(point_metrics(scores, labels)["auroc"])
    for png in ("roc_curve.png", "reliability_diagram.png"):
        assert (tmp_path / "r" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| metric | detector | tfidf_baseline |" in summary
    assert "## AUROC by generator (its machine texts vs all human texts)" in summary


def test_write_report_takes_a_single_score_array_and_rejects_bad_scores(tmp_path):
    scores, labels, _ = random_case(40)
    content = write_report(scores, labels, None, tmp_path, bootstrap=0)
    assert set(content["overall"]) == {"model"} and "by_source" not in content
    assert "No bootstrap intervals" in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="probabilities"):
        write_report(scores + 1, labels, None, tmp_path, bootstrap=0)
    with pytest.raises(ValueError, match="differ in length"):
        write_report(scores[:-1], labels, None, tmp_path, bootstrap=0)
