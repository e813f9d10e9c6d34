"""The everyday workflows through ``python -m detector``: one root folder, the console off a terminal,
TensorBoard, early stopping, bundle max_length, which weights test/validate/evaluate score, val_f1, --onnx."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detector.__main__ import main
from detector.bundle.loading import load_detector
from detector.bundle.writer import read_metadata
from detector.checkpoint.format import load_state, save_state
from detector.cli import build_cli
from detector.records import read_records

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("--config", str(REPO / "configs/default.yaml"), "--config", str(REPO / "configs/tiny.yaml"))
STEP_LINE = re.compile(
    r"^step (\d+)/20 \| epoch [01] \| train_loss \d+\.\d{4} \| \d+\.\d\d steps/s \| ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """The README's run, tiny and short, moved with one option, its stdout a pipe (as under nohup)."""
    base = tmp_path_factory.mktemp("workflow")
    work, root = base / "work", base / "run"
    work.mkdir()
    args = [
        sys.executable, "-m", "detector", "fit", *CONFIGS, "--trainer.default_root_dir", str(root),
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10",
        "--trainer.limit_val_batches", "4",
        "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "4",
        "--model.learning_rate", "1e-2",  # learns the demo corpus in 20 steps
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-6000:]
    return {"work": work, "root": root, "output": done.stdout}


@pytest.mark.slow
def test_default_root_dir_moves_every_file_of_the_run(run):
    root = run["root"]
    assert list(run["work"].iterdir()) == []  # nothing in the folder the command ran in
    assert {p.name for p in root.iterdir()} == {
        "checkpoints", "models", "logs", "summary.json", "tokenizer", "demo_data",
    }  # fmt: skip
    assert (root / "checkpoints/checkpoint_latest.safetensors").is_file()
    assert (root / "models/inference/model_v1.0_final/model.safetensors").is_file()
    summary = json.loads((root / "summary.json").read_text())
    assert summary["checkpoints"]["dirpath"] == str(root / "checkpoints")
    assert summary["metrics_csv"] == str(root / "logs/version_0/metrics.csv")
    config = yaml.safe_load((root / "logs/version_0/config.yaml").read_text())
    assert (config["checkpoint"]["dirpath"], config["data"]["tokenizer_root"]) == (
        str(root / "checkpoints"), str(root / "tokenizer"),
    )  # fmt: skip
    export = next(
        cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("InferenceExportCallback")
    )
    assert export["init_args"]["dirpath"] == str(root / "models/inference")


@pytest.mark.slow
def test_tensorboard_event_files_sit_beside_metrics_csv(run):
    logs = run["root"] / "logs/version_0"
    events = [p for p in logs.iterdir() if p.name.startswith("events.out.tfevents.")]
    assert len(events) == 1 and (logs / "metrics.csv").is_file()
    board = EventAccumulator(str(logs))
    board.Reload()
    assert {"train_loss_step", "val_f1", "val_auroc", "val_loss"} <= set(board.Tags()["scalars"])
    assert [event.step for event in board.Scalars("val_f1")] == [9, 19]


@pytest.mark.slow
def test_console_off_a_terminal_prints_plain_progress_and_ends_with_the_summary_and_next_step(run, tmp_path):
    lines = [line.rstrip() for line in run["output"].splitlines() if line.strip()]
    assert not [line for line in lines if "weights_only" in line]
    steps = [int(m.group(1)) for m in map(STEP_LINE.match, lines) if m]
    assert steps == [4, 8, 12, 16, 20]
    assert len([line for line in lines if line.startswith("validation epoch ")]) == 2
    bundle = run["root"] / "models/inference/model_v1.0_final"
    assert lines[-1] == f"Next: python -m detector score {bundle} YOUR_TEXTS.jsonl -o scores.jsonl"
    table = lines[lines.index(next(line for line in lines if "Run summary (" in line)) : -1]
    assert table[-1].startswith("└") and any("validated on" in row and "ema weights" in row for row in table)
    # The line says what to run, and it runs.
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "some text to score"}\n', encoding="utf-8")
    main(["score", str(bundle), str(texts), "-o", str(tmp_path / "scores.jsonl")])
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_bundles_written_in_training_record_the_trained_max_length(run):
    bundle = run["root"] / "models/inference/model_v1.0_final"
    assert read_metadata(bundle)["max_length"] == 64  # configs/tiny.yaml's data.max_length
    assert load_detector(bundle).max_length == 64


def _test_metrics(root: Path, capsys, *args: str) -> tuple[dict[str, float], str]:
    options = ["--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false"]
    cli = build_cli(["test", *options, *args])
    out = capsys.readouterr().out
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}, out


