import hashlib
import json
import math
import os
import re
import shutil

import lightning.pytorch as pl
import pytest
import torch
from bundle_helpers import TEXTS, tiny_model
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from callbacks.ema import EMACallback
from callbacks.inference_export import InferenceExportCallback
from detector.atomic import clean_stale_temps, temp_path_for
from detector.bundle.export import existing_bundles, export_checkpoint, remove_bundle
from detector.bundle.quantize import Int8CheckError
from detector.bundle.thresholds import rates_at_threshold, threshold_at_fpr
from detector.bundle.writer import read_metadata
from detector.data import DetectorDataModule
from detector.run_folder import RunFolderError

LABELS = [i % 2 for i in range(len(TEXTS))]


class TinyModule(pl.LightningModule):
    """A LightningModule with the classifier in `model` and a scripted `val_f1` per epoch."""

    def __init__(self, vocab_size: int, val_f1: list[float], keep_scores: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = tiny_model_from_vocab(vocab_size)
        self._probs, self._labels, self._scores = [], [], None

    def training_step(self, batch, batch_idx):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        return self.model(**inputs).loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self._probs.append(logits.softmax(-1)[:, 1])
        self._labels.append(batch["labels"])

    def on_validation_epoch_end(self):
        self.log("val_f1", self.hparams.val_f1[self.current_epoch])
        self._scores = (torch.cat(self._probs), torch.cat(self._labels))
        self._probs, self._labels = [], []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ScoredModule(TinyModule):
    def last_val_scores(self):
        return self._scores


def tiny_model_from_vocab(vocab_size):
    class _Tok:
        def __len__(self):
            return vocab_size

    return tiny_model(_Tok()).train()


def tiny_data(root, tokenizer) -> DetectorDataModule:
    """The real data module over TEXTS (train = val), with the session's tokenizer saved as a folder."""
    rows = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS, strict=True))
    (root / "rows.jsonl").write_text(rows, encoding="utf-8")
    if not (root / "tokenizer").exists():
        tokenizer.save_pretrained(root / "tokenizer")
    path = str(root / "rows.jsonl")
    return DetectorDataModule(
        train_path=path, val_path=path, tokenizer_path=str(root / "tokenizer"), max_length=32, batch_size=10,
        eval_batch_size=10, balance="none",
    )  # fmt: skip


class HalfEMA(EMACallback):
    """An EMA callback whose 'average' is half the module's current weights (easy to recognise)."""

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        self.module = pl_module

    def averaged_state_dict(self):
        return {k: v * 0.5 if v.is_floating_point() else v for k, v in self.module.state_dict().items()}


def _fit(tmp_path, tokenizer, callback, val_f1, module_cls=ScoredModule, extra=(), ckpt_path=None):
    pl.seed_everything(7)
    module = module_cls(len(tokenizer), val_f1)
    trainer = pl.Trainer(
        max_epochs=len(val_f1), accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_train_batches=1, callbacks=[callback, *extra],
    )  # fmt: skip
    trainer.fit(module, datamodule=tiny_data(tmp_path, tokenizer), ckpt_path=ckpt_path)
    return module


def _names(root):
    return sorted(p.name for p in root.iterdir())


def test_exports_on_improvement_keeps_last_two_and_writes_final(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), keep_last=2)
    _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.7, 0.6, 0.8, math.nan])
    assert _names(tmp_path / "inference") == ["model_v1.0_epoch1", "model_v1.0_epoch3", "model_v1.0_final"]
    assert callback.written == ["model_v1.0_epoch1", "model_v1.0_epoch3"]
    assert read_metadata(tmp_path / "inference" / "model_v1.0_epoch3")["metrics"]["val_f1"] == pytest.approx(
        0.8
    )


def test_min_mode_exports_when_the_metric_falls(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), mode="min", version="2.1.3")
    _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.7, 0.4])
    assert _names(tmp_path / "inference") == [
        "model_v2.1.3_epoch0",
        "model_v2.1.3_epoch2",
        "model_v2.1.3_final",
    ]


def test_every_n_epochs_exports_regardless_of_the_metric(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), every_n_epochs=2)
    _fit(tmp_path, bundle_tokenizer, callback, [0.9, 0.1, 0.1, 0.1])
    assert _names(tmp_path / "inference") == ["model_v1.0_epoch1", "model_v1.0_epoch3", "model_v1.0_final"]


