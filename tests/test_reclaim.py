"""Tests for replacing a checkpoint: the old file is freed after the commit, in the background."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detector.checkpoint.format as fmt
from detector.atomic import TEMP_MARKER, clean_stale_temps
from detector.checkpoint.format import load_state, save_state
from detector.checkpoint.reclaim import set_aside, wait_reclaimed


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_replacing_frees_the_old_file_only_after_the_new_one_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint_latest.safetensors"
    save_state({"w": torch.zeros(4)}, path)
    old_inode, events = path.stat().st_ino, []
    real_commit, real_reclaim = fmt.commit_file, fmt.reclaim_later

    def commit(tmp: Path, final: Path) -> None:
        hidden = [p for p in tmp_path.iterdir() if p.stat().st_ino == old_inode and p != path]
        events.append(("commit", [p.name.startswith(f".{path.name}{TEMP_MARKER}") for p in hidden]))
        real_commit(tmp, final)

    def reclaim(hidden: Path) -> None:
        events.append(("reclaim", [path.stat().st_ino != old_inode, hidden.stat().st_ino == old_inode]))
        real_reclaim(hidden)

    monkeypatch.setattr(fmt, "commit_file", commit)
    monkeypatch.setattr(fmt, "reclaim_later", reclaim)
    save_state({"w": torch.ones(4)}, path)
    # The old file has a hidden second name at the rename, and is handed over only once the new file holds
    # the name (commit_file has fsynced it and the folder).
    assert events == [("commit", [True]), ("reclaim", [True, True])]
    wait_reclaimed()
    assert _names(tmp_path) == [path.name]
    assert torch.equal(load_state(path)["w"], torch.ones(4))


def test_a_failed_commit_keeps_the_old_file_and_leaves_no_hidden_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint_latest.safetensors"
    save_state({"w": torch.zeros(4)}, path)

    def fail(tmp: Path, final: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fmt, "commit_file", fail)
    with pytest.raises(OSError, match="Input/output error"):
        save_state({"w": torch.ones(4)}, path)
    wait_reclaimed()
    assert _names(tmp_path) == [path.name]
    assert torch.equal(load_state(path)["w"], torch.zeros(4))


def test_a_file_another_name_still_links_is_not_set_aside(tmp_path: Path) -> None:
    path, best = tmp_path / "checkpoint_latest.safetensors", tmp_path / "checkpoint_best_val_f1.safetensors"
    save_state({"w": torch.zeros(4)}, path)
    os.link(path, best)
    assert set_aside(path) is None  # the rename frees nothing: best keeps the blocks
    assert set_aside(tmp_path / "missing.safetensors") is None
    save_state({"w": torch.ones(4)}, path)
    wait_reclaimed()
    assert _names(tmp_path) == sorted([path.name, best.name])
    assert torch.equal(load_state(best)["w"], torch.zeros(4))
    assert torch.equal(load_state(path)["w"], torch.ones(4))


def test_a_hidden_name_left_by_a_crash_is_a_stale_temp(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.safetensors"
    save_state({"w": torch.zeros(4)}, path)
    hidden = set_aside(path)  # a crash between this and the reclaim leaves the hidden name
    assert hidden is not None and hidden.parent == tmp_path
    assert clean_stale_temps(tmp_path) == [hidden]
    assert _names(tmp_path) == [path.name]


def test_a_process_that_exits_right_after_a_replacing_save_leaves_no_hidden_name(tmp_path: Path) -> None:
    child = """
import pathlib, sys, time
import torch
from detector.checkpoint.format import save_state
unlink = pathlib.Path.unlink
def slow_unlink(self, missing_ok=False):
    time.sleep(0.5)  # the background delete is still running when the main thread returns
    unlink(self, missing_ok)
pathlib.Path.unlink = slow_unlink
path = pathlib.Path(sys.argv[1])
save_state({"w": torch.zeros(4)}, path)
save_state({"w": torch.ones(4)}, path)
"""
    path = tmp_path / "checkpoint_latest.safetensors"
    subprocess.run([sys.executable, "-c", child, str(path)], check=True, cwd=Path(__file__).parents[1])
    assert _names(tmp_path) == [path.name]
    assert torch.equal(load_state(path)["w"], torch.ones(4))
