"""`python -m detector` with checkpoints on a real S3 server: fit, resume (bitwise exact), the tool verbs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_helpers import s3fs_client

from detector.checkpoint import objects
from detector.checkpoint.reader import load_checkpoint_state
from tests.state_helpers import build_cli_in, final_training_state

REPO = Path(__file__).resolve().parents[1]
TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'
EMA = '[{"class_path": "callbacks.ema.EMACallback", "init_args": {"decay": 0.9, "warmup": true}}]'


def fit(cwd: Path, demo_files: dict[str, Path], dirpath: str, *extra: str):
    return build_cli_in(cwd, fit_args(cwd, demo_files, dirpath, *extra))


def fit_args(cwd: Path, demo_files: dict[str, Path], dirpath: str, *extra: str) -> list[str]:
    return [
        "fit", "--trainer.max_epochs", "2", "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", EMA, "--model.arch", TINY,
        "--data.batch_size", "16", "--data.train_path", str(demo_files["train"]),
        "--data.val_path", str(demo_files["val"]), "--data.tokenizer_root", str(cwd.parent / "tokenizer"),
        "--data.tokenizer_vocab_size", "200", "--checkpoint.dirpath", dirpath, *extra,
    ]  # fmt: skip


def assert_same_training_state(got: dict, expected: dict) -> None:
    for part in ("weights", "optimizer", "ema"):
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), f"{part}: {key}"


@pytest.mark.slow
def test_fit_on_s3_names_its_checkpoints_in_the_manifest_and_resumes_bitwise_exact(s3, tmp_path, demo_files):
    dirpath = f"{s3}/runs/a"
    straight = fit(tmp_path / "straight", demo_files, dirpath, "--checkpoint.every_n_train_steps", "3",
                   "--checkpoint.keep_last_steps", "-1", "--checkpoint.save_top_k", "1")  # fmt: skip
    assert straight.trainer.global_step == 12  # 96 rows, batches of 16, 2 epochs
    expected = final_training_state(straight)
    manifest = objects.read_manifest(dirpath)
    tracker = straight.trainer.checkpoint_callback.tracker
    (top,) = [r.name for r in tracker.top_k.kept]
    assert sorted(manifest) == sorted(
        [
            "checkpoint_latest.safetensors", "checkpoint_best_val_f1.safetensors", top,
            "checkpoint_epoch_1.safetensors", *(f"checkpoint_step_{s}.safetensors" for s in (3, 6, 9, 12)),
        ]
    )  # fmt: skip
    stored = {p.rsplit("/", 1)[-1] for p in s3fs_client().find(f"{dirpath}/states")}
    assert stored == {
        key.removeprefix("states/") for key in manifest.values()
    }  # each state once, none orphaned
    assert load_checkpoint_state(f"{dirpath}/checkpoint_latest.safetensors")["global_step"] == 12

    # Mid-epoch (step 3 of 6 an epoch), straight from the bucket.
    resumed = fit(tmp_path / "resumed", demo_files, f"{s3}/runs/b",
                  "--ckpt_path", f"{dirpath}/checkpoint_step_3.safetensors")  # fmt: skip
    assert resumed.trainer.global_step == 12
    assert_same_training_state(final_training_state(resumed), expected)

    # Stopped by SIGTERM at step 4 (it saves latest), then `--ckpt_path last` from the bucket folder.
    dirpath = f"{s3}/runs/c"
    stop_at = json.dumps({"class_path": "tests.kill_helpers.SignalAt", "init_args": {"step": 4}})
    with pytest.raises(SystemExit) as stop:
        fit(tmp_path / "stopped", demo_files, dirpath, "--trainer.callbacks+", stop_at)
    assert stop.value.code == 128 + signal.SIGTERM
    assert load_checkpoint_state(f"{dirpath}/checkpoint_latest.safetensors")["global_step"] == 4
    resumed = fit(tmp_path / "resumed_last", demo_files, dirpath, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 12
    assert_same_training_state(final_training_state(resumed), expected)
    summary = json.loads((tmp_path / "resumed_last/outputs/summary.json").read_text())
    assert summary["checkpoints"]["dirpath"] == dirpath
    assert summary["checkpoints"]["best"]["path"] == f"{dirpath}/checkpoint_best_val_f1.safetensors"
    sizes = s3fs_client().du(f"{dirpath}/states", total=False)
    assert summary["checkpoints"]["disk_bytes"] == sum(sizes.values()) > 0


def run(args: list[str], capsys) -> tuple[int, str, str]:
    """``python -m detector ARGS`` in-process: exit status, stdout, stderr."""
    from detector.__main__ import main

    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_fit_resume_export_score_evaluate_round_trip_on_s3(s3, tmp_path, demo_files, capsys):
    dirpath, models = f"{s3}/run/checkpoints", f"{s3}/run/models"
    fit(tmp_path / "first", demo_files, dirpath, "--trainer.max_epochs", "1")
    fit(tmp_path / "second", demo_files, dirpath, "--ckpt_path", "last")
    latest = f"{dirpath}/checkpoint_latest.safetensors"
    assert load_checkpoint_state(latest)["global_step"] == 12
    capsys.readouterr()

    code, out, _ = run(["checkpoints", "list", dirpath], capsys)
    assert code == 0 and out.splitlines()[0].split()[:4] == ["file", "epoch", "step", "size"]
    assert {line.split()[0] for line in out.splitlines()[1:]} == set(objects.read_manifest(dirpath))
    code, out, _ = run(["checkpoints", "verify", latest], capsys)
    assert (code, out) == (0, f"OK     {latest}\n")
    code, out, _ = run(["checkpoints", "show", latest], capsys)
    assert code == 0 and out.startswith(f"{latest}: format v1")

    code, out, err = run(["export", latest, "--out", models, "--val-data", str(demo_files["val"])], capsys)
    assert code == 0, err
    bundle = out.strip()
    assert bundle == f"{models}/model_v1.0_epoch1"
    fs = s3fs_client()
    files = {p.removeprefix(bundle.removeprefix("s3://") + "/") for p in fs.find(bundle)}
    assert {"SHA256SUMS", "model.safetensors", "config.json", "training_metadata.json"} <= files
    assert json.loads(fs.cat_file(f"{bundle}/training_metadata.json"))["checkpoint"] == latest

    code, out, err = run(["score", bundle, str(demo_files["test"])], capsys)
    assert code == 0, err
    scored = [json.loads(line) for line in out.splitlines()]
    assert len(scored) == 32 and all(0 <= row["prob_machine"] <= 1 for row in scored)
    # The same bundle on disk scores the same texts identically.
    local = tmp_path / "bundle"
    fs.get(bundle + "/", str(local) + "/", recursive=True)
    code, out, _ = run(["score", str(local), str(demo_files["test"])], capsys)
    assert [json.loads(line) for line in out.splitlines()] == scored

    report = tmp_path / "report"
    for model in (["--bundle", bundle], ["--checkpoint", latest]):
        code, _, err = run(
            ["evaluate", "--data", str(demo_files["test"]), "--out", str(report), *model], capsys
        )
        assert code == 0, err

    # The export is refused once the bundle is there; nothing changes.
    code, _, err = run(["export", latest, "--out", models], capsys)
    assert (
        code == 2
        and err.startswith(f"detector export: error: bundle {bundle} exists")
        and err.count("\n") == 1
    )


@pytest.mark.slow
def test_a_writer_killed_mid_upload_leaves_latest_loadable_and_a_resume_goes_on(s3, tmp_path, demo_files):
    dirpath = f"{s3}/run/checkpoints"
    # Killed while the step-4 state is being fed to its upload (the step-2 one is named `latest`).
    kill = {
        "where": "detector.checkpoint.objects._send",
        "nth": 3,  # the name also matches `exp_avg_sq`: two calls a save; the 3rd is step 4's `exp_avg`
        "match": "optimizer_states.0.state.0.exp_avg",
    }
    killer = json.dumps({"class_path": "tests.kill_helpers.KillAt", "init_args": kill})
    child = tmp_path / "killed"
    child.mkdir()
    every = ("--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "2")
    args = [
        sys.executable,
        "-m",
        "detector",
        *fit_args(child, demo_files, dirpath, *every, "--trainer.callbacks+", killer),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=child, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == -signal.SIGKILL, (done.stdout + done.stderr)[-3000:]
    manifest = objects.read_manifest(dirpath)
    assert sorted(manifest) == ["checkpoint_latest.safetensors", "checkpoint_step_2.safetensors"]
    stored = {p.rsplit("/", 1)[-1] for p in s3fs_client().find(f"{dirpath}/states")}
    assert stored == {manifest["checkpoint_latest.safetensors"].removeprefix("states/")}  # nothing torn
    assert load_checkpoint_state(f"{dirpath}/checkpoint_latest.safetensors")["global_step"] == 2
    resumed = fit(tmp_path / "resumed", demo_files, dirpath, *every, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert "checkpoint_step_6.safetensors" in objects.read_manifest(dirpath)


@pytest.mark.slow
def test_async_save_to_s3_names_each_state_after_its_upload(s3, tmp_path, demo_files):
    dirpath = f"{s3}/run/checkpoints"
    every = (
        "--trainer.max_epochs",
        "1",
        "--checkpoint.every_n_train_steps",
        "2",
        "--checkpoint.keep_last_steps",
        "2",
    )
    cli = fit(tmp_path / "run", demo_files, dirpath, *every, "--checkpoint.async_save", "true")
    manifest = objects.read_manifest(dirpath)
    (top,) = [r.name for r in cli.trainer.checkpoint_callback.tracker.top_k.kept]
    assert sorted(manifest) == sorted(
        [
            "checkpoint_best_val_f1.safetensors", "checkpoint_epoch_0.safetensors",
            "checkpoint_latest.safetensors", "checkpoint_step_4.safetensors",
            "checkpoint_step_6.safetensors", top,
        ]
    )  # fmt: skip
    stored = {p.rsplit("/", 1)[-1] for p in s3fs_client().find(f"{dirpath}/states")}
    assert stored == {key.removeprefix("states/") for key in manifest.values()}
    assert len(stored) == 2  # step 4's state, and step 6's under its other five names
    assert load_checkpoint_state(f"{dirpath}/checkpoint_latest.safetensors")["global_step"] == 6


@pytest.mark.slow
def test_export_callback_on_s3_uploads_bundles_and_keeps_the_extended_runs_final(
    s3, tmp_path, demo_files, capsys
):
    models = f"{s3}/run/models"
    export = {"dirpath": models, "every_n_epochs": 1, "keep_last": 1}
    exporter = json.dumps(
        {"class_path": "callbacks.inference_export.InferenceExportCallback", "init_args": export}
    )
    checkpoints = str(tmp_path / "checkpoints")
    fs = s3fs_client()

    def stored() -> dict[str, set[str]]:
        prefix = models.removeprefix("s3://") + "/"
        files: dict[str, set[str]] = {}
        for key in fs.find(models):
            name, _, rest = key.removeprefix(prefix).partition("/")
            files.setdefault(name, set()).add(rest)
        return files

    fit(
        tmp_path / "first",
        demo_files,
        checkpoints,
        "--trainer.max_epochs",
        "1",
        "--trainer.callbacks+",
        exporter,
    )
    first = stored()
    assert set(first) == {"model_v1.0_epoch0", "model_v1.0_final"}
    assert {"SHA256SUMS", "model.safetensors", "config.json", "training_metadata.json"} <= first[
        "model_v1.0_final"
    ]
    final_sums = fs.cat_file(f"{models}/model_v1.0_final/SHA256SUMS")
    capsys.readouterr()
    code, out, err = run(["score", f"{models}/model_v1.0_final", str(demo_files["test"])], capsys)
    assert code == 0, err
    scored = [json.loads(line) for line in out.splitlines()]
    assert len(scored) == 32 and all(0 <= row["prob_machine"] <= 1 for row in scored)

    # Extended to a second epoch: epoch 0's bundle rotates out, the first final is kept under its step.
    fit(tmp_path / "second", demo_files, checkpoints, "--ckpt_path", "last", "--trainer.callbacks+", exporter)
    second = stored()
    assert set(second) == {"model_v1.0_epoch1", "model_v1.0_final", "model_v1.0_final_step6"}
    assert second["model_v1.0_final_step6"] == first["model_v1.0_final"]
    assert fs.cat_file(f"{models}/model_v1.0_final_step6/SHA256SUMS") == final_sums
    steps = {
        name: json.loads(fs.cat_file(f"{models}/{name}/training_metadata.json"))["step"]
        for name in ("model_v1.0_final", "model_v1.0_final_step6")
    }
    assert steps == {"model_v1.0_final": 12, "model_v1.0_final_step6": 6}
    summary = json.loads((tmp_path / "second/outputs/summary.json").read_text())
    assert summary["bundles"] == [f"{models}/model_v1.0_epoch1", f"{models}/model_v1.0_final"]
    capsys.readouterr()
    code, out, err = run(["score", f"{models}/model_v1.0_final_step6", str(demo_files["test"])], capsys)
    assert code == 0, err
    assert [json.loads(line) for line in out.splitlines()] == scored  # the retired copy is verified, the same