def test_final_bundle_holds_the_trained_weights_and_the_run_metadata(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), version="1.2", target_fpr=0.2)
    module = _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.6])
    meta = read_metadata(tmp_path / "inference" / "model_v1.2_final")
    probs, labels = module.last_val_scores()
    assert meta["decision_threshold"] == threshold_at_fpr(probs, labels, 0.2)
    assert rates_at_threshold(probs, labels, meta["decision_threshold"])[0] <= 0.2
    assert meta["threshold_source"] == "validation set (15 human, 15 machine texts)"
    assert (meta["version"], meta["epoch"], meta["step"]) == ("1.2", 1, 2)
    assert (meta["seed"], meta["weights"]) == (7, "trained")
    fingerprint = hashlib.sha256((tmp_path / "rows.jsonl").read_bytes()).hexdigest()
    assert (meta["data_fingerprint"], meta["max_length"], meta["target_fpr"]) == (fingerprint, 32, 0.2)
    assert meta["metrics"] == {"val_f1": pytest.approx(0.6)}
    assert meta["config"]["model"] == {
        "vocab_size": len(bundle_tokenizer),
        "val_f1": [0.5, 0.6],
        "keep_scores": True,
    }
    assert meta["checkpoint"] is None and meta["resumed_from"] is None
    shipped = load_file(tmp_path / "inference" / "model_v1.2_final" / "model.safetensors")
    expected = module.model.state_dict()
    assert shipped.keys() == expected.keys()
    assert all(torch.equal(shipped[k], expected[k]) for k in expected)


def test_ema_weights_are_shipped_when_an_ema_callback_is_present(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"))
    module = _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.6], extra=[HalfEMA()])
    bundle = tmp_path / "inference" / "model_v1.0_final"
    shipped = load_file(bundle / "model.safetensors")
    assert all(torch.equal(shipped[k], v * 0.5) for k, v in module.model.state_dict().items())
    assert read_metadata(bundle)["weights"] == "ema"


def test_a_callback_that_only_looks_like_an_ema_is_not_taken_for_one(tmp_path, bundle_tokenizer):
    class LooksLikeEMA(Callback):
        def averaged_state_dict(self):
            raise AssertionError("not an EMACallback: must not be asked for weights")

    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"))
    _fit(tmp_path, bundle_tokenizer, callback, [0.5], extra=[LooksLikeEMA()])
    assert read_metadata(tmp_path / "inference" / "model_v1.0_final")["weights"] == "trained"


def test_non_finite_metrics_never_count_as_improvements(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), keep_last=5)
    _fit(tmp_path, bundle_tokenizer, callback, [math.inf, 0.5, math.inf, math.nan, 0.4, 0.6])
    assert callback.written == ["model_v1.0_epoch1", "model_v1.0_epoch5"]


def test_the_export_decision_uses_rank_zeros_broadcast_metric(tmp_path, bundle_tokenizer, monkeypatch):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    broadcasts = []

    def rank_zero_says(self, obj, src=0):
        broadcasts.append(obj)
        return {**obj, "val_f1": 0.9} if isinstance(obj, dict) and "val_f1" in obj else obj

    monkeypatch.setattr(SingleDeviceStrategy, "broadcast", rank_zero_says)
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), keep_last=5)
    _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.6], extra=[])
    # This rank logged 0.5 then 0.6 (an improvement); rank zero's 0.9 twice is one improvement only.
    assert callback.written == ["model_v1.0_epoch0"]
    assert [b["val_f1"] for b in broadcasts if isinstance(b, dict) and "val_f1" in b] == pytest.approx(
        [0.5, 0.6]
    )


