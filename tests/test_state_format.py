"""Tests for the state format: exact round trips, aliasing, atomic saves, and every corruption error."""

from __future__ import annotations

import base64
import json
import math
import multiprocessing
import pickle
import struct
import time
from collections import defaultdict, namedtuple
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from detector.__main__ import main as detector_main
from detector.atomic import clean_stale_temps
from detector.checkpoint import format as state_format
from detector.checkpoint import layout as state_layout
from detector.checkpoint import pieces as piece_io
from detector.checkpoint.format import (
    CheckpointFormatError,
    TensorInfo,
    flatten_state,
    load_state,
    read_header,
    save_state,
    snapshot_state,
    unflatten_state,
    verify_state,
)
from tests.state_helpers import assert_identical, every_type_state, save_forever


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _small_state() -> dict[str, Any]:
    return {"epoch": 2, "w": torch.arange(4, dtype=torch.float32), "loss": 0.25}


# --- round trips -----------------------------------------------------------------------------------


def test_flatten_then_unflatten_restores_every_value_type_exactly() -> None:
    state = every_type_state()
    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton, allow_nan=False)  # the skeleton is strict JSON
    assert all(isinstance(tensor, torch.Tensor) for tensor in tensors.values())
    assert_identical(unflatten_state(tensors, skeleton), state)


def test_save_load_round_trip_restores_every_value_type_exactly(tmp_path: Path) -> None:
    state = every_type_state()
    save_state(state, tmp_path / "state.safetensors")
    assert_identical(load_state(tmp_path / "state.safetensors"), state)
    assert _files(tmp_path) == ["state.safetensors"]


def test_mmap_load_restores_every_value_type_and_never_writes_the_file(tmp_path: Path) -> None:
    state, path = every_type_state(), tmp_path / "state.safetensors"
    save_state(state, path)
    loaded = load_state(path, mmap=True)
    assert_identical(loaded, state)
    loaded["state_dict"]["layer.weight"].add_(1)  # copy-on-write: the file keeps its bytes
    verify_state(path)
    assert_identical(load_state(path), state)
    path.unlink()  # the mapping outlives the name
    assert torch.equal(loaded["state_dict"]["layer.bias"], torch.zeros(3))


