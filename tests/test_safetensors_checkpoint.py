"""Tests for SafetensorsTopKCheckpoint with a tiny Trainer and a scripted ``val_f1`` sequence."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import callbacks.safetensors_checkpoint as checkpoint_module
from callbacks.ema import EMACallback
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.atomic import temp_path_for
from detector.checkpoint import staging as staging_module
from detector.checkpoint.background import BackgroundWriteError
from detector.checkpoint.format import load_state
from detector.checkpoint.plugin import SafetensorsCheckpointIO
from tests.state_helpers import assert_identical

NAN = math.nan
REPO = Path(__file__).resolve().parents[1]


def _data(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)  # never draws from the global RNG
    return TensorDataset(torch.randn(n, 4, generator=generator), torch.randn(n, 1, generator=generator))


class ScriptedModule(pl.LightningModule):
    """A dropout MLP logging ``train_loss``, ``val_loss`` and ``val_f1 = scores[current_epoch]``."""

    def __init__(self, scores: list[float] | None = None, batches: int = 4) -> None:
        super().__init__()
        self.scores, self.batches = scores, batches
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self.net(batch[0]), batch[1]))

    def on_validation_epoch_end(self) -> None:
        if self.scores is not None:
            self.log("val_f1", self.scores[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_data(4 * self.batches, seed=0), batch_size=4, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_data(8, seed=1), batch_size=8)


def make_trainer(callback: SafetensorsTopKCheckpoint, **kwargs: Any) -> pl.Trainer:
    options = {"max_epochs": 4, "num_sanity_val_steps": 0, "devices": 1, **kwargs}
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        plugins=[SafetensorsCheckpointIO()],
        callbacks=[callback],
        **options,
    )


def fit(folder: Path, scores: list[float], ckpt_path: Path | None = None, **kwargs: Any) -> ScriptedModule:
    """Seeded fit of a :class:`ScriptedModule`; ``kwargs`` split between the callback and the Trainer."""
    trainer_keys = {"max_epochs", "val_check_interval", "accumulate_grad_batches", "max_steps"}
    trainer_args = {k: kwargs.pop(k) for k in list(kwargs) if k in trainer_keys}
    pl.seed_everything(0, verbose=False)
    module = ScriptedModule(scores)
    callback = SafetensorsTopKCheckpoint(dirpath=str(folder), **kwargs)
    make_trainer(callback, **trainer_args).fit(module, ckpt_path=ckpt_path)
    return module


def inodes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_ino for path in sorted(folder.iterdir())}


LATEST, BEST = "checkpoint_latest.safetensors", "checkpoint_best_val_f1.safetensors"
TOP_1_8 = "checkpoint_top_epoch_1_step_8_val_f1_0.7000.safetensors"
TOP_2_12 = "checkpoint_top_epoch_2_step_12_val_f1_0.6000.safetensors"
SCORES = [0.5, 0.7, 0.6, NAN]
LIMITS = {"save_top_k": 2, "every_n_epochs": 2, "every_n_train_steps": 3, "keep_last_steps": 2}
# 4 batches a epoch: steps 3, 6, 9, 12, 15 get step files; epochs 1 and 3 epoch files; val at 4, 8, 12, 16.
EXPECTED = {
    LATEST,
    BEST,
    TOP_1_8,
    TOP_2_12,
    "checkpoint_epoch_3.safetensors",
    "checkpoint_step_12.safetensors",
    "checkpoint_step_15.safetensors",
}


def test_exact_files_after_scripted_val_f1_sequence(tmp_path: Path) -> None:
    fit(tmp_path, SCORES, **LIMITS)
    assert set(inodes(tmp_path)) == EXPECTED


def test_each_state_is_written_once_and_linked_under_its_other_names(tmp_path: Path) -> None:
    fit(tmp_path, SCORES, **LIMITS)
    ino = inodes(tmp_path)
    assert ino[LATEST] == ino["checkpoint_epoch_3.safetensors"]
    assert ino[BEST] == ino[TOP_1_8]
    assert ino["checkpoint_step_12.safetensors"] == ino[TOP_2_12]
    assert len(set(ino.values())) == 4


def test_latest_holds_final_step_tracker_state_history_and_rng_states(tmp_path: Path) -> None:
    fit(tmp_path, SCORES, **LIMITS)
    state = load_state(tmp_path / LATEST)
    assert state["global_step"] == 16
    tracker = state["callbacks"]["SafetensorsTopKCheckpoint{'monitor': 'val_f1', 'mode': 'max'}"]["tracker"]
    assert [name for _, name in tracker["top_k"]] == [TOP_1_8, TOP_2_12]
    assert tracker["best"] == {"score": pytest.approx(0.7), "epoch": 1, "step": 8}
    assert tracker["epochs"] == ["checkpoint_epoch_3.safetensors"]
    assert [(h["epoch"], h["step"]) for h in tracker["history"]] == [(0, 4), (1, 8), (2, 12), (3, 16)]
    assert math.isnan(tracker["history"][3]["metrics"]["val_f1"])
    assert set(tracker["history"][0]["metrics"]) == {"train_loss", "val_loss", "val_f1"}
    assert len(state["rng_states"]) == 1
    assert set(state["rng_states"][0]) == {"python", "numpy", "torch", "cuda"}


def test_min_mode_and_nan_first(tmp_path: Path) -> None:
    fit(tmp_path, [NAN, 0.4, 0.2, 0.3], monitor="val_f1", mode="min", save_top_k=2, every_n_epochs=0)
    lowest = "checkpoint_top_epoch_2_step_12_val_f1_0.2000.safetensors"
    ino = inodes(tmp_path)
    assert set(ino) == {LATEST, BEST, lowest, "checkpoint_top_epoch_3_step_16_val_f1_0.3000.safetensors"}
    assert ino[BEST] == ino[lowest]


def test_resumed_run_ends_with_the_uninterrupted_files_tracker_and_weights(tmp_path: Path) -> None:
    straight = fit(tmp_path / "straight", SCORES, **LIMITS)
    fit(tmp_path / "resumed", SCORES, max_epochs=2, **LIMITS)
    resumed = fit(tmp_path / "resumed", SCORES, ckpt_path=tmp_path / "resumed" / LATEST, **LIMITS)
    assert set(inodes(tmp_path / "resumed")) == EXPECTED
    key = "SafetensorsTopKCheckpoint{'monitor': 'val_f1', 'mode': 'max'}"
    states = [load_state(tmp_path / run / LATEST) for run in ("straight", "resumed")]
    trackers = [state["callbacks"][key]["tracker"] for state in states]
    for tracker in trackers:  # NaN != NaN
        tracker["history"][3]["metrics"]["val_f1"] = "nan"
    assert trackers[0] == trackers[1]
    # Dropout and the shuffled order continue exactly because the RNG states were restored.
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_validation_after_a_step_file_at_the_same_step_rewrites_once_and_relinks(tmp_path: Path) -> None:
    limits = {"save_top_k": 1, "every_n_train_steps": 2, "keep_last_steps": 2, "every_n_epochs": 0}
    fit(tmp_path, [0.1], max_epochs=1, val_check_interval=2, **limits)
    ino = inodes(tmp_path)
    # step 2: step file, then validation at step 2; step 4: step file, then validation (a tie, not kept).
    top = "checkpoint_top_epoch_0_step_2_val_f1_0.1000.safetensors"
    step_2, step_4 = "checkpoint_step_2.safetensors", "checkpoint_step_4.safetensors"
    assert set(ino) == {LATEST, BEST, top, step_2, step_4}
    assert ino[step_2] == ino[BEST] == ino[top]
    assert ino[step_4] == ino[LATEST]
    assert len(set(ino.values())) == 2


def test_stale_temp_files_are_removed_at_setup_and_others_kept(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    stale = temp_path_for(tmp_path / LATEST)
    stale.write_bytes(b"torn")
    mine = tmp_path / "notes.txt"
    mine.write_text("keep")
    fit(tmp_path, [0.1], max_epochs=1, every_n_epochs=0)
    assert not stale.exists()
    assert mine.read_text() == "keep"


def test_missing_metric_lists_what_was_logged(tmp_path: Path) -> None:
    expected = (
        "`val_f1` was not logged; logged: ['train_loss', 'val_loss']. Did you call self.log('val_f1', ...)?"
    )
    with pytest.raises(ValueError) as error:
        fit(tmp_path, None, max_epochs=1)  # type: ignore[arg-type]
    assert str(error.value) == expected


def test_trainer_without_the_safetensors_plugin_is_refused(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, max_epochs=1, callbacks=[SafetensorsTopKCheckpoint(str(tmp_path))]
    )
    with pytest.raises(ValueError, match=r"SafetensorsCheckpointIO\(\)\] \(it has TorchCheckpointIO\)"):
        trainer.fit(ScriptedModule([0.1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "monitor must name a logged metric"),
        ({"mode": "best"}, "mode must be one of"),
        ({"save_top_k": -3}, "save_top_k must be an int >= 0 or -1"),
        ({"every_n_epochs": -1}, "every_n_epochs must be an int >= 0"),
        ({"every_n_train_steps": 2.5}, "every_n_train_steps must be an int >= 0"),
        ({"keep_last_steps": 0}, "keep_last_steps must be an int >= 1 or -1"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SafetensorsTopKCheckpoint(**kwargs)


def test_async_save_writes_the_same_files_and_links(tmp_path: Path) -> None:
    fit(tmp_path / "sync", SCORES, **LIMITS)
    fit(tmp_path / "async", SCORES, async_save=True, **LIMITS)

    def groups(folder: Path) -> set[frozenset[str]]:
        by_inode: dict[int, set[str]] = {}
        for name, ino in inodes(folder).items():
            by_inode.setdefault(ino, set()).add(name)
        return {frozenset(names) for names in by_inode.values()}

    assert groups(tmp_path / "async") == groups(tmp_path / "sync")
    state = load_state(tmp_path / "async" / LATEST)
    assert state["global_step"] == 16
    # The snapshots share reused staging buffers, yet every file holds exactly the state the sync run wrote.
    for name in inodes(tmp_path / "sync"):
        assert_identical(load_state(tmp_path / "async" / name), load_state(tmp_path / "sync" / name))


def test_failed_background_write_surfaces_and_latest_stays_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_save = checkpoint_module.save_state

    def flaky_save(state: Any, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_state", flaky_save)
    with pytest.raises(BackgroundWriteError, match="background checkpoint write failed") as error:
        fit(tmp_path, SCORES, async_save=True, **LIMITS)
    assert isinstance(error.value.__cause__, OSError)
    assert len(calls) == 2  # the failure stopped the run at the next save
    assert load_state(tmp_path / LATEST)["global_step"] == 3


CHILD = """
import sys, time
import lightning.pytorch as pl
sys.path.insert(0, sys.argv[3])
from tests.test_safetensors_checkpoint import ScriptedModule, make_trainer
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint

class Slow(ScriptedModule):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        with open(sys.argv[2], "a") as f:
            f.write(f"{self.trainer.global_step}\\n")
        time.sleep(0.05)

pl.seed_everything(0)
callback = SafetensorsTopKCheckpoint(sys.argv[1], every_n_epochs=0)
trainer = make_trainer(callback, max_epochs=1000, limit_val_batches=0)
trainer.fit(Slow(batches=50))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_training_leaves_latest_at_the_step_reached(tmp_path: Path, signum: int) -> None:
    progress = tmp_path / "progress.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(tmp_path / "ckpt"), str(progress), str(REPO)]
    child = subprocess.Popen(args, env=env)
    deadline = time.monotonic() + 120
    while not (progress.exists() and len(progress.read_text().split()) >= 5):
        assert time.monotonic() < deadline and child.poll() is None, "child did not start training"
        time.sleep(0.05)
    child.send_signal(signum)
    child.wait(timeout=60)
    reached = int(progress.read_text().split()[-1])
    state = load_state(tmp_path / "ckpt" / LATEST)
    assert state["global_step"] == reached
    assert reached >= 5
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [LATEST]


DDP_CHILD = """
import hashlib, json, sys
import lightning.pytorch as pl
from tests.test_safetensors_checkpoint import LIMITS, SCORES, ScriptedModule, make_trainer
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint

folder, max_epochs, ckpt, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4]
pl.seed_everything(0)
callback = SafetensorsTopKCheckpoint(folder, async_save=True, **LIMITS)
trainer = make_trainer(callback, max_epochs=max_epochs, strategy="ddp", devices=2)
module = ScriptedModule(SCORES, batches=8)
trainer.fit(module, ckpt_path=ckpt)
weights = b"".join(t.numpy().tobytes() for t in module.state_dict().values())
if trainer.is_global_zero:
    with open(out, "w") as f:
        json.dump({"weights": hashlib.sha256(weights).hexdigest(), "world": trainer.world_size}, f)
"""


