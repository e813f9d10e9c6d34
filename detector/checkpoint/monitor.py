"""The monitored metric as every rank sees it: read from the Trainer, checked, broadcast from rank zero.

Shared by the checkpoint callback and the export callback, whose saves and exports are collectives
(sharded states, FSDP2 gathers): every rank must take the same decision, so rank zero's values decide.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from detector.checkpoint.topk import Mode, is_better


def monitored_metrics(trainer: Any, monitor: str) -> dict[str, float]:
    """The scalar ``trainer.callback_metrics`` as floats, rank zero's on every rank (a collective).

    Raises:
        ValueError: ``monitor`` was not logged; the message names what was.
    """
    logged = trainer.callback_metrics
    if monitor not in logged:
        raise ValueError(
            f"`{monitor}` was not logged; logged: {sorted(logged)}. Did you call self.log('{monitor}', ...)?"
        )
    metrics = {k: float(v) for k, v in logged.items() if torch.as_tensor(v).numel() == 1}
    return trainer.strategy.broadcast(metrics, src=0)


def improves(score: float, best: float | None, mode: Mode) -> bool:
    """Whether ``score`` beats ``best`` (None: nothing yet) by :func:`~detector.checkpoint.topk.is_better`.

    A non-finite score (NaN, +inf, -inf) never improves, as it never ranks in the top K.
    """
    return is_better(score, math.nan if best is None else best, mode)
