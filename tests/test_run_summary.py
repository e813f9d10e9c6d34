import csv
import json
import math
import os
from pathlib import Path

import pytest

from callbacks.run_summary import RunSummary
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.checkpoint.format import read_header
from detector.checkpoint.reader import disk_usage
from detector.cli import build_cli
from detector.run_summary import build_summary, next_step, summary_rows, write_summary

TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'
EXPORT = (
    '[{"class_path": "callbacks.inference_export.InferenceExportCallback", "init_args": {"version": "2.0"}}]'
)


def inode_bytes(folder: Path) -> int:
    inodes = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return sum(inodes.values())


@pytest.fixture
def fitted(tmp_path, monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", EXPORT, "--model.arch", TINY, "--data.batch_size", "16",
        "--data.train_path", str(demo_files["train"]), "--data.val_path", str(demo_files["val"]),
        "--data.tokenizer_vocab_size", "200", "--checkpoint.save_top_k", "2",
        "--checkpoint.every_n_train_steps", "4", "--checkpoint.keep_last_steps", "2",
    ]  # fmt: skip
    cli = build_cli(args)
    return cli, json.loads((tmp_path / "outputs/summary.json").read_text())


@pytest.mark.slow
def test_summary_json_matches_the_files_on_disk(fitted, tmp_path):
    cli, summary = fitted
    trainer = cli.trainer
    checkpoint = next(cb for cb in trainer.callbacks if isinstance(cb, SafetensorsTopKCheckpoint))
    assert summary["global_step"] == trainer.global_step == 12
    assert summary["epochs"] == trainer.current_epoch == 2
    section = summary["checkpoints"]
    folder = tmp_path / section["dirpath"]
    assert section["best"]["path"] == checkpoint.best_model_path
    assert (tmp_path / section["best"]["path"]).name == "checkpoint_best_val_f1.safetensors"
    best_state = read_header(tmp_path / section["best"]["path"])["state"]
    assert best_state["global_step"] == section["best"]["step"]
    top_k = [(tmp_path / row["path"], row["score"]) for row in section["top_k"]]
    assert len(top_k) == 2
    assert all(path.is_file() for path, _ in top_k)
    assert section["best"]["score"] == top_k[0][1]
    assert os.path.samefile(tmp_path / section["best"]["path"], top_k[0][0])
    files = [*section["epoch_files"], *section["step_files"]]
    assert [Path(p).name for p in files] == [
        "checkpoint_epoch_1.safetensors", "checkpoint_step_8.safetensors", "checkpoint_step_12.safetensors"
    ]  # fmt: skip
    assert all((tmp_path / p).is_file() for p in files)
    assert section["disk_bytes"] == inode_bytes(folder)
    root = "outputs/models/inference"
    # An epoch bundle each time val_f1 improved (read back from the run's metrics.csv), then the final one.
    with open(tmp_path / "outputs/logs/version_0/metrics.csv") as handle:
        val_f1 = [float(row["val_f1"]) for row in csv.DictReader(handle) if row["val_f1"]]
    improved = [epoch for epoch, score in enumerate(val_f1) if score > max(val_f1[:epoch], default=-1.0)]
    assert improved[0] == 0
    assert summary["bundles"] == [
        *(f"{root}/model_v2.0_epoch{epoch}" for epoch in improved),
        f"{root}/model_v2.0_final",
    ]
    assert all((tmp_path / p / "model.safetensors").is_file() for p in summary["bundles"])
    on_disk = sorted(p.name for p in (tmp_path / "outputs/models/inference").iterdir())
    assert sorted(Path(p).name for p in summary["bundles"]) == on_disk
    assert summary["saves"] == checkpoint.save_time[1] == 4
    assert 0 < summary["save_time_s"] <= summary["wall_time_s"]


def test_disk_usage_counts_hard_links_once_and_skips_temps(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x" * 100)
    os.link(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(b"y" * 7)
    (tmp_path / ".d.safetensors.tmp-1-ab").write_bytes(b"z" * 50)
    (tmp_path / ".model_v1.0_final.tmp-1-cd").mkdir()  # a bundle's temp folder: its files are left out
    (tmp_path / ".model_v1.0_final.tmp-1-cd" / "model.safetensors").write_bytes(b"w" * 1000)
    assert disk_usage(tmp_path) == 107
    assert disk_usage(tmp_path / "missing") == 0


def test_write_summary_is_strict_json_and_leaves_no_temp(tmp_path):
    summary = build_summary(
        global_step=3, epochs=1, wall_time_s=1.23456, save_time_s=0.5, saves=2, checkpoints=None, bundles=[]
    )
    path = write_summary(summary, tmp_path / "out" / "summary.json")
    assert json.loads(path.read_text()) == {
        "global_step": 3, "epochs": 1, "wall_time_s": 1.235, "save_time_s": 0.5, "saves": 2,
        "checkpoints": None, "bundles": [], "stopped": "finished", "val_weights": None, "metrics_csv": None,
    }  # fmt: skip
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]
    with pytest.raises(ValueError):
        write_summary({"score": math.nan}, tmp_path / "nan.json")
    assert not list(tmp_path.glob(".nan.json*"))


def test_summary_rows_show_missing_best_and_scores():
    checkpoints = {
        "dirpath": "c", "monitor": "val_f1", "mode": "max", "best": None,
        "top_k": [{"path": "c/x", "score": None}], "epoch_files": [], "step_files": [],
        "disk_bytes": 2_500_000,
    }  # fmt: skip
    summary = build_summary(
        global_step=1,
        epochs=0,
        wall_time_s=2.0,
        save_time_s=None,
        saves=None,
        checkpoints=checkpoints,
        bundles=["b"],
    )
    assert summary_rows(summary) == [
        ("steps", "1"), ("epochs", "0"), ("wall time", "2.0 s"), ("best val_f1", "none"),
        ("top-1", "n/a  c/x"), ("checkpoint disk", "2.5 MB"), ("bundle", "b"),
    ]  # fmt: skip


def test_path_must_be_given():
    with pytest.raises(ValueError, match="path must be a file path"):
        RunSummary(path="")


def test_rows_name_the_validated_weights_and_metrics_and_the_next_step_scores_the_last_bundle():
    best = {"score": 0.9, "epoch": 1, "step": 8, "path": "c/checkpoint_best_val_f1.safetensors"}
    checkpoints = {"dirpath": "c", "monitor": "val_f1", "mode": "max", "best": best, "top_k": [],
                   "epoch_files": [], "step_files": [], "disk_bytes": 10}  # fmt: skip
    common = {"global_step": 8, "epochs": 2, "wall_time_s": 1.0, "save_time_s": None, "saves": None,
              "checkpoints": checkpoints, "val_weights": "ema", "metrics_csv": "l/metrics.csv"}  # fmt: skip
    summary = build_summary(**common, bundles=["m/model_v1.0_epoch1", "m/model_v1.0_final"])
    assert summary_rows(summary)[-2:] == [("validated on", "ema weights"), ("metrics", "l/metrics.csv")]
    assert (
        next_step(summary)
        == "Next: python -m detector score m/model_v1.0_final YOUR_TEXTS.jsonl -o scores.jsonl"
    )
    no_bundle = build_summary(**common, bundles=[])
    assert (
        next_step(no_bundle)
        == "Next: python -m detector export c/checkpoint_best_val_f1.safetensors --version 1.0"
    )
    assert next_step(build_summary(**{**common, "checkpoints": None}, bundles=[])) is None