def _ddp_fit(tmp_path: Path, folder: str, max_epochs: int, ckpt: str = "") -> dict[str, Any]:
    script = tmp_path / "ddp_child.py"
    script.write_text(DDP_CHILD)
    out = tmp_path / f"{folder}-{max_epochs}.json"
    args = [sys.executable, str(script), str(tmp_path / folder), str(max_epochs), ckpt, str(out)]
    subprocess.run(args, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True, timeout=300)
    return {**json.loads(out.read_text()), "files": inodes(tmp_path / folder)}


@pytest.mark.slow
def test_two_rank_ddp_async_resume_matches_the_straight_run(tmp_path: Path) -> None:
    straight = _ddp_fit(tmp_path, "straight", 4)
    _ddp_fit(tmp_path, "resumed", 2)
    resumed = _ddp_fit(tmp_path, "resumed", 4, str(tmp_path / "resumed" / LATEST))
    assert straight["world"] == 2
    assert set(straight["files"]) == set(resumed["files"]) == EXPECTED
    assert resumed["weights"] == straight["weights"]
    state = load_state(tmp_path / "resumed" / LATEST)
    assert len(state["rng_states"]) == 2


def test_each_save_writes_once_then_links_then_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_save, real_link, real_unlink = (
        SafetensorsCheckpointIO.save_checkpoint,
        checkpoint_module.atomic_link,
        Path.unlink,
    )

    def save(self: Any, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        real_save(self, checkpoint, path)
        events.append(("write", Path(path).name))

    def link(src: Path, final: Path) -> None:
        real_link(src, final)
        events.append(("link", final.name))

    def unlink(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        events.append(("delete", self.name))

    monkeypatch.setattr(SafetensorsCheckpointIO, "save_checkpoint", save)
    monkeypatch.setattr(checkpoint_module, "atomic_link", link)
    monkeypatch.setattr(Path, "unlink", unlink)
    fit(tmp_path, [0.5, 0.7, 0.6], max_epochs=3, save_top_k=1, every_n_epochs=0)
    top_0, top_1 = "checkpoint_top_epoch_0_step_4_val_f1_0.5000.safetensors", TOP_1_8
    assert events == [
        ("write", top_0), ("link", BEST), ("link", LATEST),
        ("write", top_1), ("link", BEST), ("link", LATEST), ("delete", top_0),
        ("write", LATEST),
    ]  # fmt: skip


def test_deletions_a_crashed_run_did_not_finish_are_done_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evicted = tmp_path / "checkpoint_top_epoch_0_step_4_val_f1_0.5000.safetensors"

    def link_only(self: SafetensorsTopKCheckpoint, target: Path, links: list[str], deletions: list) -> None:
        for name in links:  # the run dies after committing epoch 1's file, before deleting epoch 0's
            checkpoint_module.atomic_link(target, self.dirpath / name)

    with monkeypatch.context() as patch:
        patch.setattr(SafetensorsTopKCheckpoint, "_link_and_rotate", link_only)
        fit(tmp_path, [0.5, 0.7, 0.6], max_epochs=2, save_top_k=1, every_n_epochs=0)
    assert evicted.exists()
    fit(tmp_path, [0.5, 0.7, 0.6], ckpt_path=tmp_path / LATEST, max_epochs=3, save_top_k=1, every_n_epochs=0)
    assert set(inodes(tmp_path)) == {LATEST, BEST, TOP_1_8}


class _Recorder(pl.Callback):
    """Clones the weights and optimizer state at each step's end (before the checkpoint callback saves)."""

    def __init__(self) -> None:
        self.at_step: dict[int, dict[str, Any]] = {}
        self.stepped = threading.Event()  # an optimizer step ran after the last snapshot
        self.backward = threading.Event()  # the next batch's forward and backward ran

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.backward.set()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        optimizer = trainer.optimizers[0].state_dict()
        self.at_step[trainer.global_step] = {
            "state_dict": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()},
        }
        self.backward.clear()
        self.stepped.set()


@pytest.mark.parametrize("fence", [True, False])
def test_async_snapshot_holds_the_state_of_its_step_though_the_next_step_ran_before_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fence: bool
) -> None:
    monkeypatch.setattr(staging_module, "DEFER_MIN_BYTES", 0)  # defer every parameter and moment
    recorder, order = _Recorder(), []
    copy = staging_module.Snapshot.copy

    def slow_copy(snapshot: staging_module.Snapshot) -> None:
        # Wait for the next optimizer step: with the fence the step waits for this copy instead (the
        # wait times out), without it the step changes the weights before they are copied.
        recorder.stepped.clear()
        stepped = recorder.stepped.wait(timeout=1.0)
        order.append((stepped, recorder.backward.is_set()))
        copy(snapshot)

    monkeypatch.setattr(staging_module.Snapshot, "copy", slow_copy)
    if not fence:
        monkeypatch.setattr(checkpoint_module, "wait_for_copies", lambda: 0.0)
    pl.seed_everything(0, verbose=False)
    module = ScriptedModule(None)
    folder = tmp_path / "checkpoints"
    callback = SafetensorsTopKCheckpoint(
        dirpath=str(folder), every_n_epochs=0, every_n_train_steps=1, keep_last_steps=-1, async_save=True
    )
    trainer = make_trainer(callback, max_steps=3, limit_val_batches=0)
    trainer.callbacks.insert(0, recorder)  # type: ignore[attr-defined]
    trainer.fit(module)
    for step in (1, 2):
        saved = load_state(folder / f"checkpoint_step_{step}.safetensors")
        optimizer = saved["optimizer_states"][0]["state"]
        matches = all(
            torch.equal(saved["state_dict"][k], v) for k, v in recorder.at_step[step]["state_dict"].items()
        ) and all(
            torch.equal(optimizer[i][k], v)
            for i, moments in recorder.at_step[step]["optimizer"].items()
            for k, v in moments.items()
        )
        assert matches is fence, step
    # With the fence the next forward and backward ran before the copy, the step only after it.
    assert order[:2] == [(not fence, fence)] * 2
    if fence:
        assert callback.save_time[0] >= 2 * 0.9


