"""Write an inference bundle: a Hugging Face model folder plus metadata and card, atomically, no pickle.

A bundle ``root/name/`` holds ``config.json``, ``model.safetensors`` (full, unsharded), the tokenizer
files, ``training_metadata.json``, ``README.md`` (a model card) and, optionally, ``model.onnx`` and
its int8 copy ``model_int8.onnx``. It loads with ``AutoModelForSequenceClassification.from_pretrained``
and ``transformers.pipeline`` without any ``detector`` code, and with
:func:`detector.bundle.loading.load_detector`.

Everything is written into a hidden temporary folder inside ``root`` and committed by
:func:`detector.atomic.new_dir` (``.{name}.tmp-{pid}-{random}``, which no bundle listing matches and
:func:`detector.atomic.clean_stale_temps` removes after a crash; every file and folder fsynced, renamed
into place, ``root`` fsynced). A failure leaves no bundle folder and no partial files; an existing
bundle is never overwritten.

TorchScript is not offered: it is deprecated by PyTorch, Lightning and transformers. Use the ONNX
export here (``onnx=True``) or ``torch.export``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from detector.atomic import TEMP_MARKER, new_dir
from detector.bundle.card import render_card
from detector.bundle.integrity import BundleIntegrityError, write_manifest
from detector.bundle.onnx import export_and_check, require_onnx
from detector.bundle.provenance import git_state, package_versions, utc_now
from detector.bundle.quantize import Int8Check, add_int8
from detector.bundle.remote import download_bundle, is_complete, local_bundle_root, upload_bundle
from detector.checkpoint.objects import is_url, join
from detector.scoring import DEFAULT_THRESHOLD, ID2LABEL, LABEL2ID

METADATA_FILE = "training_metadata.json"
CARD_FILE = "README.md"
BUNDLE_FORMAT = 1
NO_SHARDING = "100000GB"
REQUIRED_METADATA = (
    "version",
    "epoch",
    "step",
    "metrics",
    "checkpoint",
    "seed",
    "config",
    "data_fingerprint",
    "weights",
    "decision_threshold",
    "target_fpr",
    "threshold_source",
)


class BundleExistsError(FileExistsError):
    """A bundle of that name already exists; bundles are never overwritten."""


def _jsonable(obj: Any) -> Any:
    # Strict JSON: tensors become numbers, non-finite floats null, other objects (paths) strings.
    if isinstance(obj, Tensor | np.ndarray | np.generic):
        obj = obj.tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def _check_name(root: Path, name: str) -> Path:
    if not name or Path(name).name != name or name in (".", "..") or TEMP_MARKER in name:
        raise ValueError(f"bundle name must be one plain folder name without {TEMP_MARKER!r}, got {name!r}")
    final = root / name
    if os.path.lexists(final):
        raise BundleExistsError(
            f"bundle {final} already exists and bundles are never overwritten; bump the version"
        )
    return final


def _check_model(model: PreTrainedModel, weights: Mapping[str, Tensor] | None) -> None:
    if model.config.id2label != ID2LABEL or model.config.label2id != LABEL2ID:
        raise ValueError(f"model labels must be {ID2LABEL}, got id2label={model.config.id2label}")
    if weights is None:
        return
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(weights need Hugging Face key names: strip a LightningModule's 'model.' prefix)"
        )
    wrong = [k for k, shape in expected.items() if tuple(weights[k].shape) != shape]
    if wrong:
        raise ValueError(f"weights have the wrong shape for {wrong[:5]}")


def training_metadata(metadata: Mapping[str, Any], model: PreTrainedModel, name: str) -> dict[str, Any]:
    """``metadata`` checked for ``REQUIRED_METADATA`` and completed with defaults and provenance."""
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"bundle metadata lacks {missing}; required: {list(REQUIRED_METADATA)}")
    threshold = metadata["decision_threshold"]
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"decision_threshold must be a probability in [0, 1], got {threshold!r}")
    completed = {
        "format": "detector-bundle",
        "format_version": BUNDLE_FORMAT,
        "name": name,
        "created_at": utc_now(),
        "labels": {str(k): v for k, v in ID2LABEL.items()},
        "max_length": int(model.config.max_position_embeddings),
        "default_threshold": DEFAULT_THRESHOLD,
        "onnx_max_abs_logit_diff": None,
        "int8": None,
        "packages": package_versions(),
        "git": git_state(),
    }
    return _jsonable({**completed, **metadata})


def _write_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, max_length: int) -> None:
    tokenizer.save_pretrained(folder)
    # So that `truncation=True` alone truncates to the length the model was trained on.
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["model_max_length"] = max_length
        _write_json(config_file, config)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    # One file, no shards: transformers' "Writing model shards" and "Loading weights" bars would only
    # clutter the console (and the one-line errors of the commands).
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _write_contents(
    folder: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    weights: Mapping[str, Tensor] | None,
    metadata: dict[str, Any],
    onnx: bool,
    int8: Int8Check | None = None,
) -> None:
    state = {k: v.detach().cpu() for k, v in weights.items()} if weights is not None else None
    with _no_progress_bar():
        model.save_pretrained(folder, state_dict=state, max_shard_size=NO_SHARDING)
    _write_tokenizer(tokenizer, folder, metadata["max_length"])
    if onnx:
        # Export from the bundle's own files, so the ONNX graph holds exactly the weights shipped.
        with _no_progress_bar():
            reloaded = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        metadata["onnx_max_abs_logit_diff"] = export_and_check(
            reloaded, tokenizer, folder, metadata["max_length"]
        )
        if int8 is not None:
            add_int8(folder, reloaded, tokenizer, metadata, int8)
    _write_json(folder / METADATA_FILE, metadata)


def write_bundle(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    root: str | Path,
    name: str,
    metadata: Mapping[str, Any],
    *,
    weights: Mapping[str, Tensor] | None = None,
    onnx: bool = False,
    location: str | None = None,
    int8: Int8Check | None = None,
) -> Path | str:
    """Write the bundle ``root/name/`` atomically and return its path.

    ``root`` may be an object-store URL (``s3://bucket/models``): the bundle is written in a local temp
    folder, then uploaded with ``SHA256SUMS`` last (:mod:`detector.bundle.remote`); its URL is returned.

    Args:
        model: the classifier; gives the architecture, config and (without ``weights``) the weights.
        tokenizer: saved with ``save_pretrained``; its ``model_max_length`` becomes ``max_length``.
        root: the folder that receives the bundle (created if missing).
        name: the bundle folder's name, e.g. ``model_v1.0_epoch3``.
        metadata: the ``REQUIRED_METADATA`` fields, plus optional ones (``max_length``, default
            the model's ``max_position_embeddings``; ``base_model``; ``dataset``); written to
            ``training_metadata.json`` with the date, package versions and git state added.
        weights: a full state dict with Hugging Face key names (e.g. the EMA weights) to ship
            instead of the model's own; DTensors must be gathered to full tensors by the caller.
        onnx: also write ``model.onnx``, checked against PyTorch (max abs logit diff <= 1e-4).
        location: where the bundle will be read from, for its model card (default: where it is written).
        int8: also write ``model_int8.onnx`` (implies ``onnx``), quantized from ``model.onnx`` and
            checked on ``int8``'s validation texts; its threshold and check go to the metadata's
            ``int8`` entry (:func:`detector.bundle.quantize.add_int8`).

    Raises:
        BundleExistsError: ``root/name`` exists.
        ValueError: bad name, labels, weights or metadata, or an ONNX mismatch.
        Int8CheckError: the int8 model is past ``int8``'s limits (nothing is written).
        ImportError: ``onnx`` without the ``onnx`` extra installed (the message says how to install it).
    """
    if is_url(root):
        return _write_remote(model, tokenizer, str(root), name, metadata, weights, onnx, int8)
    root = Path(root)
    final = _check_name(root, name)
    onnx = onnx or int8 is not None
    if onnx:
        require_onnx()
    _check_model(model, weights)
    completed = training_metadata(metadata, model, name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with new_dir(final) as tmp:
            _write_contents(tmp, model, tokenizer, weights, completed, onnx, int8)
            (tmp / CARD_FILE).write_text(render_card(name, location or str(final), completed))
            write_manifest(tmp)
    except FileExistsError as err:
        if isinstance(err, BundleExistsError):
            raise
        raise BundleExistsError(
            f"bundle {final} appeared during export; bundles are never overwritten"
        ) from err
    return final


def _write_remote(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    root: str,
    name: str,
    metadata: Mapping[str, Any],
    weights: Mapping[str, Tensor] | None,
    onnx: bool,
    int8: Int8Check | None,
) -> str:
    final = join(root, name)
    if is_complete(final):
        raise BundleExistsError(f"bundle {final} exists; bundles are never overwritten")
    with local_bundle_root() as local_root:
        local = write_bundle(
            model,
            tokenizer,
            local_root,
            name,
            metadata,
            weights=weights,
            onnx=onnx,
            location=final,
            int8=int8,
        )
        try:
            return upload_bundle(Path(local), final)
        except FileExistsError as err:
            raise BundleExistsError(str(err)) from err


def read_metadata(bundle: str | Path) -> dict[str, Any]:
    """The ``training_metadata.json`` of ``bundle`` (a folder, or the URL of a complete bundle)."""
    if is_url(bundle):
        bundle = download_bundle(str(bundle))
    path = Path(bundle) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {bundle} is not a detector bundle")
    try:
        metadata = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleIntegrityError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise BundleIntegrityError(f"{path}: not a JSON object")
    return metadata