def test_saved_file_is_plain_safetensors_with_detector_metadata(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    save_state({"a": torch.ones(2, 3), "b": torch.arange(3, dtype=torch.int8), "epoch": 1}, path)
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert torch.equal(f.get_tensor("a"), torch.ones(2, 3))
        metadata = f.metadata()
    assert metadata["format"] == "detector.state" and metadata["format_version"] == "1"
    kind, digest = metadata["checksum"].split(":")
    assert kind == "xxh3-tree" and len(digest) == 64
    assert json.loads(metadata["skeleton"])["epoch"] == 1


def test_tensor_data_is_aligned_to_its_element_size(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    state = {
        "i8": torch.ones(3, dtype=torch.int8),
        "f64": torch.ones(3, dtype=torch.float64),
        "f16": torch.ones(1).half(),
    }
    save_state(state, path)
    header = read_header(path)
    for info in header["tensors"].values():
        assert (header["data_offset"] + info.start) % info.dtype.itemsize == 0, info


@pytest.mark.parametrize("threaded_from", [0, 1 << 20])
def test_tensors_spanning_several_pieces_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded_from: int
) -> None:
    monkeypatch.setattr(piece_io, "PIECE_BYTES", 24)
    monkeypatch.setattr(piece_io, "_THREADED_PIECE_BYTES", threaded_from)
    state = {"big": torch.randn(101), "small": torch.arange(3), "odd": torch.ones(7, dtype=torch.int8)}
    save_state(state, tmp_path / "s.safetensors")
    assert_identical(load_state(tmp_path / "s.safetensors"), state)
    assert_identical(load_state(tmp_path / "s.safetensors", mmap=True), state)
    verify_state(tmp_path / "s.safetensors")


def test_a_mapped_load_hashes_batches_in_threads_and_still_catches_any_flipped_data_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(piece_io, "PIECE_BYTES", 24)  # 7 pieces, one batch each: hashed on the pool
    calls: list[int] = []
    digest = piece_io.PIECE_DIGESTS["xxh3-tree"]
    monkeypatch.setitem(
        piece_io.PIECE_DIGESTS, "xxh3-tree", lambda piece: calls.append(len(piece)) or digest(piece)
    )
    state = {"big": torch.randn(30), "small": torch.arange(3), "odd": torch.ones(7, dtype=torch.int8)}
    path = tmp_path / "s.safetensors"
    save_state(state, path)
    calls.clear()
    assert_identical(load_state(path, mmap=True), state)
    assert sorted(calls) == [7] + [24] * 6  # every data byte hashed once
    original = path.read_bytes()
    start = read_header(path)["data_offset"]
    for position in range(start, len(original)):
        corrupt = bytearray(original)
        corrupt[position] ^= 0x80
        path.write_bytes(corrupt)
        with pytest.raises(CheckpointFormatError, match=f"{path}: checksum mismatch"):
            load_state(path, mmap=True)


def test_sha256_checksum_kind_round_trips_and_is_named_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    save_state(_small_state(), path, checksum="sha256-tree")
    assert read_header(path)["checksum"].startswith("sha256-tree:")
    assert_identical(load_state(path), _small_state())
    with pytest.raises(ValueError, match="checksum must be one of"):
        save_state(_small_state(), path, checksum="md5")


def test_a_short_read_in_a_worker_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path)
    monkeypatch.setattr(piece_io, "_THREADED_PIECE_BYTES", 0)
    monkeypatch.setattr(piece_io.os, "preadv", lambda fd, buffers, offset: 0)
    with pytest.raises(CheckpointFormatError, match=f"{path}: truncated while reading tensor 'w'"):
        load_state(path)


def test_load_moves_tensors_to_map_location(tmp_path: Path) -> None:
    save_state({"w": torch.ones(2)}, tmp_path / "s.safetensors")
    assert load_state(tmp_path / "s.safetensors", map_location="meta")["w"].device.type == "meta"
    with pytest.raises(ValueError, match="map_location must be a device"):
        load_state(tmp_path / "s.safetensors", map_location=lambda storage, loc: storage)  # type: ignore[arg-type]


# --- aliasing and layout ---------------------------------------------------------------------------


def test_a_tensor_met_twice_is_stored_once_and_loads_aliased(tmp_path: Path) -> None:
    shared = torch.randn(4, 4)
    state = {
        "decoder.weight": shared,
        "embeddings.weight": shared,
        "detached": shared.detach(),
        "other": shared + 0,
    }
    tensors, _ = flatten_state(state)
    assert sorted(tensors) == ["decoder.weight", "other"]
    save_state(state, tmp_path / "s.safetensors")
    loaded = load_state(tmp_path / "s.safetensors")
    assert loaded["decoder.weight"] is loaded["embeddings.weight"] is loaded["detached"]
    assert loaded["other"] is not loaded["decoder.weight"]
    assert_identical(loaded, state)


