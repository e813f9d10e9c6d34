"""Checkpoint objects on a real S3 server: uploads, the manifest, verified reads, refusals."""

from __future__ import annotations

import pytest
import torch
from s3_helpers import corrupt_object, s3fs_client
from state_helpers import assert_identical, every_type_state

from detector.checkpoint import objects
from detector.checkpoint.format import CheckpointFormatError, save_state
from detector.checkpoint.object_folder import ObjectCheckpointFolder
from detector.checkpoint.reader import load_checkpoint_state, read_checkpoint_header, verify_checkpoint


def keys(url: str) -> set[str]:
    fs = s3fs_client()
    bucket = url.removeprefix("s3://").split("/")[0]
    return {path.removeprefix(bucket + "/") for path in fs.find(bucket)}


def test_a_state_uploaded_to_s3_loads_back_identical_and_is_the_same_bytes_as_on_disk(s3, tmp_path):
    state = every_type_state()
    objects.save_state_to_url(state, f"{s3}/run/state.safetensors")
    assert_identical(load_checkpoint_state(f"{s3}/run/state.safetensors"), state)
    save_state(state, tmp_path / "state.safetensors")
    assert (
        s3fs_client().cat_file(f"{s3}/run/state.safetensors") == (tmp_path / "state.safetensors").read_bytes()
    )


def test_a_state_larger_than_a_part_uploads_in_parts(s3, monkeypatch):
    monkeypatch.setattr(objects, "PART_BYTES", 5 << 20)  # S3's smallest part
    state = {"w": torch.arange(3_000_000, dtype=torch.float32), "step": 3}  # 12 MB: three parts
    objects.save_state_to_url(state, f"{s3}/big.safetensors")
    assert_identical(load_checkpoint_state(f"{s3}/big.safetensors"), state)


def test_an_upload_that_fails_midway_leaves_no_object(s3, monkeypatch):
    monkeypatch.setattr(objects, "PART_BYTES", 5 << 20)
    calls = []
    real = objects.byte_view

    def failing(tensor):
        calls.append(1)
        if len(calls) == 4:  # the second tensor of the upload pass (two per pass)
            raise OSError("disk gone")
        return real(tensor)

    monkeypatch.setattr(objects, "byte_view", failing)
    state = {"a": torch.ones(2_000_000), "b": torch.ones(2_000_000)}  # the first part is already sent
    with pytest.raises(OSError, match="disk gone"):
        objects.save_state_to_url(state, f"{s3}/torn.safetensors")
    assert keys(s3) == set()
    assert (
        s3fs_client().call_s3("list_multipart_uploads", Bucket=s3.removeprefix("s3://")).get("Uploads")
        is None
    )


def test_an_object_corrupted_on_the_server_is_refused_with_its_url(s3):
    url = f"{s3}/run/state.safetensors"
    objects.save_state_to_url({"w": torch.ones(1000)}, url)
    load_checkpoint_state(url)  # a good copy is cached; the corrupted version must be fetched anew
    corrupt_object(url, -10)
    for read in (load_checkpoint_state, verify_checkpoint):
        with pytest.raises(CheckpointFormatError, match=rf"^{url}: checksum mismatch"):
            read(url)


def test_a_missing_object_is_named(s3):
    with pytest.raises(CheckpointFormatError, match=rf"^{s3}/nothing.safetensors: no such checkpoint object"):
        read_checkpoint_header(f"{s3}/nothing.safetensors")