def test_threshold_falls_back_to_half_without_validation_scores(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"))
    _fit(tmp_path, bundle_tokenizer, callback, [0.5], module_cls=TinyModule)
    meta = read_metadata(tmp_path / "inference" / "model_v1.0_final")
    assert meta["decision_threshold"] == 0.5
    assert meta["threshold_source"].startswith("default 0.5: no validation scores")


def test_existing_bundles_of_the_version_stop_the_run_before_training(tmp_path, bundle_tokenizer):
    root = tmp_path / "inference"
    (root / "model_v1.0_final").mkdir(parents=True)
    (root / "model_v1.0_final" / "config.json").write_text("{}")
    callback = InferenceExportCallback(dirpath=str(root))
    with pytest.raises(RunFolderError, match=r"bundles of version 1\.0 of another run \(model_v1\.0_final\)"):
        _fit(tmp_path, bundle_tokenizer, callback, [0.5, 0.6])
    assert _names(root) == ["model_v1.0_final"]
    assert (root / "model_v1.0_final" / "config.json").read_text() == "{}"


class SeeFolderAtTrainStart(Callback):
    def __init__(self, root):
        self.root, self.seen = root, None

    def on_train_start(self, trainer, pl_module):
        self.seen = _names(self.root)


def test_stale_bundle_temp_of_a_killed_export_is_removed_when_fit_starts(tmp_path, bundle_tokenizer):
    root = tmp_path / "inference"
    # What a killed export leaves: a hidden, fully written temp folder beside the bundle's name.
    stale = temp_path_for(root / "model_v1.0_epoch0")
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    assert re.fullmatch(rf"\.model_v1\.0_epoch0\.tmp-{os.getpid()}-[0-9a-f]{{8}}", stale.name)
    assert existing_bundles(root, "1.0") == []
    spy = SeeFolderAtTrainStart(root)
    _fit(tmp_path, bundle_tokenizer, InferenceExportCallback(dirpath=str(root)), [0.5], extra=[spy])
    assert spy.seen == ["notes.txt"]  # removed at setup, before training
    assert _names(root) == ["model_v1.0_epoch0", "model_v1.0_final", "notes.txt"]


def test_removal_killed_midway_leaves_only_a_hidden_temp_that_is_no_bundle(
    tmp_path, bundle_tokenizer, monkeypatch
):
    root = tmp_path / "inference"
    (root / "model_v1.0_epoch2").mkdir(parents=True)
    (root / "model_v1.0_epoch2" / "config.json").write_text("{}")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_bundle(root / "model_v1.0_epoch2")
    monkeypatch.undo()
    [left] = _names(root)
    assert re.fullmatch(rf"\.model_v1\.0_epoch2\.tmp-{os.getpid()}-[0-9a-f]{{8}}", left)
    assert existing_bundles(root, "1.0") == []
    assert clean_stale_temps(root) == [root / left] and _names(root) == []


def test_resumed_run_accepts_and_prunes_the_bundles_it_wrote(tmp_path, bundle_tokenizer):
    root = tmp_path / "inference"
    first = InferenceExportCallback(dirpath=str(root), keep_last=1)
    _fit(tmp_path, bundle_tokenizer, first, [0.5])
    (root / "model_v1.0_final").rename(tmp_path / "released")  # the interrupted run had no final
    second = InferenceExportCallback(dirpath=str(root), keep_last=1)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    # Epoch 0 is in the restored state, so it is neither a conflict nor written again.
    _fit(tmp_path, bundle_tokenizer, second, [0.9, 0.95])
    assert _names(root) == ["model_v1.0_epoch1", "model_v1.0_final"]


def test_state_of_another_version_is_not_ours_to_prune():
    callback = InferenceExportCallback(version="2.0")
    callback.load_state_dict({"best": 0.9, "written": ["model_v1.0_epoch3"], "version": "1.0"})
    assert callback.written == []
    assert callback.state_dict() == {"best": 0.9, "written": [], "version": "2.0", "run_id": None}


def test_missing_monitor_names_what_was_logged(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(dirpath=str(tmp_path / "inference"), monitor="val_auroc")
    with pytest.raises(ValueError, match=r"`val_auroc` was not logged; logged: \['val_f1'\]"):
        _fit(tmp_path, bundle_tokenizer, callback, [0.5])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": "1"}, "semantic"),
        ({"version": "v1.0"}, "semantic"),
        ({"version": "1.0.0.0"}, "semantic"),
        ({"mode": "best"}, "mode"),
        ({"keep_last": 0}, "keep_last"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"target_fpr": 1.0}, "target_fpr"),
    ],
)
def test_bad_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InferenceExportCallback(**kwargs)