def _evaluate(root: Path, out: Path, *args: str) -> dict:
    data = root / "demo_data/test.jsonl"
    best = root / "checkpoints/checkpoint_best_val_f1.safetensors"
    assert main(["evaluate", "--data", str(data), "--checkpoint", str(best), "--out", str(out),
                 "--bootstrap", "0", *args]) is None  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_test_and_evaluate_score_the_ema_weights_by_default_and_raw_on_request(run, tmp_path, capsys):
    root = run["root"]
    best = str(root / "checkpoints/checkpoint_best_val_f1.safetensors")
    ema, out = _test_metrics(root, capsys, *CONFIGS, "--ckpt_path", best)
    assert out.rstrip().endswith("Scored weights: ema")
    # A config without an EMACallback scores the checkpoint's EMA all the same.
    bare, out = _test_metrics(root, capsys, "--config", str(REPO / "configs/tiny.yaml"), "--ckpt_path", best)
    assert out.rstrip().endswith("Scored weights: ema") and bare == ema
    raw, out = _test_metrics(root, capsys, *CONFIGS, "--ckpt_path", best, "--weights", "raw")
    assert out.rstrip().endswith("Scored weights: raw")
    assert raw["test_loss"] != ema["test_loss"]
    # A checkpoint without an EMA is scored (and reported) on its raw weights, whatever the config.
    state = load_state(best)
    del state["callbacks"]["EMACallback"]
    save_state(state, tmp_path / "no_ema.safetensors")
    no_ema, out = _test_metrics(root, capsys, *CONFIGS, "--ckpt_path", str(tmp_path / "no_ema.safetensors"))
    assert out.rstrip().endswith("Scored weights: raw") and no_ema == raw
    report = _evaluate(root, tmp_path / "ema")
    assert report["settings"]["weights"] == "ema"
    assert report["overall"]["detector"]["auroc"] == pytest.approx(ema["test_auroc"], abs=1e-6)
    assert report["overall"]["detector"]["f1"] == pytest.approx(ema["test_f1"], abs=1e-6)
    report = _evaluate(root, tmp_path / "raw", "--weights", "raw")
    assert report["settings"]["weights"] == "raw"
    assert report["overall"]["detector"]["auroc"] == pytest.approx(raw["test_auroc"], abs=1e-6)
    assert json.loads((root / "summary.json").read_text())["val_weights"] == "ema"


def _validate_f1(root: Path, ckpt: Path) -> float:
    cli = build_cli(["validate", *CONFIGS, "--trainer.default_root_dir", str(root), "--ckpt_path", str(ckpt),
                     "--trainer.limit_val_batches", "4"])  # fmt: skip
    return float(cli.trainer.callback_metrics["val_f1"])


@pytest.mark.slow
def test_a_constant_machine_classifier_scores_below_the_trained_one_on_val_f1(run, tmp_path):
    root = run["root"]
    best = root / "checkpoints/checkpoint_best_val_f1.safetensors"
    state = load_state(best)
    # Label everything machine: no weight on the features, a large machine bias (raw and EMA alike).
    for weights in (state["state_dict"], state["callbacks"]["EMACallback"]["ema"]):
        weights["model.classifier.weight"] = torch.zeros_like(weights["model.classifier.weight"])
        weights["model.classifier.bias"] = torch.tensor([-5.0, 5.0])
    constant = tmp_path / "constant.safetensors"
    save_state(state, constant)
    labels = read_records(str(root / "demo_data/val.jsonl")).label[:128]  # 4 batches of 32
    machines, humans = sum(labels), len(labels) - sum(labels)
    # Macro-F1: the machine class's F1, averaged with the human class's 0.
    assert _validate_f1(root, constant) == pytest.approx(machines / (2 * machines + humans), abs=1e-6)
    assert _validate_f1(root, best) > _validate_f1(root, constant)


@pytest.mark.slow
def test_early_stopping_config_composes_with_the_default_config(run):
    cli = build_cli([
        "fit", *CONFIGS, "--config", str(REPO / "configs/early_stopping.yaml"),
        "--trainer.default_root_dir", str(run["root"].parent / "early"), "--trainer.max_epochs", "4",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--data.tokenizer_root", str(run["root"] / "tokenizer"),
        "--data.demo_dir", str(run["root"] / "demo_data"),
        "--early_stopping.init_args.stopping_threshold", "0.0",  # val_f1 >= 0: stop at the first validation
    ])  # fmt: skip
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"EarlyStopping", "EMACallback", "InferenceExportCallback", "SafetensorsTopKCheckpoint"} <= names
    assert (cli.trainer.current_epoch, cli.trainer.global_step) == (1, 3)


def _without(module: str):
    real = importlib.util.find_spec
    return lambda name, *args, **kwargs: None if name == module else real(name, *args, **kwargs)


def test_onnx_export_without_the_extra_names_it_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", _without("onnxscript"))
    config = tmp_path / "onnx.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: callbacks.inference_export.InferenceExportCallback\n"
        "      init_args: {onnx: true}\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as raised:  # one line, whatever jsonargparse wraps it in
        main(["fit", *CONFIGS, "--config", str(config), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert raised.value.code == 1
    hint = 'onnxscript (not installed): install the `onnx` extra with pip install -e ".[onnx]"'
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ONNX export needs ") and hint in last
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/logs").exists()  # no training
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.safetensors"), "--onnx", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2
    assert 'install the `onnx` extra with pip install -e ".[onnx]"' in capsys.readouterr().err
