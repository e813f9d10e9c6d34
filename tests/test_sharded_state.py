"""The sharded checkpoint folder: layout, atomic commit, resharding load, assembly, verification errors."""

from __future__ import annotations

import json
import shutil
import socket
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from multi_device_helpers import tensors
from safetensors.torch import load_file

from detector.atomic import TEMP_MARKER
from detector.checkpoint.format import CheckpointFormatError, load_state, save_state
from detector.checkpoint.sharded import (
    INDEX_NAME,
    SHARDED_TAG,
    STATE_NAME,
    fill_sharded,
    is_sharded_checkpoint,
    load_sharded_state,
    read_index,
    shard_name,
    split_sharded,
    state_file,
    verify_sharded_state,
)
from tests.sharded_helpers import load_worker, save_worker, toy_model


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(worker, nprocs: int, *args: str) -> None:
    mp.start_processes(worker, args=(nprocs, _port(), *args), nprocs=nprocs, start_method="spawn")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A 2-rank FSDP2 save of the toy model after 3 AdamW steps."""
    folder = tmp_path_factory.mktemp("sharded") / "checkpoint_latest.safetensors"
    _run(save_worker, 2, str(folder))
    return folder


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """The same 3 steps on one process without FSDP: the full values the shards must add up to."""
    model = toy_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(3):
        model(torch.full((2, 3), float(step + 1))).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    names = dict(zip(map(id, model.parameters()), dict(model.named_parameters()), strict=True))
    full = {f"state_dict.{k}": v.detach() for k, v in model.state_dict().items()}
    for param, state in optimizer.state.items():
        for kind in ("exp_avg", "exp_avg_sq"):
            full[f"optimizer_states.0.state.{names[id(param)]}.{kind}"] = state[kind]
    return full


def test_split_and_fill_round_trip_keeps_container_types() -> None:
    state = {"a": OrderedDict(w=torch.ones(2)), "b": [1, (torch.zeros(1), "x")]}
    rest, found = split_sharded(state)
    assert found == {} and rest == state
    marker = {"sd": OrderedDict(w={SHARDED_TAG: "sd.w"}), "l": [({SHARDED_TAG: "l.0.0"},)]}
    filled = fill_sharded(marker, {"sd.w": torch.ones(1), "l.0.0": torch.zeros(1)})
    assert type(filled["sd"]) is OrderedDict and type(filled["l"][0]) is tuple
    assert torch.equal(filled["sd"]["w"], torch.ones(1)) and torch.equal(filled["l"][0][0], torch.zeros(1))


@pytest.mark.slow
def test_two_rank_save_writes_one_folder_with_index_state_and_a_shard_per_rank(saved: Path) -> None:
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no temp left beside it
    files = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    assert files == sorted([INDEX_NAME, STATE_NAME, shard_name(0, 2), shard_name(1, 2)])
    index = read_index(saved)
    assert index["world_size"] == 2 and index["shards"] == [shard_name(0, 2), shard_name(1, 2)]
    assert index["tensors"]["state_dict.0.weight"] == {"dtype": "F32", "shape": [5, 3]}
    assert is_sharded_checkpoint(saved) and state_file(saved) == saved / STATE_NAME
    rest = load_state(saved / STATE_NAME)
    assert rest["global_step"] == 3 and torch.equal(rest["rng"], torch.arange(4, dtype=torch.uint8))
    assert rest["state_dict"]["0.weight"] == {SHARDED_TAG: "state_dict.0.weight"}
    assert torch.is_tensor(rest["optimizer_states"][0]["state"]["0.weight"]["step"])  # plain: not sharded
    rows = [load_file(saved / shard_name(r, 2))["state_dict.0.weight"].shape[0] for r in range(2)]
    assert rows == [3, 2]  # FSDP2's uneven split of 5 rows, each rank's own chunk only


@pytest.mark.slow
def test_assembled_load_equals_the_unsharded_training(saved: Path, reference) -> None:
    state = load_sharded_state(saved)
    found = tensors(state)
    for key, value in reference.items():
        torch.testing.assert_close(found[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_dcp_load_reshards_onto_any_rank_count(saved: Path, reference, tmp_path: Path, ranks: int) -> None:
    out = tmp_path / "loaded.safetensors"
    _run(load_worker, ranks, str(saved), str(out))
    loaded = load_file(out)
    assert bool(loaded.pop("extras_same_objects"))  # the returned state holds the filled targets
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _copy(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / saved.name
    shutil.copytree(saved, copy)
    return copy


@pytest.mark.slow
def test_a_flipped_byte_in_a_shard_fails_naming_the_file(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    shard = folder / shard_name(1, 2)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"{shard}.*checksum"):
        load_sharded_state(folder)


@pytest.mark.slow
def test_a_missing_shard_or_index_fails_clearly(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    (folder / shard_name(0, 2)).unlink()
    with pytest.raises(CheckpointFormatError, match=rf"{folder / shard_name(0, 2)}: missing \(listed in"):
        verify_sharded_state(folder)
    (folder / INDEX_NAME).write_text('{"format": "other"}')
    with pytest.raises(CheckpointFormatError, match=r"not a detector\.sharded-state index"):
        load_sharded_state(folder)


@pytest.mark.slow
def test_a_shard_from_another_save_that_leaves_a_gap_is_refused(saved: Path, tmp_path: Path) -> None:
    folder = _copy(saved, tmp_path)
    shard = folder / shard_name(1, 2)
    tensors = load_file(shard)
    offsets = {k: {"saved_offsets": [0] * v.dim()} for k, v in tensors.items()}  # overlaps rank 0's rows
    save_state(tensors, shard, metadata={"DCP_SHARDING_INFO": json.dumps(offsets)})
    with pytest.raises(CheckpointFormatError, match="do not cover it exactly once"):
        verify_sharded_state(folder)


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint_latest.safetensors"
    with pytest.raises(CheckpointFormatError, match=r"state\['bad'\]: cannot store value of type object"):
        from detector.checkpoint.sharded import save_sharded_state

        save_sharded_state({"bad": object()}, folder)
    assert list(tmp_path.iterdir()) == []
    assert not any(TEMP_MARKER in p.name for p in tmp_path.iterdir())


@pytest.mark.slow
def test_checkpoint_tool_lists_verifies_and_shows_a_sharded_folder(
    saved: Path, tmp_path: Path, capsys
) -> None:
    from detector.commands.checkpoints import main as tool

    folder = _copy(saved, tmp_path)
    assert tool(["list", str(tmp_path)]) == 0
    assert f"{folder.name}/" in capsys.readouterr().out
    assert tool(["verify", str(folder)]) == 0
    assert capsys.readouterr().out == f"OK     {folder}\n"
    assert tool(["show", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert f"{folder}: sharded over 2 ranks (2 shard files)" in shown
    assert "'0.weight': tensor float32 [5, 3]" in shown
    (folder / shard_name(1, 2)).write_bytes(b"\0" * 16)
    assert tool(["verify", str(folder)]) == 1
    assert str(folder / shard_name(1, 2)) in capsys.readouterr().out


def test_extra_metadata_cannot_replace_the_formats_own_entries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="may not replace the format's own entries"):
        save_state({}, tmp_path / "x.safetensors", metadata={"checksum": "none"})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_callback_links_and_rotates_whole_folders(tmp_path: Path) -> None:
    from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
    from detector.checkpoint.topk import LATEST_NAME, best_name, step_name

    callback = SafetensorsTopKCheckpoint(dirpath=str(tmp_path))
    for step in (1, 2):
        for name in (INDEX_NAME, STATE_NAME, shard_name(0, 2), shard_name(1, 2)):
            (tmp_path / step_name(step) / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / step_name(step) / name).write_text(f"{step} {name}")
    callback._link_and_rotate(tmp_path / step_name(1), [LATEST_NAME], [])
    callback._link_and_rotate(tmp_path / step_name(2), [LATEST_NAME, best_name("val_f1")], [step_name(1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [step_name(2), LATEST_NAME, best_name("val_f1")]
    )  # step 1 deleted, no temp left
    for name in (INDEX_NAME, shard_name(1, 2)):
        assert (tmp_path / LATEST_NAME / name).samefile(tmp_path / step_name(2) / name)
        assert (tmp_path / best_name("val_f1") / name).samefile(tmp_path / step_name(2) / name)


def test_a_sharded_latest_stays_loadable_when_the_writer_is_killed_at_any_moment(tmp_path: Path) -> None:
    """SIGKILL a process that keeps replacing a sharded folder; each time the folder is whole and verifies."""
    import multiprocessing
    import time

    from detector.atomic import clean_stale_temps
    from tests.state_helpers import save_sharded_forever

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["detector.checkpoint.sharded", "tests.state_helpers"])
    path, version, killed_mid_write = tmp_path / "checkpoint_latest.safetensors", 0, 0
    for delay in [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4]:
        ready = context.Event()
        child = context.Process(
            target=save_sharded_forever, args=(str(path), version + 1, ready), daemon=True
        )
        child.start()
        assert ready.wait(timeout=60), "the child never completed a save"
        time.sleep(delay)
        child.kill()
        child.join()
        verify_sharded_state(path)
        state = load_sharded_state(path)
        assert state["version"] > version
        version = state["version"]
        assert torch.equal(state["w"], torch.full((5_000_000,), float(version)))
        killed_mid_write += len(clean_stale_temps(tmp_path))
        assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert killed_mid_write > 0  # some kills did land inside a write


def test_async_save_is_refused_for_sharded_checkpoints(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
    from detector.checkpoint.plugin import SafetensorsCheckpointIO

    strategy = SimpleNamespace(checkpoint_io=SafetensorsCheckpointIO(), saves_sharded=True)
    trainer = SimpleNamespace(strategy=strategy, is_global_zero=True)
    callback = SafetensorsTopKCheckpoint(dirpath=str(tmp_path), async_save=True)
    with pytest.raises(ValueError, match=r"async_save is not supported with sharded checkpoints"):
        callback.setup(trainer, None, "fit")
    SafetensorsTopKCheckpoint(dirpath=str(tmp_path)).setup(trainer, None, "fit")  # sync: fine


@pytest.mark.slow
def test_a_rank_that_fails_to_save_makes_every_rank_raise_and_leaves_nothing(tmp_path: Path) -> None:
    from tests.sharded_helpers import failing_save_worker

    folder = tmp_path / "checkpoint_latest.safetensors"
    _run(failing_save_worker, 2, str(folder))
    messages = [(tmp_path / f"{folder.name}.rank{r}").read_text() for r in range(2)]
    assert messages[0] == messages[1]  # the same error on both ranks: neither waits for the other
    expected = f"CollectiveError: saving {folder} failed: rank 1: OSError: [Errno 28] No space left"
    assert messages[0].startswith(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{folder.name}.rank0", f"{folder.name}.rank1"]


def test_a_replaced_folder_is_deleted_in_the_background_after_the_new_one_is_in_place(
    tmp_path: Path, monkeypatch
) -> None:
    import detector.checkpoint.sharded as sharded
    from detector.checkpoint.reclaim import reclaim_later, wait_reclaimed

    folder = tmp_path / "checkpoint_latest.safetensors"
    sharded.save_sharded_state({"version": torch.tensor(1)}, folder)
    old_index = (folder / INDEX_NAME).stat().st_ino
    handed: list[tuple[bool, bool]] = []

    def reclaim(hidden: Path) -> None:  # at hand-over: the new folder is committed, the old one hidden
        handed.append((TEMP_MARKER in hidden.name, (hidden / INDEX_NAME).stat().st_ino == old_index))
        assert (folder / INDEX_NAME).stat().st_ino != old_index
        assert int(load_sharded_state(folder)["version"]) == 2
        reclaim_later(hidden)

    monkeypatch.setattr(sharded, "reclaim_later", reclaim)
    sharded.save_sharded_state({"version": torch.tensor(2)}, folder)
    assert handed == [(True, True)]
    wait_reclaimed()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # the hidden old folder is gone
