import json

import pytest
import torch

from detector.data import DetectorDataModule
from detector.records import DataError


def make_dm(tmp_path, demo_files, **kwargs) -> DetectorDataModule:
    return DetectorDataModule(
        train_path=str(demo_files["train"]),
        tokenizer_root=str(tmp_path / "tok"),
        tokenizer_vocab_size=200,
        batch_size=8,
        **kwargs,
    )


def test_batches_are_dynamically_padded_and_truncated(tmp_path, demo_files):
    dm = make_dm(tmp_path, demo_files, val_path=str(demo_files["val"]), max_length=12)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max()) <= 12
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == dm.tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert len(dm.datasets["val"]) == 32


def test_without_val_file_a_group_split_is_made(tmp_path):
    rows = [
        {"text": f"text {g} {i}", "label": int(i > 0), "group": f"g{g}"} for g in range(30) for i in range(3)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = DetectorDataModule(
        train_path=str(path), tokenizer_root=str(tmp_path / "tok"), tokenizer_vocab_size=100, val_fraction=0.2
    )
    dm.setup("fit")
    train_groups = set(dm.records["train"].extra["group"])
    val_groups = set(dm.records["val"].extra["group"])
    assert train_groups.isdisjoint(val_groups) and len(val_groups) == 6
    assert len(dm.records["train"]) + len(dm.records["val"]) == 90


def test_loss_weights_are_inverse_class_frequency(tmp_path, demo_files):
    dm = make_dm(tmp_path, demo_files, val_path=str(demo_files["val"]))
    dm.setup("fit")
    labels = torch.tensor(dm.datasets["train"].labels)
    n0, n1 = int((labels == 0).sum()), int((labels == 1).sum())
    assert torch.allclose(dm.class_weights(), torch.tensor([96 / (2 * n0), 96 / (2 * n1)]))
    assert make_dm(tmp_path, demo_files, balance="none").class_weights() is None


def test_tokenizer_is_trained_once_and_reused(tmp_path, demo_files):
    first = make_dm(tmp_path, demo_files).tokenizer
    folders = list((tmp_path / "tok").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    assert make_dm(tmp_path, demo_files).tokenizer.get_vocab() == first.get_vocab()


def test_bad_row_in_val_file_fails_setup_with_its_line(tmp_path, demo_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 1}\n{"text": "", "label": 0}\n')
    dm = make_dm(tmp_path, demo_files, val_path=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:2: empty text"):
        dm.setup("fit")


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DetectorDataModule(batch_size=0)


def test_resume_refuses_a_checkpoint_of_another_tokenizer(tmp_path, demo_files):
    dm = make_dm(tmp_path, demo_files)
    state = dm.state_dict()
    assert state["data_fingerprint"] == dm.data_fingerprint()
    dm.load_state_dict(state)  # the same tokenizer: accepted
    state["tokenizer_files"]["tokenizer.json"] = "{}"
    with pytest.raises(ValueError, match="another tokenizer"):
        dm.load_state_dict(state)


def test_locally_trained_tokenizer_is_deterministic(tmp_path, demo_files):
    first = make_dm(tmp_path / "a", demo_files).tokenizer
    second = make_dm(tmp_path / "b", demo_files).tokenizer
    assert first.get_vocab() == second.get_vocab()


def test_checkpoint_state_is_computed_once_per_run_not_at_every_save(tmp_path, demo_files, monkeypatch):
    import hashlib
    from types import SimpleNamespace

    import detector.data as data_module
    from detector.tokenizer import tokenizer_files

    calls = {"hash": 0, "files": 0}

    def counting_sha256():
        calls["hash"] += 1
        return hashlib.sha256()

    def counting_files(tokenizer):
        calls["files"] += 1
        return tokenizer_files(tokenizer)

    dm = make_dm(tmp_path, demo_files)
    dm.tokenizer  # the tokenizer folder's name hashes the training file once  # noqa: B018
    monkeypatch.setattr(data_module, "hashlib", SimpleNamespace(sha256=counting_sha256))
    monkeypatch.setattr(data_module, "tokenizer_files", counting_files)
    states = [dm.state_dict() for _ in range(3)]
    assert calls == {"hash": 0, "files": 1}
    assert states[0] == states[2]
    assert states[0]["data_fingerprint"] == hashlib.sha256(demo_files["train"].read_bytes()).hexdigest()
    states[0]["tokenizer_files"].clear()  # a caller's copy: the module's own stays whole
    assert dm.state_dict()["tokenizer_files"] == tokenizer_files(dm.tokenizer)


def test_single_class_training_file_warns_clearly(tmp_path, demo_files):
    rows = [json.loads(line) for line in demo_files["train"].read_text().splitlines()]
    human = tmp_path / "human.jsonl"
    human.write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    dm = make_dm(tmp_path, {**demo_files, "train": human}, val_path=str(demo_files["val"]))
    message = r"human.jsonl: every one of the 96 training rows is labelled 'human'"
    with pytest.warns(UserWarning, match=message):
        dm.setup("fit")


def test_two_class_training_file_does_not_warn(tmp_path, demo_files, recwarn):
    make_dm(tmp_path, demo_files, val_path=str(demo_files["val"])).setup("fit")
    assert not [w for w in recwarn if "training rows is labelled" in str(w.message)]