def test_views_and_non_contiguous_tensors_round_trip_as_their_values(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "base": base,
        "transposed": base.t(),
        "row": base[1],
        "strided": base[:, ::2],
        "expanded": torch.arange(3.0).expand(4, 3),
        "conj": torch.tensor([1 + 1j], dtype=torch.complex64).conj(),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    save_state(state, tmp_path / "s.safetensors")
    loaded = load_state(tmp_path / "s.safetensors")
    for key, tensor in state.items():
        assert loaded[key].is_contiguous() and not loaded[key].requires_grad
        assert torch.equal(loaded[key], tensor.detach().resolve_conj()), key
    loaded["row"][0] = -1  # views come back as independent tensors
    assert loaded["base"][1, 0] == 6


# --- what cannot be stored -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (lambda x: x, "function"),
        (defaultdict(int), "defaultdict"),
        (namedtuple("Point", "x y")(1, 2), "Point"),
        (IntEnum("Mode", "A B").A, "Mode"),
        ({1, 2}, "set"),
        (object(), "object"),
        (1 + 2j, "complex"),
    ],
)
def test_unrepresentable_value_fails_the_save_naming_its_key(
    tmp_path: Path, value: Any, type_name: str
) -> None:
    state = {"callbacks": {"Foo": {"fn": value}}}
    expected = f"state['callbacks']['Foo']['fn']: cannot store value of type {type_name}"
    with pytest.raises(CheckpointFormatError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        save_state(state, tmp_path / "s.safetensors")
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (torch.ones(2, dtype=torch.complex128), "dtype torch.complex128"),
        (torch.ones(2).to_sparse(), "torch.sparse_coo tensor"),
        (torch.empty(2, device="meta"), "on meta"),
        (np.array(["a"]), "NumPy array of dtype <U1"),
        (np.ones(2, dtype=">f4"), "NumPy array of dtype >f4"),
    ],
)
def test_unstorable_tensors_and_arrays_are_refused_naming_the_key(value: Any, problem: str) -> None:
    with pytest.raises(CheckpointFormatError, match=rf"state\['opt'\]\[0\]: cannot store .*{problem}"):
        flatten_state({"opt": [value]})


# --- failed saves ----------------------------------------------------------------------------------


def test_failure_mid_stream_leaves_no_temp_and_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint_latest.safetensors"
    save_state({"version": 1, "w": torch.zeros(3)}, path)
    calls = []
    real_byte_view = state_format.byte_view

    def failing_byte_view(tensor: torch.Tensor) -> memoryview:
        calls.append(tensor)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_byte_view(tensor)

    monkeypatch.setattr(state_format, "byte_view", failing_byte_view)
    with pytest.raises(OSError, match="injected"):
        save_state({"version": 2, "a": torch.ones(3), "b": torch.ones(3)}, path)
    assert len(calls) == 2
    assert _files(tmp_path) == ["checkpoint_latest.safetensors"]
    assert_identical(load_state(path), {"version": 1, "w": torch.zeros(3)})


def test_failure_at_the_rename_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.safetensors"
    save_state({"version": 1}, path)

    def failing_replace(src: Path, dst: Path) -> None:
        raise OSError("rename failed (injected)")

    monkeypatch.setattr("detector.atomic.os.replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        save_state({"version": 2}, path)
    assert _files(tmp_path) == ["s.safetensors"]
    assert load_state(path) == {"version": 1}


# --- corrupt, foreign and hostile files ------------------------------------------------------------


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "s.safetensors"
    save_state(_small_state(), path)
    return path


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -17, -1])
def test_truncated_file_fails_with_a_clear_error(tmp_path: Path, keep: int) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointFormatError, match=rf"{path}: .*(truncated|too short|not valid JSON)"):
        load_state(path)
    with pytest.raises(CheckpointFormatError):
        verify_state(path)


@pytest.mark.parametrize(
    ("kind", "mmap"),
    [
        ("xxh3-tree", False),
        ("xxh3-tree", True),
        ("crc32-tree", False),
        ("sha256-tree", False),
        ("crc32-tree", True),
    ],
)
def test_every_single_byte_flip_is_detected(tmp_path: Path, kind: str, mmap: bool) -> None:
    path = tmp_path / "s.safetensors"
    save_state(_small_state(), path, checksum=kind)
    original = path.read_bytes()
    for position in range(len(original)):
        corrupt = bytearray(original)
        corrupt[position] ^= 0x01
        path.write_bytes(corrupt)
        with pytest.raises(CheckpointFormatError, match=str(path)):
            load_state(path, mmap=mmap)