def test_names_point_at_one_object_and_rotation_deletes_only_what_no_name_holds(s3):
    folder = ObjectCheckpointFolder(f"{s3}/ckpt")
    assert folder.open() == []
    first = folder.new_target("checkpoint_step_1.safetensors")
    objects.save_state_to_url({"step": 1}, first)
    folder.publish(first, ["checkpoint_step_1.safetensors", "checkpoint_latest.safetensors"], [])
    first_key = first.removeprefix(f"{s3}/")
    assert keys(s3) == {"ckpt/checkpoints.json", first_key}
    second = folder.new_target("checkpoint_step_2.safetensors")
    objects.save_state_to_url({"step": 2}, second)
    assert keys(s3) == {"ckpt/checkpoints.json", first_key, second.removeprefix(f"{s3}/")}
    assert load_checkpoint_state(f"{s3}/ckpt/checkpoint_latest.safetensors") == {"step": 1}  # not named yet
    folder.publish(
        second,
        ["checkpoint_step_2.safetensors", "checkpoint_latest.safetensors"],
        ["checkpoint_step_1.safetensors"],
    )
    assert keys(s3) == {"ckpt/checkpoints.json", second.removeprefix(f"{s3}/")}
    assert objects.read_manifest(f"{s3}/ckpt") == {
        "checkpoint_latest.safetensors": second.removeprefix(f"{s3}/ckpt/"),
        "checkpoint_step_2.safetensors": second.removeprefix(f"{s3}/ckpt/"),
    }
    assert load_checkpoint_state(f"{s3}/ckpt/checkpoint_latest.safetensors") == {"step": 2}
    folder.remove(["checkpoint_step_2.safetensors"])  # latest still holds the object
    assert keys(s3) == {"ckpt/checkpoints.json", second.removeprefix(f"{s3}/")}


def test_opening_a_folder_deletes_uploads_that_a_crashed_run_never_named(s3):
    folder = ObjectCheckpointFolder(f"{s3}/ckpt")
    named, orphan = (
        folder.new_target("checkpoint_latest.safetensors"),
        folder.new_target("checkpoint_x.safetensors"),
    )
    objects.save_state_to_url({"step": 1}, named)
    folder.publish(named, ["checkpoint_latest.safetensors"], [])
    objects.save_state_to_url({"step": 2}, orphan)
    again = ObjectCheckpointFolder(f"{s3}/ckpt")
    assert again.open() == [orphan.removeprefix(f"{s3}/ckpt/")]
    assert again.names() == ["checkpoint_latest.safetensors"]
    assert keys(s3) == {"ckpt/checkpoints.json", named.removeprefix(f"{s3}/")}


def test_a_manifest_that_is_not_ours_is_refused_with_its_url(s3):
    s3fs_client().pipe_file(f"{s3}/ckpt/checkpoints.json", b'{"names": 3}')
    with pytest.raises(
        CheckpointFormatError, match=rf"^{s3}/ckpt/checkpoints.json: not a checkpoint manifest"
    ):
        objects.read_manifest(f"{s3}/ckpt")


def test_only_remote_urls_go_to_the_object_store():
    assert [
        objects.is_url(p) for p in ("s3://b/k", "gs://b/k", "memory://x", "file:///tmp/x", "/tmp/x", "x")
    ] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_fit_into_a_missing_bucket_is_refused_before_training_in_one_line(s3, tmp_path, demo_files, capsys):
    from detector.__main__ import main

    data = ["--data.train_path", str(demo_files["train"]), "--data.val_path", str(demo_files["val"])]
    where = ["--checkpoint.dirpath", "s3://no-such-bucket/run", "--trainer.default_root_dir", str(tmp_path)]
    args = ["fit", *data, *where]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err == (
        "error: s3://no-such-bucket/run: the bucket 'no-such-bucket' does not exist or these credentials "
        "cannot see it; create it, or point the URL (and the endpoint/credentials) at one that does\n"
    )
    assert not (tmp_path / "logs").exists()


