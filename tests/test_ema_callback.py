"""Tests for EMACallback: validation on EMA weights, the checkpoint contract, exact resume, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from callbacks.ema import EMACallback
from detector.ema import EMASchedule, ExponentialMovingAverage

REPO = Path(__file__).resolve().parents[1]


def _copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _as(state: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.to(like[k].dtype) for k, v in state.items()}


class Tiny(pl.LightningModule):
    """A deterministic regression model; ``val_score`` is a function of the weights it is validated with."""

    def __init__(self, save_inside_validation: Path | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.register_buffer("batches_seen", torch.tensor(0))
        self.save_inside_validation = save_inside_validation
        self.held: dict[str, list[dict[str, Tensor]]] = {"validate": [], "test": [], "predict": []}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.batches_seen += 1
        return (self.layer(x) - y).square().mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            if self.save_inside_validation is not None:
                self.trainer.save_checkpoint(self.save_inside_validation / f"step{self.global_step}.ckpt")
            self.held["validate"].append(_copy(self.state_dict()))
        self.log("val_score", self.layer.weight.sum() + self.layer.bias.sum())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.held["test"].append(_copy(self.state_dict()))

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        self.held["predict"].append(_copy(self.state_dict()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)


def _loader() -> DataLoader:
    x = torch.linspace(-1, 1, 32).reshape(8, 4)
    return DataLoader(TensorDataset(x, (3 * x).sin().sum(1, keepdim=True)), batch_size=2)


def _trainer(callbacks: list[Callback], max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", any(isinstance(c, Checkpoint) for c in callbacks))
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kwargs,
    )


class RawProbe(Callback):
    """Listed before the EMA callback: sees the module before the swap, and after each training batch."""

    def __init__(self) -> None:
        self.before_validation: list[dict[str, Tensor]] = []
        self.after_batch: dict[str, Tensor] = {}

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before_validation.append(_copy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after_batch = _copy(pl_module.state_dict())


class RecordingCheckpoint(Checkpoint):
    """Records what the module and the EMA hold when a checkpoint callback would save."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.at_save: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at_save.append(
            {
                "step": trainer.global_step,
                "module": _copy(pl_module.state_dict()),
                "ema": _copy(self.ema.averaged_state_dict()),
                "score": trainer.callback_metrics["val_score"].item(),
            }
        )


def test_checkpoint_callbacks_run_after_the_swap_back_and_see_raw_weights() -> None:
    ema = EMACallback(decay=0.5)
    recorder, probe = RecordingCheckpoint(ema), RawProbe()
    trainer = _trainer([recorder, probe, ema], precision="bf16-true")  # checkpoint listed first on purpose
    assert trainer.callbacks.index(recorder) > trainer.callbacks.index(ema)
    model = Tiny()
    trainer.fit(model, _loader(), _loader())
    assert len(recorder.at_save) == len(probe.before_validation) == len(model.held["validate"]) == 3
    records = zip(recorder.at_save, probe.before_validation, model.held["validate"], strict=True)
    for saved, raw, held in records:
        assert _equal(saved["module"], raw)  # bit-identical, bf16 kept
        assert saved["module"]["layer.weight"].dtype == torch.bfloat16
        assert _equal(held, _as(saved["ema"], held))  # validation ran on the EMA
        assert not _equal(held, raw)


@pytest.mark.parametrize("cpu_offload", [False, True])
def test_after_fit_the_module_holds_the_raw_weights(cpu_offload: bool) -> None:
    ema, probe = EMACallback(decay=0.9, cpu_offload=cpu_offload), RawProbe()
    model = Tiny()
    _trainer([probe, ema]).fit(model, _loader(), _loader())
    assert _equal(_copy(model.state_dict()), probe.after_batch)
    assert not torch.equal(ema.averaged_state_dict()["layer.weight"], model.layer.weight)
    assert ema.num_updates == 12


def test_gradient_accumulation_updates_once_per_optimizer_step() -> None:
    ema = EMACallback(decay=0.5)
    _trainer([ema], max_epochs=1, accumulate_grad_batches=2).fit(Tiny(), _loader())
    assert ema.num_updates == 2


