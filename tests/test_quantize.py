"""``export --quantize``: the int8 ONNX model, its check against the float model, its threshold, its use."""

import json
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import write_jsonl
from state_helpers import write_tiny_checkpoint
from transformers import BertConfig, BertForSequenceClassification

from detector.__main__ import main
from detector.bundle.integrity import MANIFEST_FILE, BundleIntegrityError, file_digest, read_manifest
from detector.bundle.loading import load_detector, onnx_session_logits
from detector.bundle.onnx import export_onnx, onnx_logits
from detector.bundle.quantize import (
    INT8_FILE,
    Int8Check,
    compare,
    fuse_for_onnxruntime,
    matmul_input_maxima,
    matmul_sensitivity,
    most_sensitive,
    quantize_onnx,
    refusal,
    score_feeds,
    weight_matmuls,
)
from detector.bundle.thresholds import rates_at_threshold, threshold_at_fpr, threshold_at_fpr_closest_to
from detector.demo import demo_rows

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
LOOSE = ["--max-auroc-drop", "1", "--max-decision-change", "1"]
KEPT = 2  # MatMuls the shared bundle keeps fp32 (--fp32-matmuls; the default, 0, keeps none)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    """A checkpoint of a tiny classifier and a labelled validation file."""
    root = tmp_path_factory.mktemp("quantize")
    return {
        "root": root,
        "checkpoint": write_tiny_checkpoint(root / "c.safetensors", tokenizer, TINY),
        "val": write_jsonl(root / "val.jsonl", demo_rows(80, seed=7)),
    }


def export(files, out, *extra):
    main(["export", str(files["checkpoint"]), "--out", str(out), "--val-data", str(files["val"]), *extra])
    return out / "model_v1.0_epoch1"


@pytest.fixture(scope="module")
def int8_bundle(files):
    return export(
        files, files["root"] / "out", "--quantize", "--target-fpr", "0.2", "--fp32-matmuls", str(KEPT), *LOOSE
    )


def scores(bundle, data, tmp_path, backend):
    out = tmp_path / f"{backend}.jsonl"
    main(["score", str(bundle), str(data), "--backend", backend, "--output", str(out)])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_quantize_adds_the_int8_file_and_sha256sums_lists_it(int8_bundle):
    names = {p.name for p in int8_bundle.iterdir()}
    assert {"model.onnx", INT8_FILE, "model.safetensors", MANIFEST_FILE} <= names
    assert read_manifest(int8_bundle)[INT8_FILE] == file_digest(int8_bundle / INT8_FILE)
    # Quantized, not copied: smaller than the fp32 graph, and recorded so.
    sizes = json.loads((int8_bundle / "training_metadata.json").read_text())["int8"]["size_bytes"]
    assert sizes == {
        "model.onnx": (int8_bundle / "model.onnx").stat().st_size,
        INT8_FILE: (int8_bundle / INT8_FILE).stat().st_size,
    }
    assert sizes[INT8_FILE] < sizes["model.onnx"]


def test_the_most_sensitive_matmuls_stay_fp32_in_the_int8_model(int8_bundle):
    entry = json.loads((int8_bundle / "training_metadata.json").read_text())["int8"]
    kept = entry["fp32_matmuls"]
    assert len(kept) == KEPT and entry["sample_texts"] == 64
    # Re-measured as export measured it: each MatMul quantized alone, scored on the same 64 texts.
    texts = [row["text"] for row in demo_rows(80, seed=7)][:64]
    detector = load_detector(int8_bundle, backend="onnx")

    def probs(path):
        alone = type(detector)(detector.tokenizer, onnx_session_logits(path), max_length=detector.max_length)
        return np.array([row["prob_machine"] for row in alone.score(texts)])

    feeds = score_feeds(detector.tokenizer, texts, detector.max_length)
    maxima = matmul_input_maxima(int8_bundle / "model.onnx", feeds)
    sensitivity = matmul_sensitivity(int8_bundle / "model.onnx", probs, maxima)
    assert kept == {name: sensitivity[name] for name in most_sensitive(sensitivity, KEPT)}
    # In the int8 graph exactly these keep a float weight; every other weight MatMul is integer.
    assert set(weight_matmuls(int8_bundle / INT8_FILE)) == set(kept)
    assert len(weight_matmuls(int8_bundle / "model.onnx")) > len(kept)


