"""An int8 copy of a bundle's ONNX model for CPU scoring, checked against the float model before it ships.

ONNX Runtime's dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) turns the
weights of the fp32 ``model.onnx`` into int8 and quantizes activations on the fly, one scale per
tensor and batch. A MatMul input whose range is set by a few outlier channels (a feed-forward output
projection's GELU input: one channel reaches 24 where the others stay under 6) would quantize all of
its channels coarsely, so before quantizing, those channels are scaled down by a Mul and the matching
weight rows scaled up by the same factor, which leaves the float function unchanged
(:func:`scale_outlier_channels`, calibrated on a sample of the validation texts). Optionally a few
MatMuls stay fp32: a sensitivity pass quantizes each weight MatMul alone and keeps those that move
the scores of the sample most. What it costs in quality is measured on labelled validation texts, each
model scored by :class:`detector.bundle.loading.Detector` exactly as ``detector score`` scores them:
the AUROC of both and the share of texts whose decision changes, the float model at its threshold
and the int8 model at its own, re-chosen on its own scores for the same target false-positive rate
(of the thresholds meeting it, the one closest to the float model's decisions). Past the limits the
bundle is refused (:class:`Int8CheckError`); the writer then leaves nothing behind. The int8 model is
checked as it ships: after :func:`fuse_for_onnxruntime` has fused its attention, GELU and layer norms.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from detector.bundle.onnx import ONNX_FILE, quiet_exporters
from detector.bundle.thresholds import rates_at_threshold, threshold_at_fpr_closest_to

INT8_FILE = "model_int8.onnx"
DEFAULT_MAX_AUROC_DROP = 0.005
DEFAULT_MAX_DECISION_CHANGE = 0.01
DEFAULT_FP32_MATMULS = 0  # keeping the most sensitive fp32 costs int8 speed: opt in
SAMPLE_TEXTS = 64  # validation texts, spread over the file, that calibrate the scaling and the sensitivity
# A channel whose calibration maximum is above this quantile of its input's channel maxima is scaled
# down to it. Measured on the pretrained CPU config's model (docs/bundle.md): 0.99 (15 of 1536 channels)
# gave the smallest score change; 0.9 and below scale ordinary channels up against their weights' range.
OUTLIER_QUANTILE = 0.99
CHECK_BATCH_SIZE = 32  # `detector score`'s default, so the threshold is chosen on the numbers it yields


class Int8CheckError(ValueError):
    """The int8 model differs from the float one past a limit; the bundle is not written."""


def check_limits(max_auroc_drop: float, max_decision_change: float) -> None:
    """Raise ValueError naming the limit that is not in ``[0, 1]``."""
    for name, value in (("max_auroc_drop", max_auroc_drop), ("max_decision_change", max_decision_change)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Int8Check:
    """Labelled validation texts and the limits the int8 model must stay within.

    Args:
        texts: validation texts (the export's ``--val-data``, the datamodule's validation split).
        labels: 0 (human) or 1 (machine) per text; both classes must be present.
        max_auroc_drop: refuse when AUROC(float) - AUROC(int8) exceeds this.
        max_decision_change: refuse when a larger share of texts changes its decision.
        fp32_matmuls: how many weight MatMuls stay fp32: those whose lone quantization moves the
            scores of the :meth:`sample_texts` most (:func:`matmul_sensitivity`).
    """

    texts: Sequence[str]
    labels: Sequence[int]
    max_auroc_drop: float = DEFAULT_MAX_AUROC_DROP
    max_decision_change: float = DEFAULT_MAX_DECISION_CHANGE
    fp32_matmuls: int = DEFAULT_FP32_MATMULS

    def __post_init__(self) -> None:
        check_limits(self.max_auroc_drop, self.max_decision_change)
        if self.fp32_matmuls < 0:
            raise ValueError(f"fp32_matmuls must be >= 0, got {self.fp32_matmuls}")
        labels = np.asarray(list(self.labels))
        if len(self.texts) != labels.size:
            raise ValueError(f"texts and labels differ in length: {len(self.texts)} vs {labels.size}")
        if not (np.isin(labels, (0, 1)).all() and {0, 1} <= set(labels.tolist())):
            raise ValueError(
                "the int8 check needs labelled validation texts of both classes (0 human, 1 machine)"
            )

    def label_array(self) -> np.ndarray:
        """The labels as an int64 array."""
        return np.asarray(list(self.labels), dtype=np.int64)

    def sample_texts(self) -> list[str]:
        """At most :data:`SAMPLE_TEXTS` of the texts, evenly spaced through them."""
        step = max(1, len(self.texts) // SAMPLE_TEXTS)
        return list(self.texts)[::step][:SAMPLE_TEXTS]


def _weight_matmul_nodes(graph: Any) -> list[Any]:
    weights = {init.name for init in graph.initializer}
    return [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def weight_matmuls(model: Path) -> list[str]:
    """The names of ``model``'s MatMul nodes with a constant weight, in graph order: the nodes
    :func:`quantize_onnx` turns into int8 (a MatMul of two activations, as in attention, stays fp32)."""
    import onnx

    return [node.name for node in _weight_matmul_nodes(onnx.load(model, load_external_data=False).graph)]


def matmul_input_maxima(source: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per input tensor of ``source``'s weight MatMuls: the largest absolute value of each channel (the
    last axis) over the batches ``feeds`` (ONNX Runtime, the tensors added as graph outputs)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(source)
    names = list(dict.fromkeys(node.input[0] for node in _weight_matmul_nodes(model.graph)))
    model.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    with tempfile.TemporaryDirectory(prefix="int8-calibration-") as tmp:
        onnx.save(model, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], channel_max) if name in maxima else channel_max
    return maxima


def scale_outlier_channels(
    source: Path, target: Path, maxima: dict[str, np.ndarray], quantile: float = OUTLIER_QUANTILE
) -> dict[str, np.ndarray]:
    """Write ``source`` to ``target`` with the outlier channels of its weight MatMuls' inputs scaled down.

    For each input ``x`` in ``maxima`` (:func:`matmul_input_maxima`), a channel whose maximum ``m`` is
    above ``q``, the ``quantile`` of the input's channel maxima, is divided by ``m / q`` (a Mul node
    feeding every weight MatMul that reads ``x``) and the matching row of each of those MatMuls'
    weights multiplied by it: the float model computes the same function, and the per-tensor
    quantization of ``x`` gets a range ``q`` instead of the outlier's ``m``. Returns each input's
    divisors (1 for a channel left alone).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(source)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in _weight_matmul_nodes(graph):
        readers.setdefault(node.input[0], []).append(node)
    scalers, divisors = {}, {}
    for name, nodes in readers.items():
        channel_max = maxima[name]
        divisor = np.maximum(1.0, channel_max / np.quantile(channel_max, quantile, method="lower")).astype(
            np.float32
        )
        divisors[name] = divisor
        if not (divisor > 1.0).any():
            continue
        factor = numpy_helper.from_array(1.0 / divisor, f"{name}/outlier_scale")
        graph.initializer.append(factor)
        scalers[nodes[0].name] = onnx.helper.make_node(
            "Mul", [name, factor.name], [f"{name}/outliers_scaled"], name=f"{name}/scale_outliers"
        )
        for node in nodes:
            weight = weights[node.input[1]]
            weight.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(weight) * divisor[:, None], weight.name)
            )
            node.input[0] = f"{name}/outliers_scaled"
    nodes = []
    for node in graph.node:  # each Mul just before the first MatMul that reads it: topological order holds
        if node.name in scalers:
            nodes.append(scalers[node.name])
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, target)
    return divisors


