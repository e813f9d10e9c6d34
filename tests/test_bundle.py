import errno
import json
import os
import re
import shlex

import numpy as np
import pytest
import torch
import yaml
from bundle_helpers import TEXTS, logits, metadata, shifted_weights, tiny_model
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, pipeline

import detector.atomic as atomic_module
import detector.bundle.onnx as onnx_module
import detector.bundle.writer as bundle_module
from detector.bundle.onnx import ONNX_TOLERANCE, encode, onnx_logits
from detector.bundle.writer import TEMP_MARKER, BundleExistsError, read_metadata, write_bundle

HF_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
BUNDLE_FILES = HF_FILES | {"training_metadata.json", "README.md", "SHA256SUMS"}


@pytest.fixture
def tokenizer(bundle_tokenizer):
    return bundle_tokenizer


@pytest.fixture
def model(bundle_model):
    return bundle_model


@pytest.fixture
def bundle(saved_bundle):
    return saved_bundle


@pytest.fixture
def onnx_bundle(saved_onnx_bundle):
    return saved_onnx_bundle


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_bundle_holds_exactly_the_hf_files_metadata_and_card(bundle):
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    assert [p.name for p in bundle.parent.iterdir()] == [bundle.name]


def test_onnx_bundle_adds_only_model_onnx(onnx_bundle):
    assert {p.name for p in onnx_bundle.iterdir()} == BUNDLE_FILES | {"model.onnx"}


def test_metadata_holds_provenance_thresholds_and_the_given_fields(bundle):
    meta = read_metadata(bundle)
    given = metadata()
    assert {k: meta[k] for k in given} == given
    assert set(meta) == set(given) | {
        "format", "format_version", "name", "created_at", "labels", "default_threshold",
        "onnx_max_abs_logit_diff", "int8", "packages", "git",
    }  # fmt: skip
    assert meta["name"] == "model_v1.0_epoch3"
    assert meta["default_threshold"] == 0.5
    assert meta["labels"] == {"0": "human", "1": "machine"}
    assert meta["onnx_max_abs_logit_diff"] is None
    assert meta["int8"] is None  # no model_int8.onnx
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["created_at"])
    assert meta["packages"]["torch"] == torch.__version__
    assert set(meta["git"]) == {"commit", "dirty"}


def test_max_length_defaults_to_the_model_positions_and_reaches_the_tokenizer(tmp_path, model, tokenizer):
    given = metadata()
    del given["max_length"]
    path = write_bundle(model, tokenizer, tmp_path, "b", given)
    assert read_metadata(path)["max_length"] == model.config.max_position_embeddings == 64
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] == 64


def test_non_finite_metrics_and_tensors_become_strict_json(tmp_path, model, tokenizer):
    metrics = {"val_f1": torch.tensor(0.5), "val_auroc": float("nan")}
    path = write_bundle(model, tokenizer, tmp_path, "b", metadata(metrics=metrics))
    assert read_metadata(path)["metrics"] == {"val_f1": 0.5, "val_auroc": None}


def test_config_labels_are_human_and_machine(bundle):
    config = json.loads((bundle / "config.json").read_text())
    assert config["id2label"] == {"0": "human", "1": "machine"}
    assert config["label2id"] == {"human": 0, "machine": 1}


def test_card_front_matter_parses_with_pipeline_library_and_metrics(bundle):
    matter = _front_matter((bundle / "README.md").read_text())
    assert matter["pipeline_tag"] == "text-classification"
    assert matter["library_name"] == "transformers"
    (entry,) = matter["model-index"]
    assert entry["name"] == "model_v1.0_epoch3"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert {m["name"]: (m["type"], m["value"]) for m in result["metrics"]} == {
        "val_auroc": ("roc_auc", 0.9375),
        "val_f1": ("f1", 0.875),
        "val_loss": ("loss", 0.3125),
    }