def test_best_checkpoint_holds_raw_weights_and_the_ema_that_earned_its_score(tmp_path: Path) -> None:
    ema = EMACallback(decay=0.7)
    recorder = RecordingCheckpoint(ema)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_score", mode="max", save_top_k=1)
    _trainer([ema, best, recorder], max_epochs=4).fit(Tiny(), _loader(), _loader())
    checkpoint = torch.load(best.best_model_path, weights_only=True)
    record = next(r for r in recorder.at_save if r["step"] == checkpoint["global_step"])
    assert record["score"] == max(r["score"] for r in recorder.at_save) == best.best_model_score.item()
    assert _equal(checkpoint["state_dict"], record["module"])
    state = checkpoint["callbacks"]["EMACallback"]
    assert _equal(state["ema"], record["ema"]) and state["num_updates"] == record["step"]
    ema_score = (state["ema"]["layer.weight"].sum() + state["ema"]["layer.bias"].sum()).item()
    raw_score = (record["module"]["layer.weight"].sum() + record["module"]["layer.bias"].sum()).item()
    assert ema_score == pytest.approx(best.best_model_score.item(), abs=1e-6)
    assert raw_score != pytest.approx(ema_score, abs=1e-3)


def test_checkpoint_saved_while_ema_is_swapped_in_holds_raw_weights(tmp_path: Path) -> None:
    ema, probe = EMACallback(decay=0.5), RawProbe()
    model = Tiny(save_inside_validation=tmp_path)
    _trainer([probe, ema], max_epochs=2).fit(model, _loader(), _loader())
    for epoch, raw in enumerate(probe.before_validation):
        checkpoint = torch.load(tmp_path / f"step{4 * (epoch + 1)}.ckpt", weights_only=True)
        held = model.held["validate"][epoch]  # taken after the save: the EMA went back in
        assert _equal(checkpoint["state_dict"], raw)
        assert _equal(held, _as(checkpoint["callbacks"]["EMACallback"]["ema"], held))
    assert _equal(_copy(model.state_dict()), probe.after_batch)


