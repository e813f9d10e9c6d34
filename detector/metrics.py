"""Classification metrics for the detector: torchmetrics plus the true-positive rate at a fixed FPR."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, MulticlassF1Score
from torchmetrics.functional.classification import binary_roc
from torchmetrics.utilities import dim_zero_cat


def tpr_at_fpr(scores: torch.Tensor, labels: torch.Tensor, max_fpr: float = 0.01) -> torch.Tensor:
    """The highest true-positive rate over thresholds whose false-positive rate is at most ``max_fpr``.

    Exact on the empirical ROC (no interpolation): a threshold only counts if it flags at most
    ``max_fpr`` of the humans (label 0). With no humans or no machines the rate is undefined: 0.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    labels = labels.long()
    if labels.numel() == 0 or labels.min() == labels.max():
        return torch.tensor(0.0)
    fpr, tpr, _ = binary_roc(scores.double(), labels, thresholds=None)
    return tpr[fpr <= max_fpr].max()


class TPRAtFPR(Metric):
    """True-positive rate of the machine class at a false-positive rate of at most ``max_fpr``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    scores: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __init__(self, max_fpr: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= max_fpr <= 1.0:
            raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
        self.max_fpr = max_fpr
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(scores.detach().double())  # P(machine) is float64: no ties made here
        self.labels.append(labels.detach().long())

    def compute(self) -> torch.Tensor:
        return tpr_at_fpr(dim_zero_cat(self.scores), dim_zero_cat(self.labels), self.max_fpr)


class MacroF1(MulticlassF1Score):
    """F1 of each class (human and machine) at P(machine) > ``threshold``, averaged: macro-F1.

    The machine-class F1 alone rewards a constant ``machine`` classifier on machine-heavy data (0.925 on
    86% machine); macro-F1 gives it at most 0.5, as its human-class F1 is 0.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__(num_classes=2, average="macro")
        self.threshold = threshold

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update((preds > self.threshold).long(), target.long())


def classification_metrics(prefix: str) -> MetricCollection:
    """The per-epoch metrics: ``{prefix}f1``, ``{prefix}auroc``, ``{prefix}acc``, ``{prefix}tpr_at_1fpr``.

    Every metric takes P(machine) and the 0/1 label. ``f1`` is macro-F1 (:class:`MacroF1`: the mean of
    the human and machine F1 at P(machine) > 0.5), so a constant classifier cannot win it; accuracy
    thresholds at 0.5 too.
    """
    return MetricCollection(
        {
            "f1": MacroF1(),
            "auroc": BinaryAUROC(),
            "acc": BinaryAccuracy(),
            "tpr_at_1fpr": TPRAtFPR(0.01),
        },
        prefix=prefix,
    )
