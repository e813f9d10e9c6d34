"""Shared fixtures: tiny DeBERTa-v3-shaped models, local tokenizers, texts, tiny bundles. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from bundle_helpers import metadata, tiny_model, tiny_tokenizer
from s3_helpers import s3, s3_server  # noqa: F401  (fixtures: a local S3 server, a fresh bucket)

from detector.bundle.writer import write_bundle
from detector.demo import demo_rows
from detector.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fdgpt_family"


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return [str(row["text"]) for row in demo_rows(64, seed=1)]


@pytest.fixture(scope="session")
def tokenizer(texts):
    return train_tokenizer(texts, vocab_size=200)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def demo_files(tmp_path: Path) -> dict[str, Path]:
    """Small train/val/test JSONL files of the demo corpus."""
    return {
        split: write_jsonl(tmp_path / f"{split}.jsonl", demo_rows(n, seed=i))
        for i, (split, n) in enumerate([("train", 96), ("val", 32), ("test", 32)])
    }


@pytest.fixture(scope="session")
def bundle_tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def bundle_model(bundle_tokenizer):
    return tiny_model(bundle_tokenizer)


@pytest.fixture(scope="session")
def saved_bundle(tmp_path_factory, bundle_model, bundle_tokenizer):
    """A bundle of ``bundle_model`` without ONNX (treat as read-only)."""
    root = tmp_path_factory.mktemp("inference")
    return write_bundle(bundle_model, bundle_tokenizer, root, "model_v1.0_epoch3", metadata())


@pytest.fixture(scope="session")
def saved_onnx_bundle(tmp_path_factory, bundle_model, bundle_tokenizer):
    """A bundle of ``bundle_model`` with ``model.onnx`` (treat as read-only)."""
    root = tmp_path_factory.mktemp("inference")
    return write_bundle(bundle_model, bundle_tokenizer, root, "model_v1.0_final", metadata(), onnx=True)
