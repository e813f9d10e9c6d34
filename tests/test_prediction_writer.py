"""PredictionWriter: JSONL rows in input order, the shared decision rule, atomic and clean on failure."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from callbacks.prediction_writer import PredictionWriter
from detector import atomic
from detector.scoring import DEFAULT_THRESHOLD


def _trainer() -> SimpleNamespace:
    return SimpleNamespace(datamodule=None, global_rank=0, world_size=1)


def _predictions() -> list[dict[str, torch.Tensor]]:
    # Two batches out of input order, as a length-sorted or sharded loader may hand them over.
    return [
        {"index": torch.tensor([2, 0]), "prob_machine": torch.tensor([0.9, 0.5], dtype=torch.float64)},
        {"index": torch.tensor([1]), "prob_machine": torch.tensor([0.25], dtype=torch.float64)},
    ]


def test_rows_come_in_input_order_with_machine_only_above_the_threshold(tmp_path):
    writer = PredictionWriter(str(tmp_path / "p.jsonl"))
    assert writer.threshold == DEFAULT_THRESHOLD
    writer.write_on_epoch_end(_trainer(), None, _predictions(), [])
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == [
        {"prob_machine": 0.5, "label": "human", "is_machine": False},
        {"prob_machine": 0.25, "label": "human", "is_machine": False},
        {"prob_machine": 0.9, "label": "machine", "is_machine": True},
    ]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    (tmp_path / "p.jsonl").write_text("old\n")

    def broken_disk(path):
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(atomic, "fsync_file", broken_disk)
    with pytest.raises(OSError, match="injected I/O error"):
        PredictionWriter(str(tmp_path / "p.jsonl")).write_on_epoch_end(_trainer(), None, _predictions(), [])
    assert [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]
    assert (tmp_path / "p.jsonl").read_text() == "old\n"