def _fit_ema(
    max_epochs: int, ckpt_path: Path | None = None, save_to: Path | None = None
) -> tuple[Tiny, EMACallback]:
    ema = EMACallback(decay=0.9, warmup=True, update_every_n_steps=3, start_step=2)
    model = Tiny()
    trainer = _trainer([ema], max_epochs=max_epochs)
    trainer.fit(model, _loader(), _loader(), ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model, ema


def test_resumed_run_has_the_same_raw_weights_and_ema_as_an_uninterrupted_one(tmp_path: Path) -> None:
    straight_model, straight_ema = _fit_ema(max_epochs=3)
    _, first_ema = _fit_ema(max_epochs=1, save_to=tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=True)["callbacks"]["EMACallback"]
    assert saved["num_updates"] == first_ema.num_updates == 1  # steps 3 only (start after 2, every 3)
    assert saved["last_update_step"] == 3
    assert saved["settings"] == {
        "decay": 0.9,
        "warmup": True,
        "warmup_gamma": 1.0,
        "warmup_power": 0.75,
        "every_n_steps": 3,
        "start_step": 2,
        "start_epoch": 0,
        "cpu_offload": False,
    }
    resumed_model, resumed_ema = _fit_ema(max_epochs=3, ckpt_path=tmp_path / "epoch1.ckpt")
    assert resumed_ema.num_updates == straight_ema.num_updates == 4  # steps 3, 6, 9, 12
    assert _equal(resumed_ema.averaged_state_dict(), straight_ema.averaged_state_dict())
    assert _equal(_copy(resumed_model.state_dict()), _copy(straight_model.state_dict()))


def test_test_and_predict_use_the_ema_only_when_listed() -> None:
    ema = EMACallback(decay=0.5, eval_with_ema_for=["test"])
    model = Tiny()
    trainer = _trainer([ema], max_epochs=1)
    trainer.fit(model, _loader(), _loader())
    raw = _copy(model.state_dict())
    averaged = _as(ema.averaged_state_dict(), raw)
    trainer.test(model, _loader(), verbose=False)
    trainer.predict(model, _loader())
    assert _equal(model.held["test"][0], averaged) and _equal(model.held["predict"][0], raw)
    assert _equal(model.held["validate"][0], raw)  # validate not listed
    assert _equal(_copy(model.state_dict()), raw)


def test_validate_from_a_checkpoint_runs_on_its_saved_ema(tmp_path: Path) -> None:
    _fit_ema(max_epochs=2, save_to=tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    model = Tiny()
    _trainer([EMACallback(decay=0.9, warmup=True, update_every_n_steps=3, start_step=2)]).validate(
        model, _loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False
    )
    held = model.held["validate"][0]
    assert _equal(held, _as(saved["callbacks"]["EMACallback"]["ema"], held))
    assert _equal(_copy(model.state_dict()), saved["state_dict"])


def test_before_the_first_update_the_ema_is_the_training_weights() -> None:
    ema, model = EMACallback(start_step=100), Tiny()
    _trainer([ema], max_epochs=1).fit(model, _loader(), _loader())
    assert ema.num_updates == 0 and model.held["validate"]
    assert _equal(_as(ema.averaged_state_dict(), model.state_dict()), _copy(model.state_dict()))


def test_loading_state_with_other_settings_warns_and_keeps_the_configured_ones() -> None:
    old = EMACallback(decay=0.5)
    new = EMACallback(decay=0.9)
    with pytest.warns(UserWarning, match="differ from the checkpoint"):
        new.load_state_dict(old.state_dict())
    assert new.schedule.decay == 0.9


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eval_with_ema_for": ["validate", "train"]}, r"eval_with_ema_for accepts .* got \['train'\]"),
        ({"decay": 1.5}, "decay must be in"),
        ({"update_every_n_steps": 0}, "every_n_steps must be >= 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMACallback(**kwargs)


def test_fsdp1_strategy_is_refused_with_a_clear_error() -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="does not support FSDPStrategy"):
        EMACallback().setup(trainer, Tiny(), "fit")  # type: ignore[arg-type]


def test_docstring_yaml_builds_the_callback_through_jsonargparse() -> None:
    snippet = EMACallback.__doc__.split("Example YAML::")[1].split("Args:")[0]
    config = yaml.safe_load(textwrap.dedent(snippet))["trainer"]["callbacks"][0]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=Callback)
    callback = parser.instantiate_classes(parser.parse_object({"callback": config})).callback
    assert isinstance(callback, EMACallback)
    assert callback.schedule.decay == 0.999 and callback.schedule.warmup
    assert callback.eval_with_ema_for == {"validate", "test"}


def _run_two_processes(kind: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "ema_multiprocess.py"
    subprocess.run([sys.executable, str(script), kind, str(out)], env=env, check=True, timeout=600)


def _single_process_reference() -> dict[str, Tensor]:
    # Lightning gives each rank a shuffled DistributedSampler (seed 0, reseeded per epoch); a global
    # step is both ranks' batches, and DDP's mean of the two rank means is the mean over all four.
    model, schedule = Tiny(), EMASchedule(decay=0.8, warmup=True)
    ema = ExponentialMovingAverage(model)
    optimizer = model.configure_optimizers()
    dataset = _loader().dataset
    samplers = [DistributedSampler(dataset, 2, rank, shuffle=True, seed=0) for rank in (0, 1)]
    for epoch in range(2):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        order = [list(sampler) for sampler in samplers]
        for k in range(2):
            x, y = dataset[order[0][2 * k : 2 * k + 2] + order[1][2 * k : 2 * k + 2]]
            model.training_step((x, y), k).backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update(schedule.decay_at(ema.num_updates))
    return ema.state_dict()


@pytest.mark.slow
def test_ddp_ranks_keep_the_same_ema_equal_to_a_single_process_run(tmp_path: Path) -> None:
    _run_two_processes("ddp", tmp_path)
    rank0 = torch.load(tmp_path / "ema_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ema_rank1.pt", weights_only=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["EMACallback"]
    assert _equal(rank0, rank1) and _equal(saved["ema"], rank0) and saved["num_updates"] == 4
    expected = _single_process_reference()
    for name, value in expected.items():
        torch.testing.assert_close(saved["ema"][name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_ranks_average_their_shards_and_resume_exactly(tmp_path: Path) -> None:
    _run_two_processes("fsdp2", tmp_path)
    rank0 = torch.load(tmp_path / "fsdp2_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "fsdp2_rank1.pt", weights_only=True)
    # 8 steps, updates every 3rd: step 3 before the save, step 6 after the resume.
    assert rank0["num_updates"] == rank1["num_updates"] == [2, 2]
    assert rank0["straight"].keys() == Tiny().state_dict().keys()
    assert _equal(rank0["straight"], rank1["straight"]) and _equal(rank0["resumed"], rank1["resumed"])
    assert _equal(rank0["resumed"], rank0["straight"])
