"""Load a bundle and score texts: P(machine) and the decision at the bundle's stored threshold."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from detector.bundle.integrity import BundleIntegrityError, check_finite, verify_bundle
from detector.bundle.onnx import ONNX_FILE, encode
from detector.bundle.quantize import INT8_FILE
from detector.bundle.remote import download_bundle, named_as
from detector.bundle.writer import METADATA_FILE, read_metadata
from detector.checkpoint.objects import is_url
from detector.scoring import DEFAULT_THRESHOLD, decision, prob_machine

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "onnx-int8")
WEIGHTS_FILE = "model.safetensors"
LogitsFn = Callable[[dict[str, torch.Tensor]], np.ndarray]
# Texts are length-sorted within windows of this many batches; `detector score` reads its input in
# windows of the same size, so a file scores in the same batches wherever it is scored.
WINDOW_BATCHES = 16


def model_logits(model: PreTrainedModel, device: str = "cpu") -> LogitsFn:
    """A :class:`Detector`'s logits function over an in-memory classifier (put in eval mode)."""
    model = model.eval()
    model.to(device)  # type: ignore[arg-type]  # transformers types `to` for its own dtypes only

    def logits(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        return out.float().cpu().numpy()

    return logits


def _from_bundle(bundle: Path, what: str, load: Callable[[Path], Any]) -> Any:
    try:
        return load(bundle)
    except Exception as err:  # unverified bundles: say which bundle, whatever transformers raised
        raise BundleIntegrityError(
            f"{bundle}: the {what} could not be loaded ({type(err).__name__}: {err})"
        ) from err


def _torch_logits(bundle: Path, device: str) -> LogitsFn:
    model = _from_bundle(bundle, "model", AutoModelForSequenceClassification.from_pretrained)
    check_finite(model.named_parameters(), bundle / WEIGHTS_FILE)
    return model_logits(model, device)


def _safetensors_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, weights.get_tensor(name)
    except SafetensorError as err:
        raise BundleIntegrityError(f"{path}: not a readable safetensors file ({err})") from err


# What to do when a backend's file is missing from a bundle.
MISSING_HINTS = {
    ONNX_FILE: "export the bundle with onnx=True (--onnx), or use backend='torch'",
    INT8_FILE: "export the bundle with --quantize (quantize=True), or use backend 'onnx' or 'torch'",
}


def onnx_session_logits(path: Path) -> LogitsFn:
    """A :class:`Detector`'s logits function over the ONNX model at ``path`` (ONNX Runtime, CPU)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {MISSING_HINTS.get(path.name, 'not an ONNX model')}")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def logits(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        return session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})[0]

    return logits


def _int8_threshold(bundle: Path, metadata: dict[str, Any]) -> float:
    entry = metadata.get("int8")
    if not isinstance(entry, dict) or not isinstance(entry.get("decision_threshold"), int | float):
        raise BundleIntegrityError(
            f"{bundle / METADATA_FILE}: no int8.decision_threshold for {INT8_FILE}; export with --quantize"
        )
    return float(entry["decision_threshold"])


class Detector:
    """Scores texts with a bundle's classifier and labels them at its decision threshold.

    A text is labelled ``machine`` when ``prob_machine > threshold`` (see
    :func:`detector.bundle.thresholds.threshold_at_fpr` for the tie rule); P(machine) is
    :func:`detector.scoring.prob_machine` of the logits.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        logits_fn: LogitsFn,
        threshold: float = DEFAULT_THRESHOLD,
        max_length: int = 512,
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

        Within each window of ``batch_size * WINDOW_BATCHES`` texts, texts are batched in order of
        length (less padding); the results come back in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise ValueError(f"texts must be strings; items {bad[:5]} are not")
        window = batch_size * WINDOW_BATCHES
        probs = np.empty(len(texts), dtype=np.float64)
        for first in range(0, len(texts), window):
            indices = range(first, min(first + window, len(texts)))
            order = sorted(indices, key=lambda i: len(texts[i]))
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                inputs = encode(self.tokenizer, [texts[i] for i in chunk], self.max_length)
                probs[chunk] = prob_machine(self._logits(inputs)).numpy()
        return [decision(float(p), self.threshold) for p in probs]


def load_detector(
    bundle: str | Path,
    backend: Backend = "torch",
    *,
    threshold: float | None = None,
    device: str = "cpu",
    verify: bool = True,
) -> Detector:
    """Load ``bundle`` for scoring with PyTorch or ONNX Runtime (CPU).

    Args:
        bundle: a bundle folder written by :func:`detector.bundle.writer.write_bundle`.
        backend: ``"torch"`` (``model.safetensors``), ``"onnx"`` (``model.onnx``) or ``"onnx-int8"``
            (``model_int8.onnx``, written by ``export --quantize``; scored at its own threshold,
            ``training_metadata.json``'s ``int8.decision_threshold``).
        threshold: overrides the stored ``decision_threshold`` (the int8 one for ``"onnx-int8"``).
        device: the PyTorch device; ONNX Runtime runs on the CPU.
        verify: check every file against the bundle's ``SHA256SUMS`` first
            (:func:`detector.bundle.integrity.verify_bundle`); ``False`` for a bundle edited on purpose.
            Non-finite weights are refused either way.

    Raises:
        BundleIntegrityError: naming the file at fault: missing, altered, unlisted, non-finite weights.
    """
    if is_url(bundle):  # a complete bundle on an object store, loaded from a local copy
        local = download_bundle(str(bundle))
        try:
            return load_detector(local, backend, threshold=threshold, device=device, verify=verify)
        except (BundleIntegrityError, FileNotFoundError) as error:
            raise named_as(error, local, str(bundle).rstrip("/")) from None
    bundle = Path(bundle)
    if not (bundle / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{bundle / METADATA_FILE} not found: {bundle} is not a detector bundle")
    if verify:
        verify_bundle(bundle)
    metadata = read_metadata(bundle)
    if backend == "torch":
        logits_fn = _torch_logits(bundle, device)
    elif backend in ("onnx", "onnx-int8"):
        if (bundle / WEIGHTS_FILE).is_file():
            check_finite(_safetensors_weights(bundle / WEIGHTS_FILE), bundle / WEIGHTS_FILE)
        logits_fn = onnx_session_logits(bundle / (ONNX_FILE if backend == "onnx" else INT8_FILE))
    else:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    tokenizer = _from_bundle(bundle, "tokenizer", AutoTokenizer.from_pretrained)
    stored = metadata["decision_threshold"]
    if backend == "onnx-int8":
        stored = _int8_threshold(bundle, metadata)
    chosen = stored if threshold is None else threshold
    return Detector(tokenizer, logits_fn, chosen, metadata["max_length"], metadata)
