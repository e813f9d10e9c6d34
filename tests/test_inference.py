import numpy as np
import pytest
import torch
from bundle_helpers import TEXTS, logits

from detector.bundle.loading import Detector, load_detector
from detector.scoring import prob_machine


def test_prob_machine_is_the_softmax_second_column_without_overflow():
    raw = np.array([[0.0, 0.0], [1.0, 3.0], [2000.0, -2000.0], [-2000.0, 2000.0]])
    expected = torch.softmax(torch.tensor(raw[:2]), -1)[:, 1].numpy()
    got = prob_machine(raw).numpy()
    np.testing.assert_allclose(got[:2], expected, rtol=0, atol=1e-15)
    assert got[2:].tolist() == [0.0, 1.0]


def _fixed_detector(tokenizer, probs, threshold):
    # Logits (0, logit(p)) give exactly prob p back through prob_machine, up to rounding.
    def logits_fn(inputs):
        n = inputs["input_ids"].shape[0]
        values = np.log(np.array(probs[:n]) / (1 - np.array(probs[:n])))
        return np.stack([np.zeros(n), values], axis=1)

    return Detector(tokenizer, logits_fn, threshold=threshold, max_length=16)


def test_label_is_machine_only_above_the_threshold(bundle_tokenizer):
    detector = _fixed_detector(bundle_tokenizer, [0.5, 0.25, 0.75], threshold=0.5)
    results = detector.score(["a a", "b b", "c c"], batch_size=8)
    assert [r["label"] for r in results] == ["human", "human", "machine"]
    assert [r["is_machine"] for r in results] == [False, False, True]
    assert [r["prob_machine"] for r in results] == pytest.approx([0.5, 0.25, 0.75], abs=1e-12)


def test_torch_backend_scores_equal_the_model_probabilities_in_input_order(
    saved_bundle, bundle_model, bundle_tokenizer
):
    texts = [TEXTS[3], "short", TEXTS[0] + " " + TEXTS[1], TEXTS[2]]
    detector = load_detector(saved_bundle)
    expected = [logits(bundle_model, bundle_tokenizer, [t]).softmax(-1)[0, 1].item() for t in texts]
    for batch_size in (1, 3, 32):
        results = detector.score(texts, batch_size=batch_size)
        assert [r["prob_machine"] for r in results] == pytest.approx(expected, abs=1e-6)
        assert [r["is_machine"] for r in results] == [p > 0.625 for p in (r["prob_machine"] for r in results)]


def test_stored_threshold_and_max_length_are_used_and_threshold_can_be_overridden(saved_bundle):
    detector = load_detector(saved_bundle)
    assert (detector.threshold, detector.max_length) == (0.625, 48)
    assert load_detector(saved_bundle, threshold=0.0).threshold == 0.0


def test_onnx_backend_matches_torch_backend(saved_onnx_bundle):
    torch_scores = load_detector(saved_onnx_bundle).score(TEXTS[:9], batch_size=4)
    onnx_scores = load_detector(saved_onnx_bundle, backend="onnx").score(TEXTS[:9], batch_size=4)
    np.testing.assert_allclose(
        [r["prob_machine"] for r in onnx_scores], [r["prob_machine"] for r in torch_scores], atol=1e-5
    )


def test_onnx_backend_without_model_onnx_says_how_to_get_one(saved_bundle):
    with pytest.raises(FileNotFoundError, match="onnx=True"):
        load_detector(saved_bundle, backend="onnx")


def test_bad_arguments_are_rejected(saved_bundle, bundle_tokenizer):
    with pytest.raises(ValueError, match="backend"):
        load_detector(saved_bundle, backend="tensorrt")
    with pytest.raises(ValueError, match="threshold"):
        load_detector(saved_bundle, threshold=2.0)
    detector = load_detector(saved_bundle)
    with pytest.raises(ValueError, match="batch_size"):
        detector.score(["x"], batch_size=0)
    with pytest.raises(ValueError, match=r"items \[1\]"):
        detector.score(["x", None])
    assert detector.score([]) == []


def test_a_folder_without_metadata_is_not_a_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a detector bundle"):
        load_detector(tmp_path)