def test_by_default_every_weight_matmul_is_quantized_and_no_sensitivity_pass_runs(files, tmp_path):
    bundle = export(files, tmp_path / "out", "--quantize", "--target-fpr", "0.2", *LOOSE)
    entry = json.loads((bundle / "training_metadata.json").read_text())["int8"]
    assert entry["fp32_matmuls"] == {}
    assert weight_matmuls(bundle / INT8_FILE) == []
    # The outlier channels were scaled before quantizing. Every MatMul input of the tiny model has at
    # most 64 channels, so its 0.99 quantile is its second-largest channel: one channel each is scaled.
    graph = onnx.load(bundle / "model.onnx").graph
    weights = {init.name for init in graph.initializer}
    inputs = {node.input[0] for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights}
    scaled = entry["outlier_channels_scaled"]
    assert (scaled["quantile"], scaled["channels"]) == (0.99, len(inputs))
    assert scaled["largest_divisor"] > 1.0
    assert sum(node.op_type == "Mul" and node.name.endswith("/scale_outliers") for node in
               onnx.load(bundle / INT8_FILE).graph.node) == len(inputs)  # fmt: skip


def _ops(path):
    return Counter(node.op_type for node in onnx.load(path).graph.node)


def test_the_int8_file_is_fused_for_onnxruntime_and_the_metadata_says_what_fused(int8_bundle):
    entry = json.loads((int8_bundle / "training_metadata.json").read_text())["int8"]
    # The tiny DeBERTa (2 layers): GELUs with their biases and residual layer norms fuse; DeBERTa's
    # disentangled attention matches no attention pattern and stays as exported.
    assert entry["fused_operators"] == {"erf_gelu": 3, "skip_layer_normalization": 4, "bias_gelu": 2}
    ops = _ops(int8_bundle / INT8_FILE)
    assert (ops["SkipLayerNormalization"], ops["BiasGelu"], ops["Erf"]) == (4, 2, 0)
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == 2
    assert _ops(int8_bundle / "model.onnx")["SkipLayerNormalization"] == 0  # model.onnx stays plain ONNX


def _masked_batch(lengths, vocab):
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_fusion_turns_bert_attention_into_onnxruntime_attention_and_keeps_the_logits(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.3)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    export_onnx(model, tmp_path / "model.onnx", _masked_batch([8, 8], 100))
    quantize_onnx(tmp_path / "model.onnx", tmp_path / "int8.onnx")
    for name in ("model", "int8"):
        shutil.copy(tmp_path / f"{name}.onnx", tmp_path / f"{name}_fused.onnx")
    assert _ops(tmp_path / "int8.onnx")["Softmax"] == 2  # the attention as exported
    fused = {"erf_gelu": 2, "skip_layer_normalization": 4, "sdpa": 2, "mha2": 2, "mha_bias": 2,
             "bias_gelu": 2}  # fmt: skip
    # On the int8 model the quantized Q/K/V projections stay as they are, the attention after them fuses.
    assert fuse_for_onnxruntime(tmp_path / "int8_fused.onnx") == fused
    ops = _ops(tmp_path / "int8_fused.onnx")
    assert (ops["MultiHeadAttention"], ops["SkipLayerNormalization"], ops["BiasGelu"]) == (2, 4, 2)
    assert ops["Softmax"] == ops["Transpose"] == ops["Erf"] == ops["Attention"] == 0
    assert ops["MatMulInteger"] == _ops(tmp_path / "int8.onnx")["MatMulInteger"] == 14
    # On the float model the projections join in: one Attention per layer.
    assert fuse_for_onnxruntime(tmp_path / "model_fused.onnx") == {**fused, "attention": 2}
    assert _ops(tmp_path / "model_fused.onnx")["Attention"] == 2
    # Padding is masked as before: one row, ragged rows, full rows, at other lengths than the export's.
    for lengths in ([5], [9, 3, 1], [12, 12], [40, 2]):
        inputs = _masked_batch(lengths, 100)
        with torch.inference_mode():
            expected = model(**inputs).logits.numpy()
        assert np.abs(expected).max() > 0.5  # logits large enough for a wrong mask to show
        np.testing.assert_allclose(onnx_logits(tmp_path / "model_fused.onnx", inputs), expected, atol=1e-5)
        int8, int8_fused = (onnx_logits(tmp_path / f"{name}.onnx", inputs) for name in ("int8", "int8_fused"))
        np.testing.assert_allclose(int8_fused, int8, atol=1e-5)


def test_a_negative_fp32_matmuls_is_refused(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["export", str(files["checkpoint"]), "--out", str(tmp_path), "--quantize", "--fp32-matmuls", "-1"]
        )
    assert capsys.readouterr().err == "detector export: error: --fp32-matmuls must be >= 0, got -1\n"


