"""Re-running, extending, resuming `last` and interrupting a run, walked through `python -m detector fit`."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.__main__ import main
from detector.bundle.export import bundle_origin, remove_bundle
from detector.checkpoint.reader import load_checkpoint_state, read_checkpoint_header

REPO = Path(__file__).resolve().parents[1]
TINY_CFG = str(REPO / "configs/tiny.yaml")
DEFAULT_CFG = str(REPO / "configs/default.yaml")
INFERENCE = Path("outputs/models/inference")
LATEST = Path("outputs/checkpoints/checkpoint_latest.safetensors")


def fit_args(files: dict[str, Path], *extra: str, export: bool = True) -> list[str]:
    """`fit` of the tiny model on 96 rows (6 steps an epoch); ``export``: default.yaml's EMA and bundles."""
    configs = ["--config", DEFAULT_CFG] if export else []
    return [
        "fit", *configs, "--config", TINY_CFG, "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1", "--data.batch_size", "16",
        "--data.train_path", str(files["train"]), "--data.val_path", str(files["val"]), *extra,
    ]  # fmt: skip


def step_of(path: Path) -> int:
    return int(read_checkpoint_header(path)["state"]["global_step"])


def bundles(root: Path = INFERENCE) -> dict[str, tuple[str | None, int | None]]:
    return {p.name: bundle_origin(p) for p in sorted(root.iterdir()) if not p.name.startswith(".")}


def logged_steps(version: int) -> list[int]:
    with open(f"outputs/logs/version_{version}/metrics.csv") as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train_loss_step")})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_that_ended_at_max_steps_extends_with_ckpt_path_last(tmp_path, monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    main(fit_args(demo_files, "--trainer.max_steps", "4"))
    first_final = digest(INFERENCE / "model_v1.0_final/model.safetensors")
    run_id, _ = bundles()["model_v1.0_final"]
    main(fit_args(demo_files, "--trainer.max_steps", "9", "--ckpt_path", "last"))
    assert step_of(LATEST) == 9
    # The first run's final bundle is kept under a name that says its step; the extension's takes the name.
    assert bundles() == {
        "model_v1.0_epoch0": (run_id, 6),
        "model_v1.0_final": (run_id, 9),
        "model_v1.0_final_step4": (run_id, 4),
    }
    assert digest(INFERENCE / "model_v1.0_final_step4/model.safetensors") == first_final
    assert logged_steps(0) == [0, 1, 2, 3] and logged_steps(1) == [4, 5, 6, 7, 8]
    assert json.loads(Path("outputs/summary.json").read_text())["global_step"] == 9