def test_async_save_deferring_weights_moments_and_ema_writes_exactly_what_sync_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging_module, "DEFER_MIN_BYTES", 0)
    deferred: list[int] = []
    snapshot = staging_module.StagingBuffers.snapshot

    def counting(self: staging_module.StagingBuffers, state: Any, defer: Any = frozenset()) -> Any:
        taken = snapshot(self, state, defer)
        deferred.append(taken.deferred_bytes)
        return taken

    monkeypatch.setattr(staging_module.StagingBuffers, "snapshot", counting)
    for mode in ("sync", "async"):
        pl.seed_everything(0, verbose=False)
        module = ScriptedModule(SCORES)
        callback = SafetensorsTopKCheckpoint(
            dirpath=str(tmp_path / mode), async_save=mode == "async", **LIMITS
        )
        trainer = make_trainer(callback)
        trainer.callbacks.insert(0, EMACallback(decay=0.5))  # type: ignore[attr-defined]
        trainer.fit(module)
    names = sorted(inodes(tmp_path / "sync"))
    assert names == sorted(inodes(tmp_path / "async")) and set(names) == EXPECTED
    for name in names:
        assert_identical(load_state(tmp_path / "async" / name), load_state(tmp_path / "sync" / name))
    # Every save deferred the weights, AdamW's moments and step counters, and the EMA weights.
    parameters = list(module.parameters())
    weights = sum(p.numel() * p.element_size() for p in parameters)
    assert deferred and set(deferred) == {4 * weights + 4 * len(parameters)}


@pytest.mark.parametrize(("limit", "final_step"), [({"max_epochs": 4}, 16), ({"max_steps": 7}, 7)])
def test_async_save_that_ends_the_fit_is_written_at_once_without_a_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: dict[str, int], final_step: int
) -> None:
    snapshotted: list[int] = []
    snapshot = staging_module.StagingBuffers.snapshot

    def recording(self: staging_module.StagingBuffers, state: Any, defer: Any = frozenset()) -> Any:
        snapshotted.append(state["global_step"])
        return snapshot(self, state, defer)

    monkeypatch.setattr(staging_module.StagingBuffers, "snapshot", recording)
    fit(tmp_path, SCORES, async_save=True, **{**LIMITS, **limit})
    # Every earlier save went through a snapshot in the background; the last one, which the end of the
    # fit waits for anyway, was written from the live state (no copy of the state).
    assert snapshotted and final_step not in snapshotted and max(snapshotted) < final_step
    assert load_state(tmp_path / LATEST)["global_step"] == final_step
