"""The label table, P(machine) from logits and the decision rule: the one home of each.

Every place that turns logits into a score (the module's validation, test and predict steps, bundle
inference with PyTorch or ONNX, ``detector export --val-data``, ``detector evaluate``) calls
:func:`prob_machine`, so a threshold chosen on one path's scores means the same on every other path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

LABELS = ("human", "machine")
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {name: i for i, name in ID2LABEL.items()}
MACHINE = LABEL2ID["machine"]
# Predict machine when P(machine) > 0.5: the argmax over the two logits (human on a tie).
DEFAULT_THRESHOLD = 0.5


def prob_machine(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    """P(machine) from ``(n, 2)`` logits: the float64 softmax's machine column, on the logits' device.

    Float64 so that no two paths round differently: ``torch.softmax`` subtracts the row maximum (no
    overflow), and the same logits always give the same bits. The card's transformers-only example
    spells the same expression (``logits.double().softmax(-1)[:, 1]``).
    """
    return torch.as_tensor(logits).double().softmax(-1)[..., MACHINE]


def decision(prob: float, threshold: float) -> dict[str, Any]:
    """``{"prob_machine", "label", "is_machine"}`` for one score: machine when ``prob > threshold``."""
    is_machine = prob > threshold
    return {"prob_machine": prob, "label": ID2LABEL[int(is_machine)], "is_machine": is_machine}