def test_flipped_byte_in_tensor_data_is_a_checksum_mismatch(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(CheckpointFormatError, match="checksum mismatch, the file is corrupt"):
        load_state(path)
    assert read_header(path)["state"]["epoch"] == 2  # the header alone is still readable


def test_edited_header_value_is_a_checksum_mismatch(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    assert data.count(b'\\"epoch\\":2') == 1
    path.write_bytes(data.replace(b'\\"epoch\\":2', b'\\"epoch\\":9'))
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        load_state(path)


class _Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payload_renamed_safetensors_is_refused_without_running_it(
    tmp_path: Path, writer: str
) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "checkpoint_latest.safetensors"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()  # the payload is live
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    else:
        torch.save({"state_dict": _Payload(marker)}, path)
    for reader in (load_state, verify_state, read_header):
        with pytest.raises(CheckpointFormatError, match=rf"{path}: a pickle file .* it was not loaded"):
            reader(path)
    assert not marker.exists()


def test_oversized_header_length_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}" + b" " * 6)
    with pytest.raises(
        CheckpointFormatError, match="header length 4611686018427387904 exceeds the 100000000-byte"
    ):
        load_state(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}" + b" " * 6)
    with pytest.raises(CheckpointFormatError, match="header length 1000 does not fit in 16 bytes"):
        load_state(path)


def test_header_over_the_limit_is_refused_even_when_the_file_is_long_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved(tmp_path)
    monkeypatch.setattr(state_layout, "MAX_HEADER_BYTES", 64)
    with pytest.raises(CheckpointFormatError, match="exceeds the 64-byte limit"):
        read_header(path)


def test_garbage_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    path.write_bytes(struct.pack("<Q", 8) + b"\xff\xfe{garb!")
    with pytest.raises(CheckpointFormatError, match="header is not valid JSON"):
        load_state(path)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, path)
    with pytest.raises(
        CheckpointFormatError, match=rf"{path}: a safetensors file without detector state metadata"
    ):
        load_state(path)
    save_file({"w": torch.ones(2)}, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="without detector state metadata"):
        load_state(path)


def test_tensor_entry_inconsistent_with_its_bytes_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    data = path.read_bytes()
    assert data.count(b'"shape":[4]') == 1
    path.write_bytes(data.replace(b'"shape":[4]', b'"shape":[5]'))
    with pytest.raises(CheckpointFormatError, match="header entry for tensor 'w' is inconsistent"):
        load_state(path)


# --- header, verify, snapshot ----------------------------------------------------------------------


