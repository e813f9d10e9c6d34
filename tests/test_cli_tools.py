"""The CLI around a finished run: listing checkpoints, predict and test from a checkpoint, export, score."""

import json

import pytest
import yaml

from detector.__main__ import main
from detector.checkpoint.format import read_header
from detector.cli import build_cli
from tests.conftest import ROOT

TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short fit of the tiny model with the default callbacks; returns its folder."""
    from detector.demo import demo_rows
    from tests.conftest import write_jsonl

    cwd = tmp_path_factory.mktemp("run")
    files = {
        s: write_jsonl(cwd / f"{s}.jsonl", demo_rows(n, seed=i))
        for i, (s, n) in enumerate([("train", 64), ("val", 24)])
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        build_cli([
            "fit", "--config", str(ROOT / "configs/default.yaml"), "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false", "--model.arch", TINY, "--data.batch_size", "8",
            "--data.train_path", str(files["train"]), "--data.val_path", str(files["val"]),
            "--data.tokenizer_vocab_size", "200",
        ])  # fmt: skip
    return cwd, files


def test_checkpoints_carry_metrics_and_the_tool_lists_them(run, capsys):
    cwd, _ = run
    latest = cwd / "outputs/checkpoints/checkpoint_latest.safetensors"
    state = read_header(latest)["state"]
    assert {"val_f1", "val_auroc", "val_loss"} <= set(state["metrics"])
    assert main(["checkpoints", "list", str(latest.parent)]) is None
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["file", "epoch", "step", "size"] and "val_f1" in header.split()
    assert any(row.startswith("checkpoint_latest.safetensors") for row in rows)


def test_predict_from_a_checkpoint_uses_its_hyperparameters_and_writes_jsonl(run, monkeypatch):
    cwd, files = run
    monkeypatch.chdir(cwd)
    # No --model.arch: the tiny architecture comes from the checkpoint, not the default config.
    config = str(ROOT / "configs/default.yaml")
    main(["predict", "--config", config, "--data.train_path", str(files["train"]),
          "--data.predict_path", str(files["val"]), "--trainer.enable_progress_bar", "false",
          "--ckpt_path", "outputs/checkpoints/checkpoint_best_val_f1.safetensors"])  # fmt: skip
    lines = [
        json.loads(line) for line in (cwd / "outputs/predictions/predictions.jsonl").read_text().splitlines()
    ]
    ids = [json.loads(line)["id"] for line in files["val"].read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    assert all(line["label"] == ("machine" if line["prob_machine"] > 0.5 else "human") for line in lines)


def test_export_then_score_a_checkpoint(run, monkeypatch, capsys):
    cwd, files = run
    monkeypatch.chdir(cwd)
    main(["export", "outputs/checkpoints/checkpoint_latest.safetensors", "--version", "2.0",
          "--val-data", str(files["val"]), "--out", "exported"])  # fmt: skip
    bundle = cwd / capsys.readouterr().out.strip().splitlines()[-1]
    assert bundle.name == "model_v2.0_epoch1" and bundle.parent.name == "exported"
    metadata = json.loads((bundle / "training_metadata.json").read_text())
    assert metadata["weights"] == "ema" and metadata["threshold_source"] != "default"
    card = (bundle / "README.md").read_text().split("---")[1]
    assert yaml.safe_load(card)["pipeline_tag"] == "text-classification"
    main(["score", str(bundle), str(files["val"]), "-o", "scores.jsonl"])
    scores = (cwd / "scores.jsonl").read_text().splitlines()
    assert len(scores) == 24 and {"prob_machine", "label"} <= set(json.loads(scores[0]))
