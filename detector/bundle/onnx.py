"""Export the classifier to ONNX (dynamic batch and sequence axes) and check it against PyTorch.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter, which is
the default and the maintained path in torch 2.13; it handles DeBERTa-v2's relative-position
attention with symbolic batch and sequence sizes. The legacy TorchScript-based exporter
(``dynamo=False``) also runs, but it traces Python-side shape logic as constants (it warns on
DeBERTa's ``key_layer.size(-2) != query_layer.size(-2)``) and is deprecated with TorchScript.

TorchScript (``torch.jit.script``/``trace``) is deprecated by PyTorch, Lightning
(``to_torchscript``) and transformers (``torchscript=True``): for deployment use this ONNX export
or ``torch.export.export`` on the same wrapper.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-4
INPUT_NAMES = ("input_ids", "attention_mask")
# What `onnx: true` needs beyond the base install: the `onnx` extra of pyproject.toml.
ONNX_EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")
ONNX_EXTRA_INSTALL = 'pip install -e ".[onnx]"'


# What the exporters print on every export of these models and that asks nothing of the user (torch 2.13,
# onnxscript 0.x): torchvision's operators not registered, the dynamic axes' names merged, LayerNorm's
# constant folding skipped, a deprecation inside torch's own pytree code. Their errors still show.
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript")
EXPORTER_WARNINGS = (
    (UserWarning, r"# The axis name: .* will not be used"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)


@contextlib.contextmanager
def quiet_exporters(*loggers_too: str) -> Iterator[None]:
    """Hide the exporters' routine notes (:data:`EXPORTER_LOGGERS` and ``loggers_too`` below ERROR,
    :data:`EXPORTER_WARNINGS`); ``""`` names the root logger."""
    loggers = [logging.getLogger(name) for name in (*EXPORTER_LOGGERS, *loggers_too)]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for category, message in EXPORTER_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


class MissingExtraError(ImportError):
    """A module of an optional extra is not installed; the message names the extra and how to install it."""


def require_onnx() -> None:
    """Raise :class:`MissingExtraError` naming the ``onnx`` extra when a module the export needs is missing.

    Checked before any work (a run stops before training, not at its first bundle).
    """
    missing = [name for name in ONNX_EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"ONNX export needs {', '.join(missing)} (not installed): install the `onnx` extra with "
            f"{ONNX_EXTRA_INSTALL}, or turn the ONNX export off"
        )


# Texts of different lengths, so the check runs at a batch and sequence size other than the export's.
CHECK_TEXTS = (
    "A short text.",
    "The committee reviewed the proposal and asked for a revised budget by Friday.",
    "Results were mixed: two of five trials improved, and the rest showed no measurable change at all.",
)


class LogitsOnly(nn.Module):
    """``(input_ids, attention_mask) -> logits``: the traced signature of the exported graph."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """Padded, truncated ``input_ids`` and ``attention_mask`` (int64) for ``texts``."""
    enc = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {name: enc[name].long() for name in INPUT_NAMES}


def export_onnx(model: PreTrainedModel, path: Path, example: dict[str, Tensor]) -> None:
    """Write ``model`` (in eval mode) to the single file ``path`` with dynamic batch and sequence axes.

    ``example`` needs a batch of at least 2 and a sequence of at least 2 tokens: the exporter
    specialises dimensions of size 0 or 1.
    """
    if min(example["input_ids"].shape) < 2:
        raise ValueError(
            f"the export example needs batch and sequence >= 2, got {tuple(example['input_ids'].shape)}"
        )
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with quiet_exporters():
        torch.onnx.export(
            LogitsOnly(model).eval(),
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUT_NAMES},
            verbose=False,
        )


def onnx_logits(path: Path, inputs: dict[str, Tensor]) -> np.ndarray:
    """Logits of the ONNX model at ``path`` under ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {name: inputs[name].numpy() for name in INPUT_NAMES})[0]


def export_and_check(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    max_length: int,
    tolerance: float = ONNX_TOLERANCE,
) -> float:
    """Export ``model`` to ``folder/model.onnx`` and return the max abs logit difference to PyTorch.

    Raises:
        ValueError: when the difference exceeds ``tolerance``.
    """
    model = model.eval()
    export_onnx(model, folder / ONNX_FILE, encode(tokenizer, list(CHECK_TEXTS[1:]), max_length))
    inputs = encode(tokenizer, list(CHECK_TEXTS), max_length)
    with torch.inference_mode():
        expected = model(**inputs).logits.float().numpy()
    diff = float(np.abs(onnx_logits(folder / ONNX_FILE, inputs) - expected).max())
    if not diff <= tolerance:
        raise ValueError(f"ONNX logits differ from PyTorch by {diff:.3g} > {tolerance:g}; bundle not written")
    return diff
