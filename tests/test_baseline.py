import json

import numpy as np
import pytest

from detector.demo import demo_rows
from detector.evaluation.baseline import TfidfBaseline, train_baseline
from detector.evaluation.metrics import point_metrics


def texts_labels(n, seed):
    rows = demo_rows(n, seed=seed)
    return [str(r["text"]) for r in rows], [int(r["label"]) for r in rows]  # type: ignore[call-overload]


def test_baseline_separates_the_demo_corpus_on_unseen_rows():
    train_texts, train_labels = texts_labels(120, seed=0)
    test_texts, test_labels = texts_labels(60, seed=1)
    probs = TfidfBaseline().fit(train_texts, train_labels).predict_proba(test_texts)
    assert probs.shape == (60,) and probs.dtype == np.float64
    assert ((probs >= 0) & (probs <= 1)).all()
    metrics = point_metrics(probs, np.array(test_labels))
    assert metrics["auroc"] == 1.0 and metrics["acc"] == 1.0


def test_baseline_is_deterministic_and_trains_from_a_file(tmp_path):
    train_texts, train_labels = texts_labels(80, seed=0)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(80, seed=0)), encoding="utf-8")
    direct = TfidfBaseline(max_features=500).fit(train_texts, train_labels).predict_proba(train_texts)
    from_file = train_baseline(path, max_features=500).predict_proba(train_texts)
    assert np.array_equal(direct, from_file)


def test_baseline_settings_reach_the_model():
    baseline = TfidfBaseline(ngram_range=(3, 3), max_features=50, C=0.5, class_weight=None)
    texts, labels = texts_labels(40, seed=2)
    baseline.fit(texts, labels)
    vectorizer, classifier = baseline._pipeline.named_steps.values()
    assert vectorizer.ngram_range == (3, 3) and len(vectorizer.vocabulary_) == 50
    assert classifier.C == 0.5 and classifier.class_weight is None


def test_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="not fitted"):
        TfidfBaseline().predict_proba(["a text"])
    with pytest.raises(ValueError, match="both labels"):
        TfidfBaseline().fit(["one", "two"], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        TfidfBaseline().fit(["one", "two"], [0])
