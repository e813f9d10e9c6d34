"""PredictionWriter: writes ``predict`` results as JSONL, one line per input row, in input order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from detector.atomic import write_text
from detector.scoring import DEFAULT_THRESHOLD, decision

DEFAULT_PATH = "outputs/predictions/predictions.jsonl"


class PredictionWriter(BasePredictionWriter):
    """Writes ``{"id"?, "prob_machine", "label", "is_machine"}`` per row to ``output_path`` after ``predict``.

    ``label`` is ``machine`` when ``prob_machine > threshold``. With several processes each rank
    writes its own share to ``predictions.rank{N}.jsonl``. The file is committed atomically.

    Args:
        output_path: the JSONL file to write.
        threshold: P(machine) above which a row is labelled ``machine``.

    Example:
        .. code-block:: yaml

            prediction_writer:
              output_path: outputs/predictions/predictions.jsonl
              threshold: 0.5
    """

    def __init__(self, output_path: str | None = None, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__(write_interval="epoch")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        # None: `<trainer.default_root_dir>/predictions/predictions.jsonl`, resolved in setup.
        self._path_given = output_path is not None
        self.output_path = Path(output_path if output_path is not None else DEFAULT_PATH)
        self.threshold = threshold

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._path_given:
            self.output_path = Path(trainer.default_root_dir) / "predictions" / "predictions.jsonl"

    @override
    def write_on_epoch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        index = torch.cat([batch["index"] for batch in predictions]).tolist()
        probs = torch.cat([batch["prob_machine"] for batch in predictions]).tolist()
        records = getattr(getattr(trainer, "datamodule", None), "records", {}).get("predict")
        ids = records.extra.get("id") if records is not None else None
        rows = []
        for row, prob in sorted(zip(index, probs, strict=True)):
            line = decision(prob, self.threshold)
            rows.append({"id": ids[row], **line} if ids is not None else line)
        self._write(rows, trainer.global_rank if trainer.world_size > 1 else None)

    def _write(self, rows: list[dict[str, Any]], rank: int | None) -> None:
        path = self.output_path if rank is None else self.output_path.with_suffix(f".rank{rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