def test_read_header_describes_tensors_without_reading_them(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    header = read_header(path)
    assert header["state"] == {"epoch": 2, "w": TensorInfo("w", torch.float32, (4,), 0, 16), "loss": 0.25}
    assert header["file_bytes"] == path.stat().st_size == header["data_offset"] + 16
    verify_state(path)


def test_snapshot_copies_tensors_to_new_memory_and_keeps_aliasing() -> None:
    state = every_type_state()
    shared = torch.ones(3)
    state["tied"] = [shared, shared]
    snapshot = snapshot_state(state)
    assert_identical(snapshot, state)
    assert snapshot["tied"][0] is snapshot["tied"][1]
    assert snapshot["state_dict"]["layer.weight"].data_ptr() != state["state_dict"]["layer.weight"].data_ptr()
    state["state_dict"]["layer.bias"] += 1
    state["numpy_arrays"][0][0, 0] = 99
    assert torch.equal(snapshot["state_dict"]["layer.bias"], torch.zeros(3))
    assert snapshot["numpy_arrays"][0][0, 0] == 0


def test_non_finite_floats_never_reach_the_json() -> None:
    _, skeleton = flatten_state({"a": math.nan, "b": [math.inf], "c": np.float64("-inf")})
    text = json.dumps(skeleton, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text


# --- crash safety ----------------------------------------------------------------------------------


def test_latest_stays_loadable_when_the_writer_is_killed_at_any_moment(tmp_path: Path) -> None:
    """SIGKILL a process that keeps saving, at 15 moments; each time the file loads, verifies, is whole."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["detector.checkpoint.format", "tests.state_helpers"])
    path, version, killed_mid_write = tmp_path / "checkpoint_latest.safetensors", 0, 0
    for delay in np.linspace(0.0, 0.5, 15):
        ready = context.Event()
        child = context.Process(target=save_forever, args=(str(path), version + 1, ready), daemon=True)
        child.start()
        assert ready.wait(timeout=60), "the child never completed a save"
        time.sleep(float(delay))
        child.kill()
        child.join()
        state = load_state(path)
        assert state["version"] > version
        version = state["version"]
        assert torch.equal(state["w"], torch.full((5_000_000,), float(version))) and state["step"] == version
        killed_mid_write += len(clean_stale_temps(tmp_path))
        assert _files(tmp_path) == ["checkpoint_latest.safetensors"]
    assert killed_mid_write > 0  # some kills did land inside a write


# A checkpoint written by the build before xxh3-tree (commit 31ac460, crc32-tree was the default).
_OLD_CRC32_FILE = (
    "4AEAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJmb3JtYXQiOiJkZXRlY3Rvci5zdGF0ZSIsImZvcm1hdF92ZXJzaW9uIjoiMSIsImNo"
    "ZWNrc3VtIjoiY3JjMzItdHJlZTpiODhlM2JkY2I2NDY5ZjYxZjY3ZjgwY2IxN2VjZDdjY2VhMzg5OGQzYjdkMWI3Y2IxM2QzYzQ3"
    "NTkxN2EwY2QzIiwic2tlbGV0b24iOiJ7XCJzdGF0ZV9kaWN0XCI6e1wid1wiOntcIl9fdF9fXCI6XCJ0ZW5zb3JcIixcIm5hbWVc"
    "IjpcInN0YXRlX2RpY3Qud1wifSxcImJcIjp7XCJfX3RfX1wiOlwidGVuc29yXCIsXCJuYW1lXCI6XCJzdGF0ZV9kaWN0LmJcIn19"
    "LFwiZ2xvYmFsX3N0ZXBcIjo3LFwibmFtZVwiOlwid3JpdHRlbiBieSAzMWFjNDYwXCJ9In0sInN0YXRlX2RpY3QuYiI6eyJkdHlw"
    "ZSI6Ikk2NCIsInNoYXBlIjpbMl0sImRhdGFfb2Zmc2V0cyI6WzAsMTZdfSwic3RhdGVfZGljdC53Ijp7ImR0eXBlIjoiRjMyIiwi"
    "c2hhcGUiOlsyLDNdLCJkYXRhX29mZnNldHMiOlsxNiw0MF19fSABAAAAAAAAAP7/////////AAAAAAAAgD8AAABAAABAQAAAgEAA"
    "AKBA"
)


def test_a_crc32_tree_file_of_the_previous_build_loads_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "old.safetensors"
    path.write_bytes(base64.b64decode("".join(_OLD_CRC32_FILE)))
    assert read_header(path)["checksum"].startswith("crc32-tree:")
    expected = {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, -2])},
        "global_step": 7,
        "name": "written by 31ac460",
    }
    assert_identical(load_state(path), expected)
    assert_identical(load_state(path, mmap=True), expected)
    verify_state(path)
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0x01
    path.write_bytes(corrupt)
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        load_state(path)


def test_checkpoints_verify_checks_files_of_every_checksum_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for kind in ("xxh3-tree", "crc32-tree", "sha256-tree"):
        paths.append(tmp_path / f"{kind}.safetensors")
        save_state(_small_state(), paths[-1], checksum=kind)
        assert read_header(paths[-1])["checksum"].startswith(f"{kind}:")
    old = tmp_path / "old.safetensors"
    old.write_bytes(base64.b64decode("".join(_OLD_CRC32_FILE)))
    assert detector_main(["checkpoints", "verify", *map(str, [*paths, old])]) is None
    assert capsys.readouterr().out.splitlines() == [f"OK     {path}" for path in [*paths, old]]
    data = bytearray(paths[0].read_bytes())
    data[-1] ^= 0x01
    paths[0].write_bytes(data)
    with pytest.raises(SystemExit) as exit_info:
        detector_main(["checkpoints", "verify", str(paths[0]), str(paths[1])])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"FAILED {paths[0]}: checksum mismatch") and out[1] == f"OK     {paths[1]}"
