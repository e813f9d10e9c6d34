"""The sensitivity pass that picks which MatMuls the int8 model keeps in fp32, on a hand-built graph."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from detector.bundle.quantize import (
    Int8Check,
    matmul_input_maxima,
    matmul_sensitivity,
    most_sensitive,
    quantize_onnx,
    scale_outlier_channels,
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


def test_sample_texts_are_spread_over_the_validation_texts():
    texts = [f"t{i}" for i in range(200)]
    check = Int8Check(texts, [i % 2 for i in range(200)])
    assert check.sample_texts() == texts[::3][:64]
    assert Int8Check(texts[:10], [0, 1] * 5).sample_texts() == texts[:10]
    with pytest.raises(ValueError, match="fp32_matmuls must be >= 0, got -1"):
        Int8Check(texts[:2], [0, 1], fp32_matmuls=-1)


OUTLIER = 5  # the channel of the input to two MatMuls that reaches 10 while the other 63 stay within 1


@pytest.fixture
def outlier_channel(tmp_path):
    """x (64 channels, channel OUTLIER 10x the others) -> MatMuls "a" and "b", both reading x."""
    rng = np.random.default_rng(1)
    wa, wb = (rng.normal(size=(64, 8)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "wa"], ["ya"], name="a"),
            helper.make_node("MatMul", ["x", "wb"], ["yb"], name="b"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["n", 8]) for y in ("ya", "yb")],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    x = rng.uniform(-1, 1, size=(32, 64)).astype(np.float32)
    x[:, OUTLIER] *= 10.0

    def outputs(path):
        return np.concatenate(
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        )

    return tmp_path / "model.onnx", x, outputs


def test_input_maxima_are_each_channels_largest_absolute_value(outlier_channel):
    model, x, _ = outlier_channel
    maxima = matmul_input_maxima(model, [{"x": x[:16]}, {"x": x[16:]}])
    assert list(maxima) == ["x"]  # one input, read by both MatMuls
    np.testing.assert_array_equal(maxima["x"], np.abs(x).max(axis=0))


def test_scaling_the_outlier_channel_keeps_the_float_function_and_narrows_the_range(
    outlier_channel, tmp_path
):
    model, x, outputs = outlier_channel
    maxima = matmul_input_maxima(model, [{"x": x}])
    divisors = scale_outlier_channels(model, tmp_path / "scaled.onnx", maxima)
    quantile = np.quantile(maxima["x"], 0.99, method="lower")  # the largest ordinary channel
    assert np.flatnonzero(divisors["x"] > 1.0).tolist() == [OUTLIER]
    assert divisors["x"][OUTLIER] == pytest.approx(maxima["x"][OUTLIER] / quantile, rel=1e-6)
    np.testing.assert_allclose(outputs(tmp_path / "scaled.onnx"), outputs(model), rtol=1e-5, atol=1e-4)
    # One Mul before both MatMuls; what they read now spans the quantile, not the outlier's 10.
    scaled = onnx.load(tmp_path / "scaled.onnx").graph
    assert [node.op_type for node in scaled.node] == ["Mul", "MatMul", "MatMul"]
    assert {node.input[0] for node in scaled.node[1:]} == {scaled.node[0].output[0]}
    assert np.abs(x / divisors["x"]).max() == pytest.approx(quantile, rel=1e-5)


def test_quantizing_after_the_scaling_tracks_the_float_model_closer(outlier_channel, tmp_path):
    model, x, outputs = outlier_channel
    quantize_onnx(model, tmp_path / "plain.onnx")
    divisors = quantize_onnx(model, tmp_path / "scaled.onnx", maxima=matmul_input_maxima(model, [{"x": x}]))
    assert (divisors["x"] > 1.0).sum() == 1
    assert weight_matmuls(tmp_path / "scaled.onnx") == []  # both MatMuls are integer
    reference = outputs(model)
    error = {
        name: np.abs(outputs(tmp_path / name) - reference).mean() for name in ("plain.onnx", "scaled.onnx")
    }
    assert error["scaled.onnx"] < error["plain.onnx"] / 2  # measured: 2.3x smaller at 4x, 8x and 20x outliers