def test_int8_threshold_is_chosen_on_the_int8_scores_that_score_yields(int8_bundle, files, tmp_path):
    metadata = json.loads((int8_bundle / "training_metadata.json").read_text())
    entry = metadata["int8"]
    labels = [row["label"] for row in demo_rows(80, seed=7)]
    int8 = scores(int8_bundle, files["val"], tmp_path, "onnx-int8")
    probs = [row["prob_machine"] for row in int8]
    torch_probs = [row["prob_machine"] for row in scores(int8_bundle, files["val"], tmp_path, "torch")]
    float_says = [p > metadata["decision_threshold"] for p in torch_probs]
    assert entry["decision_threshold"] == threshold_at_fpr_closest_to(probs, labels, float_says, 0.2)
    assert entry["decision_threshold"] >= threshold_at_fpr(probs, labels, 0.2)
    assert (entry["threshold_val_fpr"], entry["threshold_val_tpr"]) == rates_at_threshold(
        probs, labels, entry["decision_threshold"]
    )
    assert all(row["is_machine"] == (row["prob_machine"] > entry["decision_threshold"]) for row in int8)
    assert entry["threshold_source"].startswith("the int8 model's own scores on the validation set (")
    # The float threshold is untouched: still the float model's own.
    assert metadata["decision_threshold"] == threshold_at_fpr(torch_probs, labels, 0.2)
    changed = np.mean(
        [
            (f > metadata["decision_threshold"]) != (q > entry["decision_threshold"])
            for f, q in zip(torch_probs, probs, strict=True)
        ]
    )
    assert entry["decision_change"] == changed


def test_int8_scores_track_the_fp32_scores(int8_bundle, files, tmp_path):
    int8 = np.array([row["prob_machine"] for row in scores(int8_bundle, files["val"], tmp_path, "onnx-int8")])
    fp32 = np.array([row["prob_machine"] for row in scores(int8_bundle, files["val"], tmp_path, "onnx")])
    torch_probs = np.array(
        [row["prob_machine"] for row in scores(int8_bundle, files["val"], tmp_path, "torch")]
    )
    recorded = json.loads((int8_bundle / "training_metadata.json").read_text())["int8"]["max_abs_prob_diff"]
    assert recorded == np.abs(torch_probs - int8).max()
    assert 0 < np.abs(fp32 - int8).max() < 1e-3  # quantized (not identical), yet close


def test_the_card_records_the_int8_threshold_and_check(int8_bundle):
    entry = json.loads((int8_bundle / "training_metadata.json").read_text())["int8"]
    card = (int8_bundle / "README.md").read_text()
    assert f"## int8 model (`{INT8_FILE}`)" in card
    assert f"P(machine) > **{entry['decision_threshold']!r}**" in card
    assert f"AUROC {entry['auroc_float']:.4f} (float)" in card
    assert "--backend onnx-int8" in card


