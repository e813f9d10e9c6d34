"""Tests for the checkpoint command-line tool: list, verify, show, convert."""

from __future__ import annotations

import math
import os
import re
import signal
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from detector.checkpoint.format import load_state, save_state
from detector.checkpoint.rng import capture_rng_state
from detector.commands.checkpoints import (
    convert_checkpoint,
    describe_checkpoint,
    format_table,
    list_checkpoints,
    main,
)
from tests.state_helpers import assert_identical


def _checkpoint(epoch: int, step: int, best: float) -> dict[str, Any]:
    weights = OrderedDict([("layer.weight", torch.ones(3, 4)), ("layer.bias", torch.zeros(3))])
    return {
        "epoch": epoch,
        "global_step": step,
        "state_dict": weights,
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_f1'}": {
                "monitor": "val_f1",
                "best_model_score": torch.tensor(best),
            },
            "TopK": {"best_score": best / 2, "current_score": math.nan, "scores_seen": [1.0, 2.0]},
        },
        "metrics": {"val_loss": 0.5 - epoch / 10, "name": "not a number"},
        "rng": capture_rng_state(),
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    save_state(_checkpoint(1, 10, 0.75), tmp_path / "checkpoint_epoch_1.safetensors")
    save_state(_checkpoint(2, 20, 0.875), tmp_path / "checkpoint_latest.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 4)
    (tmp_path / "notes.txt").write_text("ignored")
    return tmp_path


def test_list_reads_epoch_step_and_metrics_from_headers(folder: Path) -> None:
    rows = list_checkpoints(folder)
    assert [row["file"] for row in rows] == [
        "broken.safetensors",
        "checkpoint_epoch_1.safetensors",
        "checkpoint_latest.safetensors",
    ]
    assert rows[0]["error"].endswith("too short for a safetensors header")
    latest = rows[2]
    assert (latest["epoch"], latest["global_step"], latest["error"]) == (2, 20, None)
    assert latest["metrics"] == {
        "val_loss": pytest.approx(0.3),
        "best_model_score(val_f1)": 0.875,
        "best_score(TopK)": 0.4375,
        "current_score(TopK)": pytest.approx(math.nan, nan_ok=True),
    }


def test_list_command_prints_an_aligned_table(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = ["best_model_score(val_f1)", "best_score(TopK)", "current_score(TopK)", "val_loss"]
    assert lines[0].split() == ["file", "epoch", "step", "size", *metrics]
    cells = [line.split() for line in lines]
    sizes = [row[3:5] for row in cells[1:4]]
    assert [row[:3] + row[5:] for row in cells[1:4]] == [
        ["broken.safetensors", "-", "-", "-", "-", "-", "-"],
        ["checkpoint_epoch_1.safetensors", "1", "10", "0.75", "0.375", "nan", "0.4"],
        ["checkpoint_latest.safetensors", "2", "20", "0.875", "0.4375", "nan", "0.3"],
    ]
    assert sizes[0] == ["4", "B"] and sizes[1][1] == sizes[2][1] == "KiB"
    assert lines[
        4
    ] == f"unreadable: {folder / 'broken.safetensors'}: not a checkpoint: 4 bytes, too short " + (
        "for a safetensors header"
    )
    assert lines[0].index("epoch") == lines[3].index("2  ")  # columns line up
    assert format_table(list_checkpoints(folder)) == "\n".join(lines)


def test_verify_exits_1_naming_the_failing_file(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = folder / "checkpoint_latest.safetensors", folder / "broken.safetensors"
    assert main(["verify", str(good)]) == 0
    assert capsys.readouterr().out == f"OK     {good}\n"
    assert main(["verify", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"OK     {good}"
    assert out[1].startswith(f"FAILED {bad}: not a checkpoint")


def test_verify_catches_corrupt_data_that_list_does_not_read(folder: Path) -> None:
    path = folder / "checkpoint_latest.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert list_checkpoints(folder)[2]["epoch"] == 2
    assert main(["verify", str(path)]) == 1


def test_show_prints_the_tree_with_tensor_shapes_and_scalars(folder: Path) -> None:
    text = describe_checkpoint(folder / "checkpoint_latest.safetensors")
    lines = text.splitlines()
    assert lines[0].startswith(f"{folder / 'checkpoint_latest.safetensors'}: format v1, ")
    assert "'epoch': 2" in lines
    assert "'state_dict': OrderedDict (2 entries)" in lines
    assert "  'layer.weight': tensor float32 [3, 4] (48 B)" in lines
    assert "    'scores_seen': list [1.0, 2.0] (2 items)" in lines
    assert "    'current_score': nan" in lines
    assert any(line.startswith("  'python': tuple (3 items)") for line in lines)
    assert "    1: ndarray uint32 [624] (2.4 KiB)" in lines  # NumPy's RNG key
    assert "  'torch': tensor uint8 [5056] (4.9 KiB)" in lines
    assert lines[-1].startswith("5 tensors, 7.4 KiB; checksum ")
    assert lines[-1].endswith("(not verified here)")


def test_show_command_limits_entries_per_container(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(folder / "checkpoint_latest.safetensors"), "--max-items", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == ["'epoch': 2", "'global_step': 20", "... 4 more"]


def test_convert_turns_a_torch_checkpoint_into_the_same_state(tmp_path: Path) -> None:
    source, target = tmp_path / "last.ckpt", tmp_path / "last.safetensors"
    state = _checkpoint(3, 30, 0.5)
    del state["rng"]  # NumPy arrays are not weights_only-loadable, as in Lightning's own .ckpt files
    state["optimizer_states"] = [
        {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.99)}]}
    ]
    torch.save(state, source)
    assert main(["convert", str(source), str(target)]) == 0
    assert_identical(load_state(target), torch.load(source, weights_only=True))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_convert_refuses_a_pickle_with_code_in_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, source)
    with pytest.raises(ValueError, match=r"evil.ckpt: torch.load\(weights_only=True\) refused it"):
        convert_checkpoint(source, tmp_path / "out.safetensors")
    assert main(["convert", str(source), str(tmp_path / "out.safetensors")]) == 1
    assert "refused it" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_list_of_a_missing_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'absent'} is not a folder\n"


def test_list_reads_the_metrics_of_the_file_step_from_the_tracker_history(tmp_path: Path) -> None:
    history = [
        {"epoch": 0, "step": 6, "metrics": {"val_f1": 0.5, "train_loss_step": 0.9}},
        {"epoch": 1, "step": 12, "metrics": {"val_f1": 0.75, "val_loss": 0.25, "train_loss_epoch": 0.3}},
    ]
    tracker = {"tracker": {"mode": "max", "history": history}}
    for step in (12, 16):
        state = {"epoch": 1, "global_step": step, "callbacks": {"SafetensorsTopKCheckpoint": tracker}}
        save_state(state, tmp_path / f"checkpoint_step_{step}.safetensors")
    rows = {row["file"]: row["metrics"] for row in list_checkpoints(tmp_path)}
    assert rows == {
        "checkpoint_step_12.safetensors": {"val_f1": 0.75, "val_loss": 0.25},
        "checkpoint_step_16.safetensors": {},
    }


def _hostile(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    if kind == "deep":  # a 60k-deep nested header: json recursion, not a format error, on main
        raw = b'{"__metadata__":' + b"[" * 60_000 + b"]" * 60_000 + b"}"
        path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)
    return path


HOSTILE = {
    "deep": "header JSON is nested too deeply",
    "folder": "not a regular file but a folder",
    "fifo": r"not a regular file but a FIFO \(named pipe\)",
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize("verb", ["verify", "show"])
def test_hostile_files_are_refused_with_one_line_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, verb: str
) -> None:
    path = _hostile(tmp_path, kind)
    signal.alarm(20)  # a FIFO opened for reading blocks until a writer comes: fail, don't hang
    try:
        assert main([verb, str(path)]) == 1
    finally:
        signal.alarm(0)
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line]
    assert len(lines) == 1 and re.search(rf"{re.escape(str(path))}: {HOSTILE[kind]}", lines[0]), lines


