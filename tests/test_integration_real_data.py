"""Train the default small model on the shared real data for a bounded number of steps."""

import math

import pytest

from detector.cli import build_cli
from tests.conftest import SHARED_DATA


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "train.jsonl").is_file(), reason="../shared/data is not beside the project"
)
def test_default_model_trains_on_real_data_and_reports_every_metric(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--trainer.max_steps",
            "150",
            "--trainer.val_check_interval",
            "150",
            "--trainer.enable_progress_bar",
            "false",
            "--data.max_length",
            "128",
            "--data.batch_size",
            "16",
            "--data.train_path",
            str(SHARED_DATA / "train.jsonl"),
            "--data.val_path",
            str(SHARED_DATA / "val.jsonl"),
        ],
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert cli.trainer.global_step == 150
    for name in ("val_loss", "val_f1", "val_auroc", "val_acc", "val_tpr_at_1fpr"):
        assert math.isfinite(metrics[name]), name
    assert len(cli.datamodule.datasets["val"]) == 1120  # every row of val.jsonl was scored
    with capsys.disabled():
        print(f"\nreal-data val metrics after 150 steps: {metrics}")
