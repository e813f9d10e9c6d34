"""Multi-process training through the CLI on CPU (gloo): configs/ddp.yaml and configs/fsdp.yaml."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from multi_device_helpers import TINY, cli_fit, metric_rows, tensors
from safetensors.torch import load_file
from torchmetrics.functional.classification import binary_accuracy, binary_auroc
from transformers import DebertaV2ForSequenceClassification

from detector.bundle.export import bundle_origin
from detector.bundle.thresholds import threshold_at_fpr
from detector.bundle.writer import read_metadata
from detector.checkpoint.format import load_state
from detector.checkpoint.reader import load_checkpoint_state, read_checkpoint_header
from detector.checkpoint.sharded import INDEX_NAME, read_index, shard_name
from detector.checkpoint.strategy import SafetensorsModelParallelStrategy, optimizer_state_by_name
from detector.checkpoint.topk import LATEST_NAME, best_name, epoch_name, step_name, top_k_name
from detector.commands.export import main as export_main
from detector.data import DetectorDataModule, pad_batch
from detector.demo import demo_rows
from detector.loader import ResumableDataLoader, ResumableSampler
from detector.metrics import MacroF1
from detector.module import DetectorModule
from tests.conftest import write_jsonl

DDP = "configs/ddp.yaml"
STEP_FILES = ("--checkpoint.every_n_train_steps", "1", "--checkpoint.keep_last_steps", "-1")
STEPS = 12  # 96 samples, 2 ranks x batch 8: 6 steps an epoch, 2 epochs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    return {split: write_jsonl(folder / f"{split}.jsonl", demo_rows(n, seed=i))
            for i, (split, n) in enumerate([("train", 96), ("val", 32)])}  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("ddp") / "straight"
    return cwd, cli_fit(cwd, data, DDP, *STEP_FILES)


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _expected_checkpoints(cwd: Path) -> set[str]:
    val_rows = [row for row in metric_rows(cwd) if row["val_f1"]]
    tops = {top_k_name("val_f1", int(r["epoch"]), int(r["step"]) + 1, float(r["val_f1"])) for r in val_rows}
    steps = {step_name(s) for s in range(1, STEPS + 1)}
    return steps | tops | {epoch_name(1), best_name("val_f1"), LATEST_NAME}


@pytest.mark.slow
def test_ddp_fit_writes_one_set_of_checkpoints_logs_and_bundles(ddp_run) -> None:
    cwd, output = ddp_run
    outputs = cwd / "outputs"
    assert _names(outputs) == {"checkpoints", "logs", "models", "summary.json"}
    assert _names(outputs / "checkpoints") == _expected_checkpoints(cwd)
    assert _names(outputs / "logs") == {"version_0"}
    logs = _names(outputs / "logs/version_0")
    events = {name for name in logs if name.startswith("events.out.tfevents.")}
    assert len(events) == 1  # TensorBoard, written once, beside metrics.csv
    assert logs - events == {"config.yaml", "hparams.yaml", "metrics.csv"}
    steps = [int(row["step"]) for row in metric_rows(cwd) if row["train_loss_step"]]
    assert steps == list(range(STEPS))
    state = load_state(outputs / "checkpoints" / LATEST_NAME)
    assert state["global_step"] == STEPS
    (export,) = [v for k, v in state["callbacks"].items() if k.startswith("InferenceExportCallback")]
    assert _names(outputs / "models/inference") == {*export["written"], "model_v1.0_final"}
    assert output.count("`Trainer.fit` stopped: `max_epochs=2` reached.") == 1
    assert "sync_dist=True" not in output


@pytest.mark.slow
def test_ddp_checkpoint_holds_every_ranks_own_rng_state(ddp_run) -> None:
    cwd, _ = ddp_run
    states = load_state(cwd / "outputs/checkpoints" / step_name(3))["rng_states"]
    assert len(states) == 2
    assert not torch.equal(states[0]["torch"], states[1]["torch"])


def _rank_loaders(dm: DetectorDataModule, rank: int) -> tuple[list[int], list[int]]:
    progress = SimpleNamespace(processed=0)
    fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=progress)))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, fit_loop=fit_loop)  # type: ignore[assignment]
    train = [i for batch in dm.train_dataloader() for i in batch["index"].tolist()]
    val = [i for batch in dm.val_dataloader() for i in batch["index"].tolist()]
    return train, val


def test_data_module_gives_each_rank_its_own_half(tmp_path, data) -> None:
    dm = DetectorDataModule(
        train_path=str(data["train"]), val_path=str(data["val"]), tokenizer_root=str(tmp_path),
        tokenizer_vocab_size=200, batch_size=8,
    )  # fmt: skip
    dm.setup("fit")
    (train0, val0), (train1, val1) = _rank_loaders(dm, 0), _rank_loaders(dm, 1)
    assert len(train0) == len(train1) == 48 and sorted(train0 + train1) == list(range(96))
    assert val0 == list(range(0, 32, 2)) and val1 == list(range(1, 32, 2))


def _loader(batch_size: int, world_size: int) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(96)), ResumableSampler(96, world_size=world_size), batch_size)


def test_mid_epoch_position_maps_onto_another_rank_count_with_the_same_global_batch() -> None:
    state = {"epoch": 0, "batches_consumed": 4, "seed": 0, "batch_size": 8, "world_size": 2}
    one_rank = _loader(16, 1)
    one_rank.load_state_dict(state)
    assert list(one_rank.resumable_sampler) == ResumableSampler(96).indices(0)[64:]  # 4 steps x 16 seen
    with pytest.raises(ValueError, match=r"batches of 8 on 2 rank\(s\); this run has 8 on 1"):
        _loader(8, 1).load_state_dict(state)
    _loader(8, 1).load_state_dict({**state, "batches_consumed": 6})  # the epoch's end: any batch


def _macro_f1(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    metric = MacroF1()
    metric.update(scores, labels)
    return metric.compute()


def _whole_val_set_scores(cwd: Path, data: dict[str, Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(machine) of the last validation's (EMA) weights on every validation row, in one process."""
    state = load_state(cwd / "outputs/checkpoints" / LATEST_NAME)
    dm = DetectorDataModule(
        train_path=str(data["train"]), val_path=str(data["val"]),
        tokenizer_root=str(cwd.parent / "tokenizer"), tokenizer_vocab_size=200, max_length=128,
    )  # fmt: skip
    dm.setup("fit")
    module = DetectorModule(arch=json.loads(TINY), vocab_size=dm.vocab_size).eval()
    module.load_state_dict(state["callbacks"]["EMACallback"]["ema"])
    dataset = dm.datasets["val"]
    batch = pad_batch([dataset[i] for i in range(len(dataset))], dm.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = module(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)[:, 1]
    return scores, batch["labels"]


@pytest.mark.slow
def test_ddp_bundle_threshold_is_chosen_on_the_whole_validation_set(ddp_run, data) -> None:
    cwd, _ = ddp_run
    meta = read_metadata(cwd / "outputs/models/inference/model_v1.0_final")
    scores, labels = _whole_val_set_scores(cwd, data)
    humans = int((labels == 0).sum())
    # Both ranks' shares, each row once (rank 0 alone holds 16 of the 32 rows).
    machines = len(labels) - humans
    assert meta["threshold_source"] == f"validation set ({humans} human, {machines} machine texts)"
    expected = threshold_at_fpr(scores, labels, meta["target_fpr"])
    assert meta["decision_threshold"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert meta["max_length"] == 128  # the data module's, as trained and thresholded


@pytest.mark.slow
def test_ddp_validation_metrics_are_reduced_over_both_ranks(ddp_run, data) -> None:
    cwd, _ = ddp_run
    state = load_state(cwd / "outputs/checkpoints" / LATEST_NAME)
    dm = DetectorDataModule(
        train_path=str(data["train"]), val_path=str(data["val"]),
        tokenizer_root=str(cwd.parent / "tokenizer"), tokenizer_vocab_size=200,
    )  # fmt: skip
    dm.setup("fit")
    module = DetectorModule(arch=json.loads(TINY), vocab_size=dm.vocab_size).eval()
    module.load_state_dict(state["callbacks"]["EMACallback"]["ema"])  # the last validation ran on the EMA
    weight, dataset = dm.class_weights(), dm.datasets["val"]
    losses, scores, labels = [], [], []
    for rank in (0, 1):
        shard = ResumableSampler(len(dataset), shuffle=False, rank=rank, world_size=2).indices(0)
        batch = pad_batch([dataset[i] for i in shard], dm.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = module(batch["input_ids"], batch["attention_mask"]).float()
        losses.append(F.cross_entropy(logits, batch["labels"], weight=weight))
        scores.append(logits.softmax(-1)[:, 1])
        labels.append(batch["labels"])
    score, label = torch.cat(scores), torch.cat(labels)
    expected = {
        "val_loss": torch.stack(losses).mean(),
        "val_f1": _macro_f1(score, label),
        "val_auroc": binary_auroc(score, label),
        "val_acc": binary_accuracy(score, label),
    }
    logged = [row for row in metric_rows(cwd) if row["val_f1"]][-1]
    for name, value in expected.items():
        assert float(logged[name]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), name


def _assert_same_final_state(straight: Path, resumed: Path, parts: tuple[str, ...]) -> None:
    expected = load_checkpoint_state(straight / "outputs/checkpoints" / LATEST_NAME)
    got = load_checkpoint_state(resumed / "outputs/checkpoints" / LATEST_NAME)
    assert got["global_step"] == expected["global_step"] == STEPS
    assert len(tensors(expected["callbacks"]["EMACallback"]["ema"])) == len(expected["state_dict"])
    for part in parts:
        want, have = tensors(expected[part]), tensors(got[part])
        assert have.keys() == want.keys(), part
        assert [k for k in want if not torch.equal(have[k], want[k])] == [], part


def _train_losses(cwd: Path) -> dict[str, str]:
    return {row["step"]: row["train_loss_step"] for row in metric_rows(cwd) if row["train_loss_step"]}


@pytest.mark.slow
@pytest.mark.parametrize("step", [4])
def test_ddp_resume_mid_epoch_equals_the_straight_run(tmp_path, ddp_run, data, step) -> None:
    straight_cwd, _ = ddp_run
    saved = tmp_path / step_name(step)
    shutil.copy(straight_cwd / "outputs/checkpoints" / step_name(step), saved)
    resumed_cwd = straight_cwd.parent / f"resumed_{step}"
    cli_fit(resumed_cwd, data, DDP, *STEP_FILES, "--ckpt_path", str(saved))
    _assert_same_final_state(
        straight_cwd, resumed_cwd, ("state_dict", "optimizer_states", "callbacks", "rng_states")
    )
    straight_losses = {
        r["step"]: r["train_loss_step"] for r in metric_rows(straight_cwd) if r["train_loss_step"]
    }
    resumed_losses = {
        r["step"]: r["train_loss_step"] for r in metric_rows(resumed_cwd) if r["train_loss_step"]
    }
    assert sorted(map(int, resumed_losses)) == list(range(step, STEPS))
    assert {s: straight_losses[s] for s in resumed_losses} == resumed_losses


# FSDP2 runs without dropout and class weights: 2 ranks x batch 8 then train exactly as 1 rank x batch 16
# (up to float rounding), so a 2-rank checkpoint resumed on 1 rank can be checked against the 2-rank run.
FSDP = "configs/fsdp.yaml"
NO_DROPOUT = (
    TINY[:-1] + ', "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pooler_dropout": 0.0}'
)
FSDP_ARGS = (*STEP_FILES, "--model.arch", NO_DROPOUT, "--data.balance", "none")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("fsdp") / "straight"
    return cwd, cli_fit(cwd, data, FSDP, *FSDP_ARGS)


@pytest.mark.slow
def test_fsdp2_fit_writes_one_set_of_sharded_checkpoint_folders(fsdp_run, data) -> None:
    cwd, output = fsdp_run
    folder = cwd / "outputs/checkpoints"
    assert _names(folder) == _expected_checkpoints(cwd)
    assert _names(cwd / "outputs/logs") == {"version_0"}
    files = {INDEX_NAME, "state.safetensors", "shards"}
    assert all((folder / name).is_dir() and _names(folder / name) == files for name in _names(folder))
    index = read_index(folder / LATEST_NAME)
    assert index["shards"] == [shard_name(0, 2), shard_name(1, 2)]
    kinds = {key.split(".")[0] if "EMA" not in key else "ema" for key in index["tensors"]}
    assert kinds == {"state_dict", "optimizer_states", "ema"}  # weights, AdamW moments and EMA: all sharded
    for name in (shard_name(0, 2), shard_name(1, 2), "state.safetensors"):  # latest: hard links, no copy
        assert (folder / LATEST_NAME / name).samefile(folder / step_name(STEPS) / name)
    state = load_checkpoint_state(folder / LATEST_NAME)
    full = DetectorModule(arch=json.loads(NO_DROPOUT), vocab_size=200).state_dict()
    assert {k: v.shape for k, v in state["state_dict"].items()} == {k: v.shape for k, v in full.items()}
    ema = state["callbacks"]["EMACallback"]["ema"]
    assert {k: v.shape for k, v in ema.items()} == {k: v.shape for k, v in full.items()}
    assert len(state["rng_states"]) == 2 and len(state["optimizer_states"][0]["state"]) == len(full)
    assert output.count("`Trainer.fit` stopped: `max_epochs=2` reached.") == 1


@pytest.mark.slow
def test_fsdp2_resume_mid_epoch_equals_the_straight_run(fsdp_run, data) -> None:
    straight_cwd, _ = fsdp_run
    saved = straight_cwd.parent / step_name(4)
    shutil.copytree(straight_cwd / "outputs/checkpoints" / step_name(4), saved)
    resumed_cwd = straight_cwd.parent / "resumed"
    cli_fit(resumed_cwd, data, FSDP, *FSDP_ARGS, "--ckpt_path", str(saved))
    _assert_same_final_state(straight_cwd, resumed_cwd, ("state_dict", "optimizer_states", "callbacks"))
    straight_losses, resumed_losses = _train_losses(straight_cwd), _train_losses(resumed_cwd)
    assert {s: straight_losses[s] for s in resumed_losses} == resumed_losses


@pytest.mark.slow
def test_fsdp2_full_state_files_hold_what_the_sharded_folders_hold(fsdp_run, data) -> None:
    full = ("--trainer.strategy.init_args.save_distributed_checkpoint", "false")
    cwd = fsdp_run[0].parent / "full_state"
    cli_fit(cwd, data, FSDP, *FSDP_ARGS, *full)
    folder = cwd / "outputs/checkpoints"
    assert _names(folder) == _expected_checkpoints(cwd)
    assert all((folder / name).is_file() for name in _names(folder))
    _assert_same_final_state(fsdp_run[0], cwd, ("state_dict", "callbacks"))
    # Sharded optimizer state is numbered in group order, the gathered one in module order.
    latest = (c / "outputs/checkpoints" / LATEST_NAME for c in (fsdp_run[0], cwd))
    sharded, gathered = (load_checkpoint_state(path) for path in latest)
    want, have = (tensors(_by_group_position(s["optimizer_states"])) for s in (sharded, gathered))
    assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)


def _resume_elsewhere(source: Path, name: str, data: dict[str, Path], config: str, *extra: str) -> Path:
    saved = source.parent / f"{name}_{step_name(4)}"
    copy = shutil.copytree if (source / "outputs/checkpoints" / step_name(4)).is_dir() else shutil.copy
    copy(source / "outputs/checkpoints" / step_name(4), saved)
    cwd = source.parent / name
    cli_fit(cwd, data, config, *extra, "--ckpt_path", str(saved))
    assert sorted(map(int, _train_losses(cwd))) == list(range(4, STEPS))
    return cwd


def _assert_close_final_state(straight: Path, resumed: Path) -> None:
    expected = load_checkpoint_state(straight / "outputs/checkpoints" / LATEST_NAME)
    got = load_checkpoint_state(resumed / "outputs/checkpoints" / LATEST_NAME)
    assert got["global_step"] == STEPS
    for part, norm in (("state_dict", dict), ("optimizer_states", _by_group_position)):
        want, have = tensors(norm(expected[part])), tensors(norm(got[part]))
        assert have.keys() == want.keys(), part
        for key, value in want.items():
            torch.testing.assert_close(have[key], value, rtol=1e-4, atol=1e-5, msg=f"{part}: {key}")


def _by_group_position(optimizers: list[dict]) -> dict[str, dict]:
    # A plain optimizer numbers parameters in group order, a gathered FSDP2 one in module order.
    (state,) = optimizers
    place = {
        pid: f"{g}.{j}"
        for g, group in enumerate(state["param_groups"])
        for j, pid in enumerate(group["params"])
    }
    return {place[pid]: value for pid, value in state["state"].items()}


@pytest.mark.slow
def test_fsdp2_two_rank_checkpoint_resumes_on_one_rank(fsdp_run, data) -> None:
    one_rank = ("--trainer.devices", "1", "--data.batch_size", "16")
    cwd = _resume_elsewhere(fsdp_run[0], "one_rank", data, FSDP, *FSDP_ARGS, *one_rank)
    assert len(load_checkpoint_state(cwd / "outputs/checkpoints" / LATEST_NAME)["rng_states"]) == 1
    _assert_close_final_state(fsdp_run[0], cwd)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_one_device_without_fsdp(fsdp_run, data) -> None:
    plain = ("--trainer.strategy", "auto", "--trainer.devices", "1", "--data.batch_size", "16")
    cwd = _resume_elsewhere(fsdp_run[0], "plain", data, "configs/default.yaml", *FSDP_ARGS, *plain)
    _assert_close_final_state(fsdp_run[0], cwd)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp2(ddp_run, data) -> None:
    # Same ranks, data and RNG: only the gradient reduction differs (all-reduce vs reduce-scatter).
    cwd = _resume_elsewhere(ddp_run[0], "ddp_to_fsdp", data, FSDP, *STEP_FILES)
    _assert_close_final_state(ddp_run[0], cwd)


@pytest.mark.slow
def test_fsdp2_export_equals_the_export_of_the_gathered_weights(fsdp_run, tmp_path) -> None:
    cwd, _ = fsdp_run
    from_run = cwd / "outputs/models/inference/model_v1.0_final"
    assert (
        export_main([str(cwd / "outputs/checkpoints" / LATEST_NAME), "--out", str(tmp_path), "--name", "b"])
        == 0
    )
    exported, gathered = (
        load_file(from_run / "model.safetensors"),
        load_file(tmp_path / "b/model.safetensors"),
    )
    assert exported.keys() == gathered.keys()
    assert all(torch.equal(exported[k], gathered[k]) for k in gathered)
    model = DebertaV2ForSequenceClassification.from_pretrained(from_run)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in exported.items())


def test_strategy_refuses_lightnings_pickled_sharded_folders(tmp_path) -> None:
    (tmp_path / "meta.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"folder without index\.json .*pickled meta\.pt"):
        SafetensorsModelParallelStrategy(save_distributed_checkpoint=True).load_checkpoint(tmp_path)


def _two_group_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": weights}, {"params": biases, "weight_decay": 0.0}])


def test_optimizer_state_is_keyed_by_name_through_the_group_positions() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    optimizer = _two_group_optimizer(model)
    model(torch.ones(4, 2)).sum().backward()
    optimizer.step()
    by_name = optimizer_state_by_name(optimizer.state_dict(), optimizer, model)
    params = dict(model.named_parameters())
    assert [g["params"] for g in by_name["param_groups"]] == [["0.weight", "1.weight"], ["0.bias", "1.bias"]]
    for name, state in by_name["state"].items():
        assert torch.equal(state["exp_avg"], optimizer.state[params[name]]["exp_avg"])
    other = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"param groups of sizes \[2, 2\], this one \[4\]"):
        optimizer_state_by_name(optimizer.state_dict(), other, model)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp"])
def test_a_finished_multi_device_run_extends_with_ckpt_path_last(tmp_path, data, config) -> None:
    strategy, extra = (DDP, STEP_FILES) if config == "ddp" else (FSDP, FSDP_ARGS)
    cwd = tmp_path / "run"
    cli_fit(cwd, data, strategy, *extra, "--trainer.max_steps", "4")
    cli_fit(cwd, data, strategy, *extra, "--trainer.max_steps", "8", "--ckpt_path", "last")
    latest = cwd / "outputs/checkpoints" / LATEST_NAME
    assert latest.is_dir() == (config == "fsdp")
    assert read_checkpoint_header(latest)["state"]["global_step"] == 8
    found = {p.name: bundle_origin(p) for p in (cwd / "outputs/models/inference").iterdir()}
    run_id = found["model_v1.0_final"][0]
    assert run_id is not None
    assert found == {
        "model_v1.0_epoch0": (run_id, 6),
        "model_v1.0_final": (run_id, 8),
        "model_v1.0_final_step4": (run_id, 4),
    }
    steps = sorted({int(r["step"]) for r in metric_rows(cwd, version=1) if r["train_loss_step"]})
    assert steps == [4, 5, 6, 7]  # the extension continues at the step the first run stopped