def _checkpoint(model):
    raw = {f"model.{k}": v for k, v in model.state_dict().items()}
    ema = {f"model.{k}": v * 0.5 for k, v in model.state_dict().items()}
    return {
        "state_dict": raw, "epoch": 4, "global_step": 90, "hyper_parameters": {"lr": 0.1},
        "callbacks": {"EMACallback": {"ema": ema, "num_updates": 3}},
    }  # fmt: skip


def test_export_checkpoint_ships_raw_weights_before_the_first_ema_update(
    tmp_path, bundle_model, bundle_tokenizer
):
    checkpoint = _checkpoint(bundle_model)
    checkpoint["callbacks"]["EMACallback"]["num_updates"] = 0
    path = export_checkpoint(
        tmp_path / "c.safetensors", tmp_path / "inference", bundle_model, bundle_tokenizer,
        load_state=lambda p: checkpoint,
    )  # fmt: skip
    shipped = load_file(path / "model.safetensors")
    for key, value in bundle_model.state_dict().items():
        assert torch.equal(shipped[key], value), key


@pytest.mark.parametrize(("use_ema", "factor", "source"), [(True, 0.5, "ema"), (False, 1.0, "trained")])
def test_export_checkpoint_ships_the_chosen_weights(
    tmp_path, bundle_model, bundle_tokenizer, use_ema, factor, source
):
    checkpoint = _checkpoint(bundle_model)
    path = export_checkpoint(
        tmp_path / "checkpoint_epoch_4.safetensors", tmp_path / "inference", bundle_model, bundle_tokenizer,
        version="1.1", use_ema=use_ema, load_state=lambda p: checkpoint,
    )  # fmt: skip
    assert path.name == "model_v1.1_epoch4"
    shipped = load_file(path / "model.safetensors")
    assert all(torch.equal(shipped[k], v * factor) for k, v in bundle_model.state_dict().items())
    meta = read_metadata(path)
    assert (meta["weights"], meta["epoch"], meta["step"]) == (source, 4, 90)
    assert meta["checkpoint"] == str(tmp_path / "checkpoint_epoch_4.safetensors")
    assert meta["config"] == {"model": {"lr": 0.1}, "data": {}}
    assert meta["decision_threshold"] == 0.5


def test_without_dirpath_bundles_go_under_the_trainers_default_root_dir(tmp_path, bundle_tokenizer):
    _fit(tmp_path, bundle_tokenizer, InferenceExportCallback(), [0.5])
    assert _names(tmp_path / "models" / "inference") == ["model_v1.0_epoch0", "model_v1.0_final"]


@pytest.mark.slow
def test_quantize_writes_a_checked_int8_model_into_each_bundle(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(
        dirpath=str(tmp_path / "inference"), quantize=True, max_auroc_drop=1.0, max_decision_change=1.0
    )
    _fit(tmp_path, bundle_tokenizer, callback, [0.5])
    for name in ("model_v1.0_epoch0", "model_v1.0_final"):
        bundle = tmp_path / "inference" / name
        assert {"model.onnx", "model_int8.onnx"} <= set(_names(bundle))
        entry = read_metadata(bundle)["int8"]
        assert entry["checked_on"] == "validation set (15 human, 15 machine texts)"
        assert (entry["max_auroc_drop"], entry["max_decision_change"]) == (1.0, 1.0)


def test_quantize_past_a_limit_stops_the_run_and_writes_no_bundle(tmp_path, bundle_tokenizer):
    callback = InferenceExportCallback(
        dirpath=str(tmp_path / "inference"), quantize=True, max_decision_change=0.0
    )
    with pytest.raises(Int8CheckError, match=r"^int8 model refused, bundle not written: "):
        _fit(tmp_path, bundle_tokenizer, callback, [0.5])
    assert _names(tmp_path / "inference") == []


@pytest.mark.parametrize("limit", ["max_auroc_drop", "max_decision_change"])
def test_quantize_limits_outside_zero_one_are_refused(limit):
    with pytest.raises(ValueError, match=rf"^{limit} must be in \[0, 1\], got 1.5$"):
        InferenceExportCallback(quantize=True, **{limit: 1.5})
