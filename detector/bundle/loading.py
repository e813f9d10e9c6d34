"""Load a bundle and score texts: P(machine) and the decision at the bundle's stored threshold."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from detector.backbone import ID2LABEL
from detector.bundle.onnx import ONNX_FILE, encode
from detector.bundle.writer import read_metadata

Backend = Literal["torch", "onnx"]
LogitsFn = Callable[[dict[str, torch.Tensor]], np.ndarray]


def prob_machine(logits: np.ndarray) -> np.ndarray:
    """P(machine) from ``(n, 2)`` logits: the softmax's second column, in float64 without overflow."""
    logits = np.asarray(logits, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * (logits[:, 1] - logits[:, 0])))


def _torch_logits(bundle: Path, device: str) -> LogitsFn:
    model = AutoModelForSequenceClassification.from_pretrained(bundle).to(device).eval()

    def logits(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        return out.float().cpu().numpy()

    return logits


def _onnx_logits(bundle: Path) -> LogitsFn:
    path = bundle / ONNX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export the bundle with onnx=True, or use backend='torch'")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]

    return logits


class Detector:
    """Scores texts with a bundle's classifier and labels them at its decision threshold.

    A text is labelled ``machine`` when ``prob_machine > threshold`` (see
    :func:`detector.bundle.thresholds.threshold_at_fpr` for the tie rule).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        logits_fn: LogitsFn,
        threshold: float,
        max_length: int,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self.max_length = int(max_length)
        self.metadata = metadata or {}
        self._logits = logits_fn

    def score(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """``[{"prob_machine": p, "label": "human"|"machine", "is_machine": bool}, ...]`` in input order.

        Texts are batched in order of length (less padding) and the results put back in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise ValueError(f"texts must be strings; items {bad[:5]} are not")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        probs = np.empty(len(texts), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = encode(self.tokenizer, [texts[i] for i in chunk], self.max_length)
            probs[chunk] = prob_machine(self._logits(inputs))
        return [self._result(float(p)) for p in probs]

    def _result(self, p: float) -> dict[str, Any]:
        is_machine = p > self.threshold
        return {"prob_machine": p, "label": ID2LABEL[int(is_machine)], "is_machine": is_machine}


def load_detector(
    bundle: str | Path, backend: Backend = "torch", *, threshold: float | None = None, device: str = "cpu"
) -> Detector:
    """Load ``bundle`` for scoring with PyTorch or ONNX Runtime (CPU).

    Args:
        bundle: a bundle folder written by :func:`detector.bundle.writer.write_bundle`.
        backend: ``"torch"`` (``model.safetensors``) or ``"onnx"`` (``model.onnx``).
        threshold: overrides the stored ``decision_threshold``.
        device: the PyTorch device; ONNX Runtime runs on the CPU.
    """
    bundle = Path(bundle)
    metadata = read_metadata(bundle)
    if backend == "torch":
        logits_fn = _torch_logits(bundle, device)
    elif backend == "onnx":
        logits_fn = _onnx_logits(bundle)
    else:
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    chosen = metadata["decision_threshold"] if threshold is None else threshold
    return Detector(tokenizer, logits_fn, chosen, metadata["max_length"], metadata)
