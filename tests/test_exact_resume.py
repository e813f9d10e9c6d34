"""A run interrupted at any optimizer step and resumed from that step's checkpoint equals the straight run."""

import csv
import shutil
from pathlib import Path

import pytest
import torch
from multi_device_helpers import tensors

from detector.checkpoint.format import load_state
from detector.module import TRAIN_LOSS_CARRY
from tests.state_helpers import build_cli_in, final_training_state

TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'
EMA = '[{"class_path": "callbacks.ema.EMACallback", "init_args": {"decay": 0.9, "warmup": true}}]'


def fit(cwd: Path, demo_files: dict[str, Path], *extra: str):
    args = [
        "fit", "--trainer.max_epochs", "2", "--trainer.deterministic", "true",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", EMA, "--model.arch", TINY,
        "--data.batch_size", "8", "--data.train_path", str(demo_files["train"]),
        "--data.val_path", str(demo_files["val"]), "--data.tokenizer_root", str(cwd.parent / "tokenizer"),
        "--data.tokenizer_vocab_size", "200", "--checkpoint.every_n_train_steps", "1",
        "--checkpoint.keep_last_steps", "-1", *extra,
    ]  # fmt: skip
    return build_cli_in(cwd, args)


def logged_losses(cwd: Path) -> dict[int, str]:
    with open(cwd / "outputs/logs/version_0/metrics.csv") as handle:
        return {
            int(row["step"]): row["train_loss_step"]
            for row in csv.DictReader(handle)
            if row["train_loss_step"]
        }


@pytest.fixture(scope="module")
def straight(tmp_path_factory, request):
    demo_files = request.getfixturevalue("module_demo_files")
    cwd = tmp_path_factory.mktemp("straight") / "run"
    cli = fit(cwd, demo_files)
    return cwd, final_training_state(cli), logged_losses(cwd)


@pytest.fixture(scope="module")
def module_demo_files(tmp_path_factory):
    from detector.demo import demo_rows
    from tests.conftest import write_jsonl

    folder = tmp_path_factory.mktemp("data")
    return {split: write_jsonl(folder / f"{split}.jsonl", demo_rows(n, seed=i))
            for i, (split, n) in enumerate([("train", 96), ("val", 32)])}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("step", [7, 12], ids=["mid_epoch", "epoch_end"])
def test_resume_from_any_step_equals_the_straight_run(tmp_path, straight, module_demo_files, step):
    straight_cwd, expected, expected_losses = straight
    assert len(expected_losses) == 24  # 12 batches an epoch, 2 epochs
    saved = tmp_path / f"checkpoint_step_{step}.safetensors"
    shutil.copy(straight_cwd / f"outputs/checkpoints/checkpoint_step_{step}.safetensors", saved)
    cli = fit(tmp_path / "resumed", module_demo_files, "--ckpt_path", str(saved))
    assert cli.trainer.global_step == 24
    got = final_training_state(cli)
    for part in ("weights", "optimizer", "ema"):
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), f"{part}: {key}"
    losses = logged_losses(tmp_path / "resumed")
    assert sorted(losses) == list(range(step, 24))
    assert {s: expected_losses[s] for s in losses} == losses


@pytest.mark.slow
def test_max_steps_stop_mid_epoch_saves_the_mid_epoch_state_and_resume_continues_it(
    tmp_path, module_demo_files
):
    # The step-7 file of a run saving every step is the known-exact mid-epoch state (tests above).
    stop = ("--trainer.max_steps", "7")
    fit(tmp_path / "latest_only", module_demo_files, *stop, "--checkpoint.every_n_train_steps", "0")
    fit(tmp_path / "every_step", module_demo_files, *stop)
    latest = tmp_path / "latest_only/outputs/checkpoints/checkpoint_latest.safetensors"
    saved = load_state(latest)
    reference = load_state(tmp_path / "every_step/outputs/checkpoints/checkpoint_step_7.safetensors")
    assert saved["loops"] == reference["loops"] and saved["global_step"] == 7
    for part in ("state_dict", "optimizer_states", "lr_schedulers", "rng_states"):
        got, want = tensors(saved[part]), tensors(reference[part])
        assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items()), part
    cli = fit(tmp_path / "resumed", module_demo_files, "--ckpt_path", str(latest))
    assert cli.trainer.global_step == 24  # the rest of epoch 0 included: 12 batches an epoch, 2 epochs
    assert sorted(logged_losses(tmp_path / "resumed")) == list(range(7, 24))


def epoch_losses(cwd: Path) -> dict[int, str]:
    with open(cwd / "outputs/logs/version_0/metrics.csv") as handle:
        return {
            int(row["epoch"]): row["train_loss_epoch"]
            for row in csv.DictReader(handle)
            if row["train_loss_epoch"]
        }


@pytest.mark.slow
def test_train_loss_epoch_of_an_epoch_resumed_mid_way_equals_the_straight_run(
    tmp_path, straight, module_demo_files
):
    straight_cwd = straight[0]
    saved = tmp_path / "checkpoint_step_7.safetensors"
    shutil.copy(straight_cwd / "outputs/checkpoints/checkpoint_step_7.safetensors", saved)
    assert load_state(saved)[TRAIN_LOSS_CARRY]["batches"] == 7
    fit(tmp_path / "resumed", module_demo_files, "--ckpt_path", str(saved))
    expected = epoch_losses(straight_cwd)
    assert sorted(expected) == [0, 1]
    assert epoch_losses(tmp_path / "resumed") == expected  # the mean over all 12 batches, not the last 5