def test_a_run_that_ended_at_max_epochs_extends_with_the_checkpoint_path(tmp_path, monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    main(fit_args(demo_files, "--trainer.max_epochs", "1"))
    run_id, _ = bundles()["model_v1.0_final"]
    main(fit_args(demo_files, "--trainer.max_epochs", "2", "--ckpt_path", str(LATEST)))
    assert step_of(LATEST) == 12
    found = bundles()
    assert found["model_v1.0_final"] == (run_id, 12) and found["model_v1.0_final_step6"] == (run_id, 6)
    assert found["model_v1.0_epoch0"] == (run_id, 6)
    # Running the extension again: its loop is done, its final bundle is the one it would write.
    main(fit_args(demo_files, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    assert bundles() == found


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("export", [True, False], ids=["default_config", "no_export_callback"])
def test_the_same_command_twice_in_one_folder_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, capsys, demo_files, export
):
    monkeypatch.chdir(tmp_path)
    args = fit_args(demo_files, "--trainer.max_steps", "7", export=export)
    main(args)
    before = _files(Path("outputs"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: outputs/checkpoints already holds checkpoints of another run (checkpoint_best_val_f1"
        ".safetensors, checkpoint_epoch_0.safetensors, checkpoint_latest.safetensors, ...); nothing was "
        "written. To go on: resume that run with `--ckpt_path last`, or run this one "
        "in another output folder (`--trainer.default_root_dir OTHER`)."
    )
    assert _files(Path("outputs")) == before  # nothing overwritten, no new log version


def test_bundles_of_another_run_refuse_a_fresh_run_in_one_line(tmp_path, monkeypatch, capsys, demo_files):
    monkeypatch.chdir(tmp_path)
    main(fit_args(demo_files, "--trainer.max_steps", "2"))
    os.rename("outputs/checkpoints", "moved")  # the checkpoints went elsewhere, the bundle stayed
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(fit_args(demo_files, "--trainer.max_steps", "2"))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: outputs/models/inference already holds bundles of version 1.0 of another")
    assert "run (model_v1.0_final); nothing was written." in line
    assert not Path("outputs/checkpoints").exists() or not any(Path("outputs/checkpoints").iterdir())


def test_ckpt_path_last_without_a_checkpoint_is_a_clear_error(tmp_path, monkeypatch, capsys, demo_files):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(fit_args(demo_files, "--ckpt_path", "last"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --ckpt_path last: no checkpoint_latest.safetensors in outputs/checkpoints, so there is no "
        "run to resume; start a new run without --ckpt_path, or give the path of a checkpoint."
    )
    assert not Path("outputs/logs").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_run_exits_128_plus_signal_with_a_summary_saying_why(
    tmp_path, monkeypatch, demo_files, signum
):
    monkeypatch.chdir(tmp_path)
    stop_at = json.dumps(
        {"class_path": "tests.kill_helpers.SignalAt", "init_args": {"step": 3, "signum": signum}}
    )
    with pytest.raises(SystemExit) as stop:
        main(fit_args(demo_files, "--trainer.callbacks+", stop_at, export=False))
    assert stop.value.code == 128 + signum
    summary = json.loads(Path("outputs/summary.json").read_text())
    assert summary["stopped"] == signal.Signals(signum).name and summary["global_step"] == 3
    assert step_of(LATEST) == 3
    main(fit_args(demo_files, "--ckpt_path", "last", export=False))  # and it resumes to the end
    assert json.loads(Path("outputs/summary.json").read_text())["stopped"] == "finished"
    assert step_of(LATEST) == 12


def test_removing_a_bundle_that_is_already_gone_is_done(tmp_path):
    remove_bundle(tmp_path / "model_v1.0_epoch0")
    assert list(tmp_path.iterdir()) == []


# --- kills: a child process SIGKILLed in a chosen window, then resumed with --ckpt_path last -------------


def _export(**init_args: object) -> str:
    callback = {"class_path": "callbacks.inference_export.InferenceExportCallback", "init_args": init_args}
    return json.dumps(callback)


def _kill(**init_args: object) -> str:
    return json.dumps({"class_path": "tests.kill_helpers.KillAt", "init_args": init_args})


def fit_child(cwd: Path, files: dict[str, Path], *extra: str) -> int:
    """Run `python -m detector fit` (tiny, no EMA) in ``cwd``; its exit status (-9: killed)."""
    args = [sys.executable, "-m", "detector", *fit_args(files, export=False),
            "--trainer.deterministic", "true", "--checkpoint.every_n_train_steps", "2", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"fit failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return done.returncode


def history_steps(cwd: Path) -> list[int]:
    tracker = load_checkpoint_state(cwd / LATEST)["callbacks"]
    state = next(v for k, v in tracker.items() if k.startswith("SafetensorsTopKCheckpoint"))
    return [int(row["step"]) for row in state["tracker"]["history"]]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill",
    [
        {"where": "callbacks.inference_export.write_bundle", "when": "after"},  # bundle in, checkpoint not
        {"where": "callbacks.inference_export.remove_bundle", "when": "after"},  # rotation done, not recorded
    ],
    ids=["after_bundle_before_checkpoint", "after_rotation"],
)
def test_a_kill_between_a_bundle_and_its_checkpoint_resumes_with_ckpt_path_last(tmp_path, demo_files, kill):
    callbacks = [
        "--trainer.callbacks+",
        _export(every_n_epochs=1, keep_last=1),
        "--trainer.callbacks+",
        _kill(**kill),
    ]
    assert fit_child(tmp_path, demo_files, *callbacks) == -signal.SIGKILL
    assert fit_child(tmp_path, demo_files, "--trainer.callbacks+", _export(every_n_epochs=1, keep_last=1),
                     "--ckpt_path", "last") == 0  # fmt: skip
    found = bundles(tmp_path / INFERENCE)
    run_ids = {run_id for run_id, _ in found.values()}
    assert {name: step for name, (_, step) in found.items()} == {
        "model_v1.0_epoch1": 12,
        "model_v1.0_final": 12,
    }
    assert len(run_ids) == 1 and None not in run_ids
    assert history_steps(tmp_path) == [6, 12]


@pytest.mark.slow
def test_a_kill_during_a_mid_epoch_validation_after_a_same_step_save_reruns_that_validation(
    tmp_path, demo_files
):
    # Validation every 3 batches (steps 3, 6, 9, 12) and a step file every 3 steps: killed inside step 9's.
    every = ("--trainer.val_check_interval", "3", "--checkpoint.every_n_train_steps", "3")
    at = {"step": 9, "signum": int(signal.SIGKILL), "in_validation": True}
    kill = json.dumps({"class_path": "tests.kill_helpers.SignalAt", "init_args": at})
    assert fit_child(tmp_path, demo_files, *every, "--trainer.callbacks+", kill) == -signal.SIGKILL
    assert step_of(tmp_path / LATEST) < 9  # the step-9 file waits for step 9's validation
    assert fit_child(tmp_path, demo_files, *every, "--ckpt_path", "last") == 0
    assert history_steps(tmp_path) == [3, 6, 9, 12]


# The soak: one run killed (SIGKILL) in every window around bundles and `best`, resumed with
# `--ckpt_path last` each time, ends where the uninterrupted run ends (5 processes; the windows right
# after a bundle and after a rotation have their own test above). Validation every 3 steps (6 in all),
# val_loss ranks checkpoints and bundles (it falls from the start: `best` moves), a bundle each epoch
# with keep_last=1 (rotations at steps 9 and 15), a step file every step (always a checkpoint to resume).
SOAK_ARGS = (
    "--trainer.max_epochs", "3", "--trainer.val_check_interval", "3",
    "--checkpoint.every_n_train_steps", "1", "--checkpoint.monitor", "val_loss", "--checkpoint.mode", "min",
    "--trainer.callbacks+", _export(every_n_epochs=1, keep_last=1, monitor="val_loss", mode="min"),
)  # fmt: skip
SOAK_KILLS = [
    {"where": "detector.atomic.fsync_tree", "match": ".model_v"},  # in the first bundle write, pre-rename
    # the second time `best` moves (the metric still improving), after its link, before `latest`'s
    {"where": "callbacks.safetensors_checkpoint.atomic_link", "match": "best", "nth": 2, "when": "after"},
    {"where": "shutil.rmtree", "match": ".model_v"},  # inside a rotation: renamed away, not yet deleted
]


def _check_whole(cwd: Path) -> None:
    load_checkpoint_state(cwd / LATEST)  # verifies the checksum
    for folder in (cwd / INFERENCE).iterdir():
        assert folder.name.startswith(".") or {"model.safetensors", "training_metadata.json"} <= {
            p.name for p in folder.iterdir()
        }, folder


@pytest.mark.slow
def test_kill_soak_in_bundle_writes_rotations_and_best_relinking_ends_as_the_straight_run(
    tmp_path, demo_files
):
    straight, soaked = tmp_path / "straight", tmp_path / "soaked"
    straight.mkdir(), soaked.mkdir()
    assert fit_child(straight, demo_files, *SOAK_ARGS) == 0
    for i, kill in enumerate(SOAK_KILLS):
        resume = ("--ckpt_path", "last") if i else ()
        assert (
            fit_child(soaked, demo_files, *SOAK_ARGS, *resume, "--trainer.callbacks+", _kill(**kill)) == -9
        ), kill
        _check_whole(soaked)
    assert fit_child(soaked, demo_files, *SOAK_ARGS, "--ckpt_path", "last") == 0
    _check_whole(soaked)
    assert history_steps(soaked) == history_steps(straight) == [3, 6, 9, 12, 15, 18]
    found = bundles(soaked / INFERENCE)
    assert {name: step for name, (_, step) in found.items()} == {
        "model_v1.0_epoch2": 15,
        "model_v1.0_final": 18,
    }
    assert len({run_id for run_id, _ in found.values()}) == 1
    names = sorted(p.name for p in (soaked / "outputs/checkpoints").iterdir())
    assert names == sorted(p.name for p in (straight / "outputs/checkpoints").iterdir())
    for name in names:  # every checkpoint, `best` included, holds the straight run's weights
        want = load_checkpoint_state(straight / "outputs/checkpoints" / name)["state_dict"]
        have = load_checkpoint_state(soaked / "outputs/checkpoints" / name)["state_dict"]
        assert all(torch.equal(have[k], want[k]) for k in want), name
    best = load_checkpoint_state(soaked / "outputs/checkpoints/checkpoint_best_val_loss.safetensors")
    assert best["global_step"] > 3  # `best` moved while the run went on


def test_the_checkpoint_callback_answers_last_with_checkpoint_latest(tmp_path):
    from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint

    callback = SafetensorsTopKCheckpoint(dirpath=str(tmp_path))
    assert callback.last_model_path == ""
    (tmp_path / "checkpoint_latest.safetensors").mkdir()  # a sharded run's folder counts too
    assert callback.last_model_path == str(tmp_path / "checkpoint_latest.safetensors")
