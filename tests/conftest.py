"""Test-wide settings (no network) and the session-wide tiny bundles shared by the bundle tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from bundle_helpers import metadata, tiny_model, tiny_tokenizer

from detector.bundle import write_bundle


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
