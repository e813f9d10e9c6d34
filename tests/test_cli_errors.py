"""Refusals through ``python -m detector``: one line naming the file and the problem, non-zero exit."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from detector.__main__ import main
from tests.conftest import ROOT, write_jsonl

TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'


def fit_args(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "2",
        "--trainer.max_epochs", "1", "--model.arch", TINY, "--data.batch_size", "8",
        "--data.train_path", str(files["train"]), "--data.val_path", str(files["val"]), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step fit of the tiny model; returns its folder, data files and latest checkpoint."""
    from detector.demo import demo_rows

    cwd = tmp_path_factory.mktemp("run")
    files = {
        s: write_jsonl(cwd / f"{s}.jsonl", demo_rows(n, seed=i))
        for i, (s, n) in enumerate([("train", 48), ("val", 16)])
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        main(fit_args(files))
    return cwd, files, cwd / "outputs" / "checkpoints" / "checkpoint_latest.safetensors"


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1, err
    return lines[0]


def flipped_header(source: Path, target: Path, key: bytes, old: bytes, new: bytes) -> Path:
    """A copy of ``source`` with ``old`` replaced by ``new`` after ``key`` in the header: no checksum fix."""
    data = bytearray(source.read_bytes())
    at = data.index(old, data.index(key))
    data[at : at + len(old)] = new
    target.write_bytes(data)
    return target


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [(b"hidden_size", b"32", b"33"), (b"learning_rate", b"learning_rate", b"le`rning_rate")],
)
def test_fit_resume_from_a_corrupt_header_names_the_file_before_using_it(
    run, tmp_path, monkeypatch, capsys, key, old, new
):
    _, files, latest = run
    corrupt = flipped_header(latest, tmp_path / "corrupt.safetensors", key, old, new)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(files, "--ckpt_path", str(corrupt)))
    assert exit_info.value.code == 1
    line = one_line(capsys)
    assert line.startswith(f"error: {corrupt}: checksum mismatch, the file is corrupt"), line
    # Verified before use: nothing was taken from the header (no tokenizer written from it).
    assert not list(tmp_path.glob("outputs/tokenizer/checkpoint-*"))


def test_export_of_a_corrupt_checkpoint_is_one_line(run, tmp_path, capsys):
    _, _, latest = run
    corrupt = flipped_header(latest, tmp_path / "corrupt.safetensors", b"hidden_size", b"32", b"33")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(corrupt), "--out", str(tmp_path / "bundles")])
    assert exit_info.value.code == 2
    assert one_line(capsys).startswith(f"detector export: error: {corrupt}: checksum mismatch")
    assert not (tmp_path / "bundles").exists()


def test_bad_data_row_through_fit_is_one_line(run, tmp_path, monkeypatch, capsys):
    _, files, _ = run
    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["train"].read_text() + json.dumps({"text": "x", "label": 7}) + "\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args({**files, "train": bad}))
    assert exit_info.value.code == 1
    assert one_line(capsys) == f"error: {bad}:49: label must be 0/1 or human/machine, got 7"


def test_disk_full_during_a_checkpoint_save_names_the_file(run, tmp_path, monkeypatch, capsys):
    _, files, _ = run

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("detector.checkpoint.format.write_at", full)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(files))
    assert exit_info.value.code == 1
    target = Path("outputs") / "checkpoints" / "checkpoint_latest.safetensors"
    line = one_line(capsys)
    assert line.startswith("error: No space left on device while writing ") and line.endswith(str(target))
    assert not [p for p in (tmp_path / "outputs" / "checkpoints").iterdir() if p.name != "last"]
