"""Every script in examples/ runs offline and produces what it says (in order: later ones reuse 01's run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector.checkpoint.format import read_header, verify_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "examples").glob("[0-9][0-9]_*.py"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


def run(script: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def test_the_examples_are_the_ones_tested():
    assert SCRIPTS == [
        "01_train.py", "02_resume.py", "03_inspect_checkpoints.py", "04_export_bundle.py",
        "05_load_bundle.py", "06_callback_in_another_project.py",
    ]  # fmt: skip


def test_01_train_writes_checkpoints_bundles_and_summary(workdir):
    out = run("01_train.py", workdir)
    run_dir = workdir / "outputs/examples/train"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert {"checkpoint_latest.safetensors", "checkpoint_best_val_f1.safetensors"} <= set(names)
    assert "checkpoint_epoch_2.safetensors" in names
    assert sum(n.startswith("checkpoint_top_") for n in names) == 2
    assert [n for n in names if n.startswith("checkpoint_step_")] == [
        "checkpoint_step_12.safetensors", "checkpoint_step_16.safetensors"
    ]  # fmt: skip
    assert read_header(run_dir / "checkpoints/checkpoint_latest.safetensors")["state"]["global_step"] == 18
    assert (run_dir / "models/inference/model_v1.0_final/model.safetensors").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 18
    assert summary["metrics_csv"] == "outputs/examples/train/logs/version_0/metrics.csv"  # one root: logs too
    assert (run_dir / "logs/version_0/metrics.csv").is_file()
    assert "steps: 18; best checkpoint:" in out


def test_02_resume_continues_from_the_interrupted_step(workdir):
    out = run("02_resume.py", workdir)
    assert "interrupted at step 5; checkpoint_step_4.safetensors holds step 4" in out
    assert "resumed from step 4, finished at step 12" in out
    latest = workdir / "outputs/examples/resume/checkpoints/checkpoint_latest.safetensors"
    assert read_header(latest)["state"]["global_step"] == 12


def test_03_inspect_lists_verifies_and_loads(workdir):
    out = run("03_inspect_checkpoints.py", workdir)
    assert "OK  checkpoint_latest.safetensors" in out and "BAD" not in out
    assert "val_loss" in out.splitlines()[0]
    assert "loaded DebertaV2ForSequenceClassification" in out
    assert "bundle weights would be the ema weights" in out


def test_04_export_writes_a_bundle_with_onnx_and_a_chosen_threshold(workdir):
    run("04_export_bundle.py", workdir)
    bundle = workdir / "outputs/examples/export/model_v1.1_best"
    assert {"config.json", "model.safetensors", "model.onnx", "training_metadata.json", "README.md"} <= {
        p.name for p in bundle.iterdir()
    }
    metadata = json.loads((bundle / "training_metadata.json").read_text())
    assert metadata["weights"] == "ema"
    assert metadata["threshold_source"].startswith("validation set")
    assert metadata["checkpoint"].endswith("checkpoint_best_val_f1.safetensors")


def test_05_load_bundle_scores_with_transformers_detector_and_onnx(workdir):
    out = run("05_load_bundle.py", workdir)
    for line in (
        "pipeline:",
        "P(machine), transformers:",
        "detector (threshold",
        "P(machine), ONNX Runtime:",
    ):
        assert line in out


def test_06_components_work_in_a_plain_lightning_project(workdir):
    out = run("06_callback_in_another_project.py", workdir)
    folder = workdir / "outputs/examples/another_project/checkpoints"
    for path in folder.iterdir():
        verify_state(path)
    assert "resumed run ended at step 32" in out
    assert "best: Regressor (width 8); EMA of 4 tensors" in out
