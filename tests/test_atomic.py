"""Tests for detector.atomic: temp names, commit, links, stale-temp cleanup."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from detector import atomic
from detector.atomic import (
    TEMP_MARKER,
    atomic_link,
    clean_stale_temps,
    commit_file,
    link_tree,
    remove_path,
    replace_dir,
    temp_path_for,
)


def test_temp_path_is_hidden_in_the_same_folder_and_unique(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint_latest.safetensors"
    first, second = temp_path_for(final), temp_path_for(final)
    assert first.parent == tmp_path
    assert first.name.startswith(f".checkpoint_latest.safetensors{TEMP_MARKER}{os.getpid()}-")
    assert first != second


def test_commit_file_replaces_the_final_file(tmp_path: Path) -> None:
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    tmp = temp_path_for(final)
    tmp.write_bytes(b"new")
    commit_file(tmp, final)
    assert final.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_commit_file_refuses_a_temp_in_another_folder(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    tmp = tmp_path / "other" / "x"
    tmp.write_bytes(b"x")
    with pytest.raises(ValueError, match="must be in the folder"):
        commit_file(tmp, tmp_path / "a.bin")


def test_atomic_link_shares_the_inode_and_replaces_the_target(tmp_path: Path) -> None:
    src, final = tmp_path / "epoch_3.safetensors", tmp_path / "best.safetensors"
    src.write_bytes(b"new")
    final.write_bytes(b"old")
    atomic_link(src, final)
    assert final.read_bytes() == b"new"
    assert final.stat().st_ino == src.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "epoch_3.safetensors"]


def test_atomic_link_copies_where_hard_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(atomic.os, "link", refuse)
    src, final = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"data")
    atomic_link(src, final)
    assert final.read_bytes() == b"data"
    assert final.stat().st_ino != src.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_atomic_link_leaves_no_temp_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(atomic.os, "replace", fail)
    src, final = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"data")
    final.write_bytes(b"old")
    with pytest.raises(OSError, match="injected"):
        atomic_link(src, final)
    assert final.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_clean_stale_temps_removes_only_temp_files_and_folders(tmp_path: Path) -> None:
    keep = [
        tmp_path / "checkpoint_latest.safetensors",
        tmp_path / "notes.tmp",
        tmp_path / f"run{TEMP_MARKER}1",
    ]
    stale_file = temp_path_for(keep[0])
    stale_dir = tmp_path / f".bundle{TEMP_MARKER}123-abcd"
    for path in [*keep, stale_file]:
        path.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "weights.safetensors").write_bytes(b"x")
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([stale_file, stale_dir])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_clean_stale_temps_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert clean_stale_temps(tmp_path / "absent") == []


def _tree(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_replace_dir_swaps_a_whole_folder_and_leaves_no_temp(tmp_path: Path) -> None:
    final = _tree(tmp_path / "ckpt", {"old.txt": "old", "sub/a": "1"})
    tmp = _tree(temp_path_for(final), {"new.txt": "new"})
    replace_dir(tmp, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    fresh = _tree(temp_path_for(tmp_path / "other"), {"x": "x"})
    replace_dir(fresh, tmp_path / "other")  # no folder there yet: a plain rename
    assert (tmp_path / "other/x").read_text() == "x"


def test_replace_dir_without_exchange_falls_back_to_two_renames(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    final = _tree(tmp_path / "ckpt", {"old.txt": "old"})
    replace_dir(_tree(temp_path_for(final), {"new.txt": "new"}), final)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (final / "new.txt").read_text() == "new"


def test_replace_dir_refuses_a_temp_in_another_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="must be in the folder of"):
        replace_dir(tmp_path / "a", tmp_path / "b" / "c")


def test_link_tree_hard_links_every_file_and_replaces_the_target(tmp_path: Path) -> None:
    src = _tree(tmp_path / "step_4", {"index.json": "{}", "shards/s0": "0", "shards/s1": "1"})
    final = _tree(tmp_path / "latest", {"stale": "x"})
    link_tree(src, final)
    files = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert files == ["index.json", "shards/s0", "shards/s1"]
    assert all((final / f).samefile(src / f) for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_4"]


def test_remove_path_deletes_folders_files_and_missing_paths(tmp_path: Path) -> None:
    folder = _tree(tmp_path / "ckpt", {"a": "1", "sub/b": "2"})
    (tmp_path / "file").write_text("x")
    for path in (folder, tmp_path / "file", tmp_path / "missing"):
        remove_path(path)
    assert list(tmp_path.iterdir()) == []


def _fsynced(monkeypatch) -> list[str]:
    synced: list[str] = []
    real = atomic.fsync_file
    monkeypatch.setattr(atomic, "fsync_file", lambda path: (synced.append(Path(path).name), real(path)))
    return synced


def test_write_text_commits_through_an_fsynced_temp_beside_the_file(tmp_path: Path, monkeypatch) -> None:
    synced = _fsynced(monkeypatch)
    (tmp_path / "out.json").write_text("old")
    atomic.write_text(tmp_path / "out.json", "new ✓")
    assert (tmp_path / "out.json").read_bytes() == "new ✓".encode()
    [temp] = synced
    assert temp.startswith(f".out.json{TEMP_MARKER}{os.getpid()}-")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_open_for_write_keeps_the_old_file_and_no_temp_when_the_block_fails(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").write_text("old\n")
    with pytest.raises(RuntimeError, match="midway"), atomic.open_for_write(tmp_path / "out.jsonl") as out:
        out.write("half\n")
        raise RuntimeError("midway")
    assert (tmp_path / "out.jsonl").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_new_dir_commits_a_filled_folder_with_every_file_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced = _fsynced(monkeypatch)
    with atomic.new_dir(tmp_path / "bundle") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(f".bundle{TEMP_MARKER}")
        (staging / "sub").mkdir()
        (staging / "a.txt").write_text("a")
        (staging / "sub" / "b.txt").write_text("b")
    assert sorted(synced) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert (tmp_path / "bundle" / "sub" / "b.txt").read_text() == "b"


def test_new_dir_never_replaces_an_existing_folder(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("theirs")
    with pytest.raises(FileExistsError), atomic.new_dir(tmp_path / "bundle"):
        pytest.fail("the block must not run when the folder exists")
    late = tmp_path / "late"
    with (
        pytest.raises(FileExistsError, match="appeared while it was written"),
        atomic.new_dir(late) as staging,
    ):
        (staging / "mine.txt").write_text("mine")
        late.mkdir()
        (late / "keep.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "late"]
    assert [p.name for p in (tmp_path / "late").iterdir()] == ["keep.txt"]


def test_new_dir_removes_the_temp_folder_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="midway"), atomic.new_dir(tmp_path / "bundle") as staging:
        (staging / "a.txt").write_text("a")
        raise RuntimeError("midway")
    assert list(tmp_path.iterdir()) == []