def test_card_examples_run_as_written(bundle, tmp_path, monkeypatch):
    from detector.commands.score import main as score_main

    card = (bundle / "README.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)
    assert len(python_blocks) == 3
    for block in python_blocks:
        exec(compile(block, "README.md", "exec"), {})
    (command,) = re.findall(r"```bash\n(.*?)\n```", card, flags=re.DOTALL)
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "detector", "score"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "texts.jsonl").write_text(json.dumps({"id": "a", "text": TEXTS[0]}) + "\n")
    assert score_main(argv[4:]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert row["id"] == "a"


def test_from_pretrained_gives_the_model_logits(bundle, model, tokenizer):
    reloaded = AutoModelForSequenceClassification.from_pretrained(bundle).eval()
    assert torch.equal(logits(reloaded, tokenizer, TEXTS[:6]), logits(model, tokenizer, TEXTS[:6]))


def test_pipeline_gives_the_model_probabilities(bundle, model, tokenizer):
    classify = pipeline("text-classification", model=str(bundle))
    for text in TEXTS[:4]:
        expected = logits(model, tokenizer, [text]).softmax(-1)[0]
        scores = {d["label"]: d["score"] for d in classify(text, top_k=None)}
        assert scores == pytest.approx({"human": expected[0].item(), "machine": expected[1].item()}, abs=1e-6)


def test_given_weights_are_shipped_instead_of_the_model_weights(tmp_path, model, tokenizer):
    ema = shifted_weights(model)
    path = write_bundle(model, tokenizer, tmp_path, "ema", metadata(weights="ema"), weights=ema)
    reloaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    expected = tiny_model(tokenizer)
    expected.load_state_dict(ema)
    assert torch.equal(logits(reloaded, tokenizer, TEXTS[:6]), logits(expected, tokenizer, TEXTS[:6]))
    assert not torch.equal(logits(reloaded, tokenizer, TEXTS[:6]), logits(model, tokenizer, TEXTS[:6]))
    with safe_open(path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ema)
        assert all(torch.equal(f.get_tensor(k), ema[k]) for k in f.keys())  # noqa: SIM118


def test_no_file_in_a_bundle_is_a_pickle(onnx_bundle):
    for path in onnx_bundle.iterdir():
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", path.name


def test_onnx_runtime_logits_match_pytorch_within_tolerance(onnx_bundle, model, tokenizer):
    diff = read_metadata(onnx_bundle)["onnx_max_abs_logit_diff"]
    assert 0.0 <= diff <= ONNX_TOLERANCE
    # Batch and sequence sizes unlike the export example's: the axes are dynamic.
    for texts in ([*TEXTS[:1], " ".join(TEXTS)], TEXTS[:7], ["ok", "x"]):
        inputs = encode(tokenizer, texts, 48)
        got = onnx_logits(onnx_bundle / "model.onnx", inputs)
        expected = logits(model, tokenizer, texts).numpy()
        assert np.abs(got - expected).max() <= ONNX_TOLERANCE


def test_onnx_mismatch_fails_the_export_and_leaves_nothing(
    tmp_path, onnx_bundle, model, tokenizer, monkeypatch
):
    def copy_export(model, path, example):
        path.write_bytes((onnx_bundle / "model.onnx").read_bytes())

    monkeypatch.setattr(onnx_module, "export_onnx", copy_export)
    monkeypatch.setattr(onnx_module, "onnx_logits", lambda path, inputs: onnx_logits(path, inputs) + 1e-3)
    with pytest.raises(ValueError, match=r"ONNX logits differ from PyTorch by 0\.001"):
        write_bundle(model, tokenizer, tmp_path, "bad", metadata(), onnx=True)
    assert list(tmp_path.iterdir()) == []


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize(
    ("module", "target"),
    [(bundle_module, "render_card"), (bundle_module, "_write_tokenizer"), (atomic_module, "fsync_tree")],
)
def test_failure_mid_export_leaves_no_bundle_and_no_partial_files(
    tmp_path, model, tokenizer, monkeypatch, module, target
):
    monkeypatch.setattr(module, target, _fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        write_bundle(model, tokenizer, tmp_path, "model_v1.0_final", metadata())
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_nothing(tmp_path, model, tokenizer, monkeypatch):
    def rename(src, dst):
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected I/O error"):
        write_bundle(model, tokenizer, tmp_path, "model_v1.0_final", metadata())
    assert list(tmp_path.iterdir()) == []


def test_bundle_is_written_in_a_hidden_temp_folder_beside_it(tmp_path, model, tokenizer, monkeypatch):
    real, seen = atomic_module.fsync_tree, []

    def look_then_fsync(folder):
        seen.extend(p.name for p in tmp_path.iterdir())
        real(folder)

    monkeypatch.setattr(atomic_module, "fsync_tree", look_then_fsync)
    write_bundle(model, tokenizer, tmp_path, "model_v1.0_final", metadata())
    [temp] = seen
    assert re.fullmatch(rf"\.model_v1\.0_final{re.escape(TEMP_MARKER)}{os.getpid()}-[0-9a-f]{{8}}", temp)
    assert [p.name for p in tmp_path.iterdir()] == ["model_v1.0_final"]


def test_existing_bundle_is_never_overwritten(tmp_path, model, tokenizer):
    first = write_bundle(model, tokenizer, tmp_path, "model_v1.0_final", metadata(epoch=1))
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(BundleExistsError, match=r"model_v1\.0_final already exists"):
        write_bundle(model, tokenizer, tmp_path, "model_v1.0_final", metadata(epoch=2))
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model_v1.0_final"]


def test_bundle_appearing_during_export_is_not_overwritten(tmp_path, model, tokenizer, monkeypatch):
    real = atomic_module.fsync_tree

    def fsync_then_race(folder):
        real(folder)
        (tmp_path / "race").mkdir()
        (tmp_path / "race" / "keep.txt").write_text("theirs")

    monkeypatch.setattr(atomic_module, "fsync_tree", fsync_then_race)
    with pytest.raises(BundleExistsError, match="race"):
        write_bundle(model, tokenizer, tmp_path, "race", metadata())
    assert [p.name for p in tmp_path.iterdir()] == ["race"]
    assert (tmp_path / "race" / "keep.txt").read_text() == "theirs"


@pytest.mark.parametrize("name", ["", "a/b", "..", f"model{TEMP_MARKER}x"])
def test_bad_bundle_name_is_rejected(tmp_path, model, tokenizer, name):
    with pytest.raises(ValueError, match="bundle name"):
        write_bundle(model, tokenizer, tmp_path, name, metadata())


def test_lightning_prefixed_weights_are_rejected_with_a_hint(tmp_path, model, tokenizer):
    prefixed = {f"model.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"strip a LightningModule's 'model\.' prefix"):
        write_bundle(model, tokenizer, tmp_path, "b", metadata(), weights=prefixed)
    assert list(tmp_path.iterdir()) == []


def test_missing_metadata_fields_are_named(tmp_path, model, tokenizer):
    given = metadata()
    del given["seed"], given["target_fpr"]
    with pytest.raises(ValueError, match=r"lacks \['seed', 'target_fpr'\]"):
        write_bundle(model, tokenizer, tmp_path, "b", given)


def test_threshold_outside_zero_one_is_rejected(tmp_path, model, tokenizer):
    with pytest.raises(ValueError, match="decision_threshold"):
        write_bundle(model, tokenizer, tmp_path, "b", metadata(decision_threshold=1.5))


def test_model_without_human_machine_labels_is_rejected(tmp_path, tokenizer):
    other = tiny_model(tokenizer)
    other.config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    with pytest.raises(ValueError, match="labels"):
        write_bundle(other, tokenizer, tmp_path, "b", metadata())
