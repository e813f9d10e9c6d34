"""The DeBERTa-v3 hub path (`configs/deberta_v3_base_gpu.yaml`), offline, on a tiny hub-format folder.

The folder holds what ``microsoft/deberta-v3-base`` holds: a ``config.json`` of ``model_type``
``deberta-v2`` (no ``architectures``, no labels), weights in ``model.safetensors``, a SentencePiece
``spm.model`` and the two-key ``tokenizer_config.json``; no ``tokenizer.json``.
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import (
    AutoTokenizer,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    pipeline,
)

from callbacks.ema import EMACallback
from detector.demo import demo_rows
from tests.conftest import write_jsonl
from tests.state_helpers import build_cli_in

# microsoft/deberta-v3-base's config.json, at hidden 32, 2 layers, 4 heads and a 200-piece vocabulary.
HUB_CONFIG = {
    "model_type": "deberta-v2", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "max_position_embeddings": 512, "relative_attention": True, "position_buckets": 256,
    "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p", "layer_norm_eps": 1e-7,
    "max_relative_positions": -1, "position_biased_input": False, "num_attention_heads": 4,
    "num_hidden_layers": 2, "type_vocab_size": 0, "vocab_size": 200,
}  # fmt: skip


def hub_format_folder(folder: Path, texts: list[str]) -> Path:
    """Write a tiny ``microsoft/deberta-v3-base``-format folder with random weights into ``folder``."""
    model = io.BytesIO()
    # DeBERTa-v3's spm.model: [PAD], [CLS], [SEP], [UNK] at ids 0-3; [MASK] a user-defined piece.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=HUB_CONFIG["vocab_size"],
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"],
        minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "spm.model").write_bytes(model.getvalue())
    torch.manual_seed(0)
    DebertaV2Model(DebertaV2Config(**HUB_CONFIG)).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(HUB_CONFIG, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    return folder


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    texts = [row["text"] for row in demo_rows(200, seed=3)]
    return hub_format_folder(tmp_path_factory.mktemp("hub") / "deberta-v3-tiny", texts)


def fit(cwd: Path, hub: Path, files: dict[str, Path], *extra: str):
    args = [
        "fit", "--model.pretrained", str(hub), "--trainer.max_epochs", "2", "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks",
        '[{"class_path": "callbacks.ema.EMACallback", "init_args": {"decay": 0.9, "warmup": true}}, '
        '{"class_path": "callbacks.inference_export.InferenceExportCallback"}]',
        "--data.batch_size", "8", "--data.max_length", "48", "--data.train_path", str(files["train"]),
        "--data.val_path", str(files["val"]), "--checkpoint.every_n_train_steps", "3",
        "--checkpoint.keep_last_steps", "-1", *extra,
    ]  # fmt: skip
    return build_cli_in(cwd, args)


def test_hub_format_folder_has_the_hub_files_and_its_spm_vocabulary(hub_folder):
    assert sorted(p.name for p in hub_folder.iterdir()) == [
        "config.json", "model.safetensors", "spm.model", "tokenizer_config.json",
    ]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(hub_folder)
    assert len(tokenizer) == HUB_CONFIG["vocab_size"]  # not a 7-token stub
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 1, 2)
    ids = tokenizer("the committee met")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.unk_token_id not in ids


@pytest.mark.slow
def test_fit_resume_bundle_and_pipeline_from_a_hub_format_folder(tmp_path, hub_folder):
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", demo_rows(n, seed=i))
             for i, (split, n) in enumerate([("train", 48), ("val", 24)])}  # fmt: skip
    straight = fit(tmp_path / "straight", hub_folder, files)
    model = straight.model.model
    assert isinstance(model, DebertaV2ForSequenceClassification)
    assert model.config.id2label == {0: "human", 1: "machine"}
    assert model.config.relative_attention and model.config.pos_att_type == ["p2c", "c2p"]
    assert straight.datamodule.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(hub_folder).get_vocab()
    assert straight.trainer.global_step == 12

    saved = tmp_path / "checkpoint_step_9.safetensors"  # mid-epoch 2
    shutil.copy(tmp_path / "straight/outputs/checkpoints/checkpoint_step_9.safetensors", saved)
    resumed = fit(tmp_path / "resumed", hub_folder, files, "--ckpt_path", str(saved))
    assert resumed.trainer.global_step == 12
    (ema,) = [cb for cb in straight.trainer.callbacks if isinstance(cb, EMACallback)]
    (resumed_ema,) = [cb for cb in resumed.trainer.callbacks if isinstance(cb, EMACallback)]
    expected, got = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    expected_ema, got_ema = ema.averaged_state_dict(), resumed_ema.averaged_state_dict()
    assert expected_ema.keys() == got_ema.keys()
    assert all(torch.equal(got_ema[k], v) for k, v in expected_ema.items())

    bundle = tmp_path / "resumed/outputs/models/inference/model_v1.0_final"
    texts = [row["text"] for row in demo_rows(4, seed=7)]
    # The bundle ships the backbone's own SentencePiece vocabulary (converted to tokenizer.json).
    tokenizer, hub_tokenizer = (
        AutoTokenizer.from_pretrained(bundle),
        AutoTokenizer.from_pretrained(hub_folder),
    )
    assert tokenizer.get_vocab() == hub_tokenizer.get_vocab()
    assert tokenizer(texts)["input_ids"] == hub_tokenizer(texts)["input_ids"]
    results = pipeline("text-classification", model=str(bundle), top_k=None)(texts, truncation=True)
    shipped = DebertaV2ForSequenceClassification.from_pretrained(bundle).eval()
    ema_weights = {k.removeprefix("model."): v for k, v in expected_ema.items()}
    assert all(torch.equal(t, ema_weights[k]) for k, t in shipped.state_dict().items())
    with torch.inference_mode():
        probs = shipped(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
    probs = probs.softmax(-1)
    got_probs = [{r["label"]: r["score"] for r in result} for result in results]
    assert got_probs == [
        pytest.approx({"human": p[0].item(), "machine": p[1].item()}, abs=1e-6) for p in probs
    ]