def quantize_onnx(
    source: Path,
    target: Path,
    keep_fp32: Sequence[str] = (),
    only: Sequence[str] | None = None,
    maxima: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write the dynamically quantized copy of ``source`` to ``target``: int8 weights with one scale per
    output channel, for the matrix multiplications only, but those named in ``keep_fp32`` (or, given
    ``only``, for those alone); given ``maxima``, after :func:`scale_outlier_channels`, whose divisors
    it returns (none without ``maxima``).

    Measured on the pretrained CPU config's model (all-MiniLM-L6-v2 fine-tuned, 1120 texts of
    ``val.jsonl``): ONNX Runtime's defaults (every supported op, the embedding lookup included, one
    scale per tensor) dropped AUROC by 0.0108 and changed 9.7% of the decisions; per-channel MatMuls
    only, 0.0045 and 1.4%, at 59 MB instead of 24 MB (the embedding stays fp32); with the outlier
    channels scaled as well, see docs/bundle.md.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    divisors: dict[str, np.ndarray] = {}
    # ORT suggests its shape-inference pre-pass on the root logger; the dynamo export has the shapes.
    with quiet_exporters(""), tempfile.TemporaryDirectory(prefix="int8-scaled-") as tmp:
        if maxima is not None:
            divisors = scale_outlier_channels(source, Path(tmp) / "scaled.onnx", maxima)
            source = Path(tmp) / "scaled.onnx"
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=list(keep_fp32),
            nodes_to_quantize=list(only) if only is not None else None,
        )  # fmt: skip
    return divisors


