"""Sharded (FSDP2) checkpoints on a real S3 server: one shard object per rank, the manifest commit,
kills and failures mid-save, corrupted shards, rotation, and a bitwise-exact resume through the CLI."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from multi_device_helpers import cli_fit, tensors
from s3_helpers import corrupt_object, s3fs_client
from test_object_storage import keys

from detector.checkpoint import objects
from detector.checkpoint.format import CheckpointFormatError
from detector.checkpoint.object_folder import ObjectCheckpointFolder
from detector.checkpoint.reader import load_checkpoint_state, verify_checkpoint
from detector.checkpoint.sharded import INDEX_NAME, STATE_NAME, save_sharded_state_to_url, shard_name
from detector.checkpoint.topk import LATEST_NAME
from detector.demo import demo_rows
from tests.conftest import write_jsonl
from tests.sharded_helpers import url_save_worker
from tests.test_multi_device import FSDP, FSDP_ARGS

SHARDED_FILES = {INDEX_NAME, STATE_NAME, shard_name(0, 2), shard_name(1, 2)}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save(url: str, mode: str, results: Path, monkeypatch: pytest.MonkeyPatch) -> dict[int, str]:
    """A 2-rank FSDP2 upload of the toy state to ``url``; what each rank that returned got."""
    results.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RESULTS", str(results))
    try:
        mp.start_processes(url_save_worker, args=(2, _port(), url, mode), nprocs=2, start_method="spawn")
    except mp.ProcessExitedException:
        if mode != "kill":
            raise
    return {int(p.name[4:]): p.read_text() for p in results.glob("rank*")}


def _committed(folder: ObjectCheckpointFolder, monkeypatch, results: Path, *names: str) -> str:
    """Upload the toy state under a fresh prefix of ``folder`` and name it ``names``; the prefix URL."""
    target = folder.new_target(names[0])
    assert _save(target, "ok", results, monkeypatch) == {0: "saved", 1: "saved"}
    folder.publish(target, list(names), [])
    return target


def _key(url: str, s3: str) -> str:
    return url.removeprefix(f"{s3}/")


def _under(url: str) -> set[str]:
    """The keys (relative to the bucket) under the prefix ``url``."""
    bucket = url.removeprefix("s3://").split("/")[0]
    prefix = url.removeprefix(f"s3://{bucket}/") + "/"
    return {key for key in keys(url) if key.startswith(prefix)}


@pytest.mark.slow
def test_a_rank_killed_mid_save_leaves_latest_loadable_and_the_half_upload_is_deleted_at_open(
    s3, tmp_path, monkeypatch
):
    folder = ObjectCheckpointFolder(f"{s3}/ckpt")
    folder.open()
    good = _committed(folder, monkeypatch, tmp_path / "first", LATEST_NAME)
    expected = load_checkpoint_state(f"{s3}/ckpt/{LATEST_NAME}")
    half = folder.new_target("checkpoint_step_9.safetensors")
    _save(half, "kill", tmp_path / "killed", monkeypatch)
    # Rank 0's objects are there, rank 1's shard and the index never came: nothing names the prefix.
    assert _under(half) == {_key(f"{half}/{name}", s3) for name in (STATE_NAME, shard_name(0, 2))}
    assert objects.read_manifest(f"{s3}/ckpt") == {LATEST_NAME: _key(good, f"{s3}/ckpt")}
    got = load_checkpoint_state(f"{s3}/ckpt/{LATEST_NAME}")
    assert tensors(got).keys() == tensors(expected).keys()
    assert all(torch.equal(tensors(got)[k], v) for k, v in tensors(expected).items())
    with pytest.raises(CheckpointFormatError, match=rf"^{half}: a folder without index.json"):
        load_checkpoint_state(half)
    again = ObjectCheckpointFolder(f"{s3}/ckpt")
    assert again.open() == [_key(half, f"{s3}/ckpt")]
    assert keys(s3) == {"ckpt/checkpoints.json", *(_key(f"{good}/{name}", s3) for name in SHARDED_FILES)}


@pytest.mark.slow
def test_a_rank_whose_upload_fails_fails_the_save_on_every_rank_and_leaves_nothing(s3, tmp_path, monkeypatch):
    target = f"{s3}/ckpt/states/checkpoint_latest-0123456789ab.safetensors"
    got = _save(target, "fail", tmp_path, monkeypatch)
    failure = "rank 1: ConnectionResetError: [Errno 104] Connection reset by peer"
    assert got == {rank: f"CollectiveError: uploading {target} failed: {failure}" for rank in (0, 1)}
    assert keys(s3) == set()


@pytest.mark.slow
def test_a_corrupted_shard_object_is_refused_with_its_url(s3, tmp_path, monkeypatch, capsys):
    from detector.commands.checkpoints import main as tool

    folder = ObjectCheckpointFolder(f"{s3}/ckpt")
    folder.open()
    target = _committed(folder, monkeypatch, tmp_path, LATEST_NAME)
    assert _under(target) == {_key(f"{target}/{name}", s3) for name in SHARDED_FILES}
    url = f"{s3}/ckpt/{LATEST_NAME}"
    verify_checkpoint(url)  # a good copy is downloaded; the corrupted version must be fetched anew
    shard = f"{target}/{shard_name(1, 2)}"
    corrupt_object(shard, -3)
    for read in (load_checkpoint_state, verify_checkpoint):
        with pytest.raises(CheckpointFormatError, match=rf"^{shard}: checksum mismatch"):
            read(url)
    assert tool(["verify", url]) == 1
    assert capsys.readouterr().out.startswith(f"FAILED {shard}: checksum mismatch")


def test_rotation_deletes_an_evicted_sharded_prefix_whole_only_after_the_manifest_drops_it(s3, monkeypatch):
    folder = ObjectCheckpointFolder(f"{s3}/ckpt")
    folder.open()
    first = folder.new_target("checkpoint_step_1.safetensors")
    save_sharded_state_to_url({"w": torch.arange(4.0), "step": 1}, first)  # one process: one shard
    folder.publish(first, ["checkpoint_step_1.safetensors", LATEST_NAME], [])
    one_rank = {INDEX_NAME, STATE_NAME, shard_name(0, 1)}
    first_keys = {_key(f"{first}/{name}", s3) for name in one_rank}
    assert keys(s3) == {"ckpt/checkpoints.json", *first_keys}
    second = folder.new_target("checkpoint_step_2.safetensors")
    save_sharded_state_to_url({"w": torch.arange(4.0) + 1, "step": 2}, second)
    second_keys = {_key(f"{second}/{name}", s3) for name in one_rank}
    names = ["checkpoint_step_2.safetensors", LATEST_NAME]

    def unreachable(*args, **kwargs):
        raise objects.ObjectStoreError("the store went away")

    with monkeypatch.context() as patch:  # the manifest write fails: nothing is deleted
        patch.setattr(objects, "put_object", unreachable)
        with pytest.raises(objects.ObjectStoreError):
            folder.publish(second, names, ["checkpoint_step_1.safetensors"])
    assert keys(s3) == {"ckpt/checkpoints.json", *first_keys, *second_keys}
    assert load_checkpoint_state(f"{s3}/ckpt/{LATEST_NAME}")["step"] == 1
    folder.publish(second, names, ["checkpoint_step_1.safetensors"])
    assert keys(s3) == {"ckpt/checkpoints.json", *second_keys}
    state = load_checkpoint_state(f"{s3}/ckpt/{LATEST_NAME}")
    assert state["step"] == 2 and torch.equal(state["w"], torch.arange(4.0) + 1)
    assert objects.exists(f"{s3}/ckpt/{LATEST_NAME}")
    assert objects.stored_bytes(f"{s3}/ckpt") == sum(s3fs_client().du(second, total=False).values())


@pytest.mark.slow
def test_fsdp2_fit_uploads_one_shard_object_per_rank_and_resumes_from_last_bitwise_exactly(s3, tmp_path):
    data = {split: write_jsonl(tmp_path / f"{split}.jsonl", demo_rows(n, seed=i))
            for i, (split, n) in enumerate([("train", 48), ("val", 16)])}  # fmt: skip
    one_epoch = (*FSDP_ARGS, "--trainer.max_epochs", "1")  # 3 steps, a checkpoint after each
    straight, resumed = f"{s3}/straight", f"{s3}/resumed"
    cli_fit(tmp_path / "straight", data, FSDP, *one_epoch, "--checkpoint.dirpath", straight)
    manifest = objects.read_manifest(straight)
    assert manifest[LATEST_NAME] == manifest["checkpoint_step_3.safetensors"]
    prefixes = set(manifest.values())
    assert all(key.startswith("states/") for key in prefixes)
    assert keys(s3) == {
        "straight/checkpoints.json",
        *(f"straight/{key}/{name}" for key in prefixes for name in SHARDED_FILES),
    }
    # A run interrupted after step 2: its folder names the straight run's step-2 checkpoint latest.
    step2 = manifest["checkpoint_step_2.safetensors"]
    fs = s3fs_client()
    for name in SHARDED_FILES:
        fs.copy(f"{straight}/{step2}/{name}", f"{resumed}/{step2}/{name}")
    objects.write_manifest(resumed, {LATEST_NAME: step2})
    cli_fit(
        tmp_path / "resumed", data, FSDP, *one_epoch, "--checkpoint.dirpath", resumed, "--ckpt_path", "last"
    )
    want, got = (load_checkpoint_state(f"{url}/{LATEST_NAME}") for url in (straight, resumed))
    assert got["global_step"] == want["global_step"] == 3
    for part in ("state_dict", "optimizer_states", "callbacks"):
        have, expected = tensors(got[part]), tensors(want[part])
        assert have.keys() == expected.keys(), part
        assert [k for k in expected if not torch.equal(have[k], expected[k])] == [], part