def test_an_altered_int8_file_is_refused_on_load(int8_bundle, tmp_path, capsys):
    copy = shutil.copytree(int8_bundle, tmp_path / "copy")
    data = bytearray((copy / INT8_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / INT8_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=f"{INT8_FILE}: SHA-256 mismatch"):
        load_detector(copy, backend="onnx-int8")
    (tmp_path / "t.txt").write_text("a text\n")
    with pytest.raises(SystemExit) as stop:
        main(["score", str(copy), str(tmp_path / "t.txt"), "--backend", "onnx-int8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{INT8_FILE}: SHA-256 mismatch" in err


def test_onnx_int8_backend_without_the_file_says_to_export_with_quantize(saved_onnx_bundle, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a text\n")
    with pytest.raises(SystemExit) as stop:
        main(["score", str(saved_onnx_bundle), str(tmp_path / "t.txt"), "--backend", "onnx-int8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    hint = "export the bundle with --quantize (quantize=True), or use backend 'onnx' or 'torch'"
    assert err == f"detector score: error: {saved_onnx_bundle / INT8_FILE} not found: {hint}\n"


def test_a_check_past_the_limit_refuses_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    # The tiny model's int8 copy may change no decision at the threshold closest to the float one, so a
    # broken quantization is simulated: the int8 model's two logits come out swapped. At 20% FPR the
    # float model calls some texts machine, which the reversed scores cannot keep.
    import detector.bundle.loading as loading

    real = loading.onnx_session_logits

    def swapped(path):
        logits = real(path)  # one session per model, as the real one
        return lambda inputs: np.ascontiguousarray(logits(inputs)[:, ::-1])

    monkeypatch.setattr(loading, "onnx_session_logits", swapped)
    limits = ["--max-auroc-drop", "1", "--max-decision-change", "0.05"]
    with pytest.raises(SystemExit) as stop:
        export(files, tmp_path / "out", "--quantize", "--target-fpr", "0.2", *limits)
    assert stop.value.code == 2
    err = capsys.readouterr().err  # the ONNX exporter may log its own warnings first
    assert err.count("error:") == 1
    refused = "detector export: error: int8 model refused, bundle not written: decisions change on "
    assert err.splitlines()[-1].startswith(refused)
    assert list((tmp_path / "out").iterdir()) == []  # no bundle, no temp folder


def test_quantize_without_validation_data_is_refused_before_any_work(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export", str(files["checkpoint"]), "--out", str(tmp_path / "out"), "--quantize"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("detector export: error: --quantize needs --val-data") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value"), [("--max-auroc-drop", "-0.1"), ("--max-decision-change", "1.5")]
)
def test_limits_outside_zero_one_are_refused_naming_the_option(files, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit):
        main(["export", str(files["checkpoint"]), "--out", str(tmp_path), "--quantize", option, value])
    assert (
        capsys.readouterr().err == f"detector export: error: {option} must be in [0, 1], got {float(value)}\n"
    )


def test_compare_measures_auroc_and_decisions_each_at_its_own_threshold():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    float_probs = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    int8_probs = np.array([0.1, 0.2, 0.35, 0.5, 0.45, 0.55, 0.8, 0.9])  # scores shifted down around 0.5
    check = Int8Check(["t"] * 8, labels, max_auroc_drop=0.05, max_decision_change=0.1)
    metadata = {"decision_threshold": 0.6, "threshold_source": "validation set", "target_fpr": 0.0}
    entry = compare(float_probs, int8_probs, check, metadata)
    # AUROC: float 15/16 (machine 0.4 below human 0.6); int8 15/16 (machine 0.45 below human 0.5).
    assert (entry["auroc_float"], entry["auroc_int8"], entry["auroc_drop"]) == (15 / 16, 15 / 16, 0.0)
    assert entry["decision_threshold"] == 0.5  # the highest int8 human score, for FPR 0
    # Float at 0.6: machine for 0.7, 0.8, 0.9. Int8 at its own 0.5: 0.55, 0.8, 0.9, the same texts...
    assert entry["decision_change"] == 0.0
    # ...while at the float threshold the text at 0.55 would turn human.
    assert entry["decision_change_at_float_threshold"] == 1 / 8
    assert refusal(entry) is None
    assert refusal({**entry, "auroc_drop": 0.0625}).startswith(
        "AUROC drops by 0.0625 > max_auroc_drop 0.05 ("
    )
    assert refusal({**entry, "decision_change": 0.125}).startswith(
        "decisions change on 12.50% of texts > max_decision_change 0.1 ("
    )


def test_int8_check_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        Int8Check(["a", "b"], [1, 1])


def test_int8_keeps_the_default_threshold_when_the_float_one_is_a_default():
    labels = [0, 0, 1, 1]
    check = Int8Check(["t"] * 4, labels)
    metadata = {
        "decision_threshold": 0.5,
        "threshold_source": "default 0.5: no validation scores",
        "target_fpr": 0.01,
    }
    entry = compare(np.array([0.2, 0.6, 0.4, 0.9]), np.array([0.2, 0.4, 0.6, 0.9]), check, metadata)
    assert entry["decision_threshold"] == 0.5
    assert entry["threshold_source"] == "the float model's default 0.5 (it was not chosen on data either)"
    assert entry["decision_change"] == 0.5  # the texts at 0.6 / 0.4 swap sides
    assert (entry["auroc_float"], entry["auroc_int8"], entry["auroc_drop"]) == (0.75, 1.0, -0.25)


def test_export_as_a_user_runs_it_prints_the_bundle_and_nothing_else(files, tmp_path):
    """The exporters' routine notes (torchvision not installed, axis names merged, LayerNorm folding
    skipped) used to bury the one line a user needs under a dozen."""
    out = tmp_path / "out"
    args = [
        "export",
        str(files["checkpoint"]),
        "--out",
        str(out),
        "--val-data",
        str(files["val"]),
        "--quantize",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "detector", *args, *LOOSE], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(out / "model_v1.0_epoch1")]
    assert run.stderr == ""