def fuse_for_onnxruntime(path: Path) -> dict[str, int]:
    """Rewrite the ONNX model at ``path`` with ONNX Runtime's fused transformer operators; return how many
    of each fusion applied (those that did).

    ``onnxscript``'s ``optimize_for_ort`` finds the patterns the dynamo exporter writes: attention
    (scaled dot-product, the mask and the projections' biases -> ``MultiHeadAttention``), GELU with its
    bias (``BiasGelu``) and the residual add with its layer norm (``SkipLayerNormalization``).
    ONNX Runtime's own load-time fusions miss the exported attention, whose masking, softmax and
    transposes then run as a dozen separate passes over a (batch, heads, sequence, sequence) tensor.
    Run on the quantized model, it leaves the int8 MatMuls as they are. The result needs ONNX Runtime
    (the ``com.microsoft`` operators), which is what scores ``model_int8.onnx``. An architecture whose
    attention matches no pattern (DeBERTa's disentangled attention) keeps it unfused.
    """
    from onnxscript import ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with quiet_exporters():
        model, counts = optimize_for_ort(ir.load(path))
    fused = path.with_name(f".{path.name}.fused")
    ir.save(model, fused)
    fused.replace(path)
    return {name: count for name, count in counts.items() if count}


def matmul_sensitivity(
    source: Path, probs_of: Callable[[Path], np.ndarray], maxima: dict[str, np.ndarray] | None = None
) -> dict[str, float]:
    """Per weight MatMul of ``source``: the root-mean-square change of ``probs_of``'s scores when that
    MatMul alone is quantized (:func:`quantize_onnx` with ``only=[name]`` and ``maxima``), the rest
    staying fp32."""
    reference = probs_of(source)
    sensitivity = {}
    with tempfile.TemporaryDirectory(prefix="int8-sensitivity-") as tmp:
        one = Path(tmp) / "one.onnx"
        for name in weight_matmuls(source):
            quantize_onnx(source, one, only=[name], maxima=maxima)
            sensitivity[name] = float(np.sqrt(np.mean((probs_of(one) - reference) ** 2)))
    return sensitivity


def most_sensitive(sensitivity: dict[str, float], count: int) -> list[str]:
    """The ``count`` names of highest sensitivity (ties: graph order, ``sensitivity``'s order)."""
    return sorted(sensitivity, key=lambda name: -sensitivity[name])[:count]  # stable: ties keep order


def _probs(
    tokenizer: PreTrainedTokenizerBase, logits_fn: Any, texts: Sequence[str], max_length: int
) -> np.ndarray:
    from detector.bundle.loading import Detector  # loading imports the writer, which imports this module

    detector = Detector(tokenizer, logits_fn, max_length=max_length)
    return np.array([row["prob_machine"] for row in detector.score(texts, batch_size=CHECK_BATCH_SIZE)])


