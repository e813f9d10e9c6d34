"""Bundle integrity: SHA256SUMS written at export, checked by load_detector/score/evaluate; NaN refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from detector.__main__ import main
from detector.bundle.integrity import MANIFEST_FILE, BundleIntegrityError, write_manifest
from detector.bundle.loading import load_detector


@pytest.fixture
def bundle(tmp_path: Path, saved_bundle: Path) -> Path:
    return Path(shutil.copytree(saved_bundle, tmp_path / saved_bundle.name))


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": f"text number {i}"}) + "\n" for i in range(3)))
    return path


def edit_config(bundle: Path, **changes) -> None:
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, **changes}))


def nan_weights(bundle: Path) -> None:
    weights = load_file(bundle / "model.safetensors")
    weights["classifier.weight"][0, 0] = float("nan")
    save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})


def fifo_tokenizer(bundle: Path) -> None:
    (bundle / "tokenizer.json").unlink()
    os.mkfifo(bundle / "tokenizer.json")


def test_manifest_lists_every_other_file_in_sha256sum_format(bundle):
    lines = (bundle / MANIFEST_FILE).read_text().splitlines()
    names = sorted(p.name for p in bundle.iterdir() if p.name != MANIFEST_FILE)
    assert lines == [f"{hashlib.sha256((bundle / n).read_bytes()).hexdigest()}  {n}" for n in names]
    assert {"config.json", "model.safetensors", "training_metadata.json", "README.md"} <= set(names)


def test_plain_from_pretrained_still_loads_a_bundle(bundle):
    assert AutoModelForSequenceClassification.from_pretrained(bundle).config.num_labels == 2


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda b: edit_config(b, hidden_act="relu"), "config.json: SHA-256 mismatch"),
        (lambda b: edit_config(b, layer_norm_eps=1e-3), "config.json: SHA-256 mismatch"),
        (nan_weights, "model.safetensors: SHA-256 mismatch"),
        (lambda b: (b / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda b: (b / "extra.bin").write_bytes(b"x"), "extra.bin: not recorded in SHA256SUMS"),
        (
            lambda b: (b / MANIFEST_FILE).unlink(),
            "SHA256SUMS: missing, so the bundle's files cannot be verified",
        ),
        (fifo_tokenizer, r"tokenizer.json: not a regular file but a FIFO"),
    ],
)
def test_a_tampered_bundle_is_refused_naming_the_file(bundle, tamper, problem):
    tamper(bundle)
    with pytest.raises(BundleIntegrityError, match=f"^{bundle}/{problem}"):
        load_detector(bundle)


def test_nan_weights_are_refused_even_with_matching_digests_or_no_verify(bundle):
    nan_weights(bundle)
    write_manifest(bundle)  # digests recomputed: the file is what was written, just unusable
    for verify in (True, False):
        with pytest.raises(
            BundleIntegrityError, match=r"model.safetensors: tensor 'classifier.weight' holds 1 non-finite"
        ):
            load_detector(bundle, verify=verify)


def test_score_refuses_an_edited_bundle_in_one_line_and_no_verify_skips_the_check(bundle, inputs, capsys):
    edit_config(bundle, layer_norm_eps=1e-3)
    with pytest.raises(SystemExit) as exit_info:
        main(["score", str(bundle), str(inputs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"detector score: error: {bundle}/config.json: SHA-256 mismatch")
        and err.count("\n") == 1
    )
    main(["score", str(bundle), str(inputs), "--no-verify"])
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [0, 1, 2]


def test_score_of_an_unverified_bundle_with_unreadable_weights_names_the_bundle(bundle, inputs, capsys):
    (bundle / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SystemExit):
        main(["score", str(bundle), str(inputs), "--no-verify"])
    err = capsys.readouterr().err
    assert (
        err.startswith(f"detector score: error: {bundle}: the model could not be loaded")
        and err.count("\n") == 1
    )


def test_evaluate_refuses_an_edited_bundle(bundle, tmp_path, capsys):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps({"text": f"t {i}", "label": i % 2}) + "\n" for i in range(4)))
    edit_config(bundle, num_hidden_layers=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--data", str(data), "--bundle", str(bundle), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"detector evaluate: error: {bundle}/config.json: SHA-256 mismatch"
    )
    assert not (tmp_path / "r").exists()