def test_list_reports_every_hostile_file_and_keeps_listing(tmp_path: Path, capsys) -> None:
    save_state(_checkpoint(1, 10, 0.5), tmp_path / "checkpoint_epoch_1.safetensors")
    for kind in HOSTILE:
        _hostile(tmp_path, kind)
    assert main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint_epoch_1.safetensors  1      10" in out
    for kind, problem in HOSTILE.items():
        assert re.search(rf"unreadable: .*{kind}.safetensors: {problem}", out), out


def test_convert_refuses_what_is_not_a_lightning_ckpt(tmp_path: Path, capsys) -> None:
    ours, plain = tmp_path / "ours.safetensors", tmp_path / "plain.safetensors"
    save_state(_checkpoint(1, 10, 0.5), ours)
    safetensors.torch.save_file({"w": torch.ones(2)}, plain)
    weights_only = tmp_path / "weights.ckpt"
    torch.save({"w": torch.ones(2)}, weights_only)
    evil, marker = tmp_path / "evil.safetensors", tmp_path / "pwned"  # torch.load sends *.safetensors paths
    torch.save({"state_dict": {}, "x": _Payload(marker)}, evil)  # to safetensors: read from an open file
    cases = {
        evil: r"torch.load\(weights_only=True\) refused it: WeightsUnpickler error: Unsupported global",
        ours: "already a detector safetensors checkpoint; nothing to convert",
        plain: r"not a Lightning .ckpt \(neither torch.save's zip nor a pickle",
        weights_only: r"a pickle but not a Lightning checkpoint \(no 'state_dict' mapping; keys \['w'\]\)",
        _hostile(tmp_path, "fifo"): r"not a regular file but a FIFO",
        _hostile(tmp_path, "folder"): r"not a regular file but a folder",
    }
    for source, problem in cases.items():
        target = tmp_path / "out.safetensors"
        assert main(["convert", str(source), str(target)]) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(rf"error: {re.escape(str(source))}: {problem}.*\n", err), err
        assert not target.exists()
    assert not marker.exists()