def score_feeds(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[dict[str, Any]]:
    """The model inputs ``detector score`` builds for ``texts``, batch by batch, as numpy arrays."""
    from detector.bundle.loading import Detector

    feeds: list[dict[str, Any]] = []

    def record(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        feeds.append({name: value.numpy() for name, value in inputs.items()})
        return np.zeros((len(inputs["input_ids"]), 2), dtype=np.float32)

    Detector(tokenizer, record, max_length=max_length).score(texts, batch_size=CHECK_BATCH_SIZE)
    return feeds


def _auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(binary_auroc(torch.from_numpy(probs), torch.from_numpy(labels)))


def int8_threshold(
    probs: np.ndarray, labels: np.ndarray, metadata: dict[str, Any], float_says: np.ndarray
) -> dict[str, Any]:
    """The int8 threshold fields, on ``probs``, by the rule that gave ``metadata``'s float threshold.

    A threshold chosen for a false-positive rate is re-chosen on the int8 scores as the one, of those
    meeting the same target there, that changes the fewest of the float model's decisions
    (``float_says``): the lowest meeting it is one of the top human scores, and a score change of a few
    thousandths that swaps two of them would otherwise move it past every text scored between them
    (docs/bundle.md).
    """
    n_human = int((labels == 0).sum())
    data = f"validation set ({n_human} human, {labels.size - n_human} machine texts)"
    if str(metadata["threshold_source"]).startswith("default"):
        threshold = float(metadata["decision_threshold"])
        source = f"the float model's default {threshold!r} (it was not chosen on data either)"
    else:
        target = metadata["target_fpr"]
        threshold = threshold_at_fpr_closest_to(probs, labels, float_says, target)
        source = (
            f"the int8 model's own scores on the {data}: of the thresholds meeting target_fpr {target!r} "
            "there, the one that changes the fewest of the float model's decisions"
        )
    fpr, tpr = rates_at_threshold(probs, labels, threshold)
    return {"decision_threshold": threshold, "threshold_source": source,
            "threshold_val_fpr": fpr, "threshold_val_tpr": tpr, "checked_on": data}  # fmt: skip


def compare(
    float_probs: np.ndarray, int8_probs: np.ndarray, check: Int8Check, metadata: dict[str, Any]
) -> dict[str, Any]:
    """The ``int8`` metadata entry: its threshold, both AUROCs and the share of decisions changed."""
    labels = check.label_array()
    float_threshold = float(metadata["decision_threshold"])
    float_says = float_probs > float_threshold
    fields = int8_threshold(int8_probs, labels, metadata, float_says)
    auroc_float, auroc_int8 = _auroc(float_probs, labels), _auroc(int8_probs, labels)
    return {
        "file": INT8_FILE,
        **fields,
        "auroc_float": auroc_float,
        "auroc_int8": auroc_int8,
        "auroc_drop": auroc_float - auroc_int8,
        "decision_change": float((float_says != (int8_probs > fields["decision_threshold"])).mean()),
        "decision_change_at_float_threshold": float((float_says != (int8_probs > float_threshold)).mean()),
        "max_abs_prob_diff": float(np.abs(float_probs - int8_probs).max()),
        "max_auroc_drop": check.max_auroc_drop,
        "max_decision_change": check.max_decision_change,
        "quantization": (
            "onnxruntime.quantization.quantize_dynamic, int8 weights (QInt8, per output channel, MatMul "
            f"only), each MatMul input's channels above its {OUTLIER_QUANTILE} quantile of maxima scaled "
            f"down to it, the {check.fp32_matmuls} most sensitive MatMuls kept fp32; then ONNX Runtime's "
            "fused transformer operators where the graph matches (onnxscript optimize_for_ort)"
        ),
    }


def refusal(entry: dict[str, Any]) -> str | None:
    """Why the int8 model in ``entry`` is refused, or None when it is within both limits."""
    summary = (
        f"AUROC float {entry['auroc_float']:.4f}, int8 {entry['auroc_int8']:.4f}; decisions changed on "
        f"{entry['decision_change']:.2%} of the {entry['checked_on']}"
    )
    if entry["auroc_drop"] > entry["max_auroc_drop"]:
        drop, limit = entry["auroc_drop"], entry["max_auroc_drop"]
        return f"AUROC drops by {drop:.4f} > max_auroc_drop {limit:g} ({summary})"
    if entry["decision_change"] > entry["max_decision_change"]:
        return (
            f"decisions change on {entry['decision_change']:.2%} of texts > max_decision_change "
            f"{entry['max_decision_change']:g} ({summary})"
        )
    return None


def add_int8(
    folder: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    metadata: dict[str, Any],
    check: Int8Check,
) -> None:
    """Quantize ``folder/model.onnx`` to ``folder/model_int8.onnx``, check it, record ``metadata["int8"]``.

    ``model`` is the float model shipped in ``folder`` (the reference); ``metadata`` holds the float
    ``decision_threshold``, its ``threshold_source`` and ``target_fpr``.

    Raises:
        Int8CheckError: past ``check``'s limits; the message gives both AUROCs and the decision change.
    """
    from detector.bundle.loading import model_logits, onnx_session_logits

    max_length = metadata["max_length"]
    sample = check.sample_texts()
    maxima = matmul_input_maxima(folder / ONNX_FILE, score_feeds(tokenizer, sample, max_length))
    keep: dict[str, float] = {}
    if check.fp32_matmuls:

        def sample_probs(path: Path) -> np.ndarray:
            return _probs(tokenizer, onnx_session_logits(path), sample, max_length)

        sensitivity = matmul_sensitivity(folder / ONNX_FILE, sample_probs, maxima)
        keep = {name: sensitivity[name] for name in most_sensitive(sensitivity, check.fp32_matmuls)}
    divisors = quantize_onnx(folder / ONNX_FILE, folder / INT8_FILE, keep_fp32=list(keep), maxima=maxima)
    fusions = fuse_for_onnxruntime(folder / INT8_FILE)
    float_probs = _probs(tokenizer, model_logits(model), check.texts, max_length)
    int8_probs = _probs(tokenizer, onnx_session_logits(folder / INT8_FILE), check.texts, max_length)
    entry = compare(float_probs, int8_probs, check, metadata)
    entry["fp32_matmuls"] = keep
    entry["sample_texts"] = len(sample)
    entry["fused_operators"] = fusions
    entry["outlier_channels_scaled"] = {
        "quantile": OUTLIER_QUANTILE,
        "channels": sum(int((d > 1.0).sum()) for d in divisors.values()),
        "of": sum(d.size for d in divisors.values()),
        "largest_divisor": max(float(d.max()) for d in divisors.values()),
    }
    entry["size_bytes"] = {
        ONNX_FILE: (folder / ONNX_FILE).stat().st_size,
        INT8_FILE: (folder / INT8_FILE).stat().st_size,
    }
    reason = refusal(entry)
    if reason is not None:
        raise Int8CheckError(f"int8 model refused, bundle not written: {reason}")
    metadata["int8"] = entry