def test_missing_credentials_give_one_line_naming_the_url(s3, monkeypatch, capsys):
    from s3_helpers import clear_s3fs_cache

    from detector.__main__ import main

    objects.save_state_to_url({"step": 1}, f"{s3}/ckpt/a.safetensors")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    clear_s3fs_cache()
    url = f"{s3}/ckpt/a.safetensors"
    for args, named in (
        (["score", f"{s3}/models/model_v1.0_final", "-"], f"{s3}/models/model_v1.0_final"),
        (["checkpoints", "verify", url], f"{s3}/ckpt/checkpoints.json"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 1
        out, err = capsys.readouterr()
        line = out + err  # score: "error: ..." on stderr; verify: "FAILED ..." on stdout
        assert f"{named}: the object store refused or could not be reached: " in line
        assert line.endswith("Unable to locate credentials\n") and line.count("\n") == 1


def test_bundle_retention_on_s3_sees_only_complete_bundles_and_moves_them_whole(s3, saved_bundle):
    from callbacks.inference_export import InferenceExportCallback
    from detector.bundle.export import existing_bundles, remove_bundle
    from detector.bundle.loading import load_detector
    from detector.bundle.remote import move_bundle, upload_bundle

    assert InferenceExportCallback(dirpath=f"{s3}/models/").dirpath == f"{s3}/models"
    fs = s3fs_client()
    root = f"{s3}/models"
    epoch3, epoch4, final = (f"{root}/model_v1.0_{name}" for name in ("epoch3", "epoch4", "final"))
    upload_bundle(saved_bundle, epoch3)
    fs.put_file(str(saved_bundle / "config.json"), f"{epoch4}/config.json")  # a cut-short upload
    fs.pipe_file(f"{final}/stray", b"left by a cut-short copy")
    assert existing_bundles(root, "1.0") == ["model_v1.0_epoch3"]

    def files(url: str) -> dict[str, bytes]:
        prefix = url.removeprefix("s3://") + "/"
        return {key.removeprefix(prefix): fs.cat_file(key) for key in fs.find(url)}

    before = files(epoch3)
    move_bundle(epoch3, final)
    assert existing_bundles(root, "1.0") == ["model_v1.0_final"]
    assert files(final) == before and not fs.find(epoch3)
    assert load_detector(final).score(["a text"])[0].keys() >= {"prob_machine", "label"}
    remove_bundle(final)
    remove_bundle(final)  # already gone: done
    assert existing_bundles(root, "1.0") == [] and not fs.find(final)
    assert set(files(epoch4)) == {"config.json"}  # another name's leftovers are not touched


def test_a_bundle_upload_cut_short_is_not_a_bundle_and_a_corrupt_file_is_named_by_url(s3, saved_bundle):
    from detector.bundle.integrity import BundleIntegrityError
    from detector.bundle.loading import load_detector
    from detector.bundle.remote import upload_bundle

    fs = s3fs_client()
    url = f"{s3}/models/{saved_bundle.name}"
    # Every file but the marker, as a killed upload leaves them.
    for file in sorted(p for p in saved_bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        fs.put_file(str(file), f"{url}/{file.relative_to(saved_bundle).as_posix()}")
    with pytest.raises(BundleIntegrityError, match=rf"^{url}/SHA256SUMS: missing, so {url} is not a bundle"):
        load_detector(url)
    assert upload_bundle(saved_bundle, url) == url  # the leftovers are replaced
    detector = load_detector(url)
    assert detector.score(["a text"])[0].keys() >= {"prob_machine", "label"}
    with pytest.raises(FileExistsError, match=rf"^bundle {url} exists"):
        upload_bundle(saved_bundle, url)
    data = bytearray(fs.cat_file(f"{url}/config.json"))
    data[5] ^= 0x01
    fs.pipe_file(f"{url}/config.json", bytes(data))
    with pytest.raises(BundleIntegrityError, match=rf"^{url}/config.json: SHA-256 mismatch"):
        load_detector(url)


def test_file_urls_are_local_paths(tmp_path):
    from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
    from detector.checkpoint.plugin import SafetensorsCheckpointIO

    assert SafetensorsTopKCheckpoint(dirpath=f"file://{tmp_path}/ckpt").dirpath == tmp_path / "ckpt"
    SafetensorsCheckpointIO().save_checkpoint({"step": 3}, f"file://{tmp_path}/a.safetensors")
    assert load_checkpoint_state(f"file://{tmp_path}/a.safetensors") == {"step": 3}
    assert (tmp_path / "a.safetensors").is_file()
    from detector.cli import verified_header
    from detector.run_folder import checkpoint_exists

    assert checkpoint_exists(f"file://{tmp_path}/a.safetensors")
    assert not checkpoint_exists(f"file://{tmp_path}/b.safetensors")
    assert verified_header(f"file://{tmp_path}/a.safetensors")["state"] == {"step": 3}
