"""The sensitivity pass that picks which MatMuls the int8 model keeps in fp32, on a hand-built graph."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detector.bundle.quantize import (
    Int8Check,
    matmul_sensitivity,
    most_sensitive,
    quantize_onnx,
    weight_matmuls,
)


@pytest.fixture
def two_matmuls(tmp_path):
    """x -> MatMul "outlier" (its input has one column 1000x the others) -> MatMul "plain" -> y.

    The first weight zeroes the outlier column, so the second MatMul's input is small and even:
    quantizing the first one's input rounds the small columns away, the second one's loses little.
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 4)).astype(np.float32)
    w1[3] = 0.0
    w2 = rng.normal(size=(4, 2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="outlier"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="plain"),
            helper.make_node("Transpose", ["y"], ["y_t"], name="t"),
            helper.make_node("MatMul", ["y", "y_t"], ["gram"], name="two_activations"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    graph.output.append(helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["n", "n"]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "model.onnx")
    x = rng.uniform(-0.1, 0.1, size=(16, 4)).astype(np.float32)
    x[:, 3] = 100.0

    def outputs(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]

    return tmp_path / "model.onnx", outputs


def test_weight_matmuls_are_those_with_a_constant_weight_in_graph_order(two_matmuls):
    model, _ = two_matmuls
    assert weight_matmuls(model) == ["outlier", "plain"]


def test_the_matmul_with_the_outlier_input_is_the_most_sensitive(two_matmuls):
    model, outputs = two_matmuls
    sensitivity = matmul_sensitivity(model, outputs)
    assert list(sensitivity) == ["outlier", "plain"]
    assert sensitivity["outlier"] > 10 * sensitivity["plain"] > 0
    assert most_sensitive(sensitivity, 1) == ["outlier"]
    assert most_sensitive(sensitivity, 0) == []
    assert most_sensitive(sensitivity, 5) == ["outlier", "plain"]


def test_kept_matmuls_stay_fp32_and_the_others_become_int8(two_matmuls, tmp_path):
    model, outputs = two_matmuls
    quantize_onnx(model, tmp_path / "kept.onnx", keep_fp32=["outlier"])
    assert weight_matmuls(tmp_path / "kept.onnx") == ["outlier"]  # "plain" is now an integer MatMul
    quantize_onnx(model, tmp_path / "all.onnx")
    assert weight_matmuls(tmp_path / "all.onnx") == []
    reference = outputs(model)
    error = {name: np.abs(outputs(tmp_path / name) - reference).max() for name in ("kept.onnx", "all.onnx")}
    assert 0 < error["kept.onnx"] < error["all.onnx"] / 10


def test_ties_keep_graph_order():
    assert most_sensitive({"a": 1.0, "b": 2.0, "c": 1.0, "d": 0.5}, 3) == ["b", "a", "c"]


def test_sensitivity_texts_are_spread_over_the_validation_texts():
    texts = [f"t{i}" for i in range(200)]
    check = Int8Check(texts, [i % 2 for i in range(200)])
    assert check.sensitivity_texts() == texts[::3][:64]
    assert Int8Check(texts[:10], [0, 1] * 5).sensitivity_texts() == texts[:10]
    with pytest.raises(ValueError, match="fp32_matmuls must be >= 0, got -1"):
        Int8Check(texts[:2], [0, 1], fp32_matmuls=-1)
