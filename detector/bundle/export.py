"""Bundle names, weights, threshold and retention for exports, and ``checkpoint -> bundle`` after the fact.

The :class:`~callbacks.inference_export.InferenceExportCallback` and :func:`export_checkpoint` both
end in :func:`detector.bundle.writer.write_bundle`; what they share lives here, free of any Trainer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from detector.atomic import fsync_dir, remove_path
from detector.bundle import remote
from detector.bundle.quantize import Int8Check
from detector.bundle.thresholds import DEFAULT_TARGET_FPR, rates_at_threshold, threshold_at_fpr
from detector.bundle.writer import METADATA_FILE, write_bundle
from detector.checkpoint.objects import is_url, join
from detector.checkpoint.reader import load_checkpoint_state
from detector.scoring import DEFAULT_THRESHOLD

VERSION_PATTERN = re.compile(r"\d+\.\d+(\.\d+)?")
MODULE_PREFIX = "model."  # DetectorModule keeps the Hugging Face classifier in its attribute `model`
# callbacks.ema.EMACallback keeps its averaged tensors under this field of its checkpoint state;
# Lightning's own EMAWeightAveraging instead puts them in "state_dict" and the raw ones in
# "current_model_state" (both layouts are read).
EMA_STATE_FIELD = "ema"


@runtime_checkable
class ValidationScores(Protocol):
    """A LightningModule that keeps its last validation pass's P(machine) and labels.

    ``last_val_scores()`` returns ``(probs, labels)``, 1-D tensors over the whole validation set
    (gathered across ranks), or None before any validation.
    """

    def last_val_scores(self) -> tuple[Tensor, Tensor] | None: ...


def validate_version(version: str) -> str:
    """``version`` if it is semantic ``X.Y`` or ``X.Y.Z`` (digits only), else ValueError."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"version must be semantic X.Y or X.Y.Z, e.g. '1.0', got {version!r}")
    return version


def bundle_name(version: str, epoch: int | None = None) -> str:
    """``model_v{version}_epoch{epoch}``, or ``model_v{version}_final`` when ``epoch`` is None."""
    return f"model_v{validate_version(version)}_" + ("final" if epoch is None else f"epoch{epoch}")


def final_name_at(version: str, step: int) -> str:
    """``model_v{version}_final_step{step}``: a run's final bundle once the run was extended past ``step``."""
    return f"{bundle_name(version)}_step{int(step)}"


def bundle_at(root: str | Path, name: str) -> str | Path:
    """The bundle ``name`` in ``root``: ``root/name`` as a URL when ``root`` is one, else as a Path."""
    return join(str(root), name) if is_url(root) else Path(root) / name


def existing_bundles(root: str | Path, version: str) -> list[str]:
    """Names of the committed bundles of ``version`` in ``root`` (temp folders excluded; on an object
    store, the bundles with their marker), sorted."""
    pattern = re.compile(rf"model_v{re.escape(validate_version(version))}_(final|final_step\d+|epoch\d+)")
    if is_url(root):
        return [name for name in remote.complete_bundles(str(root)) if pattern.fullmatch(name)]
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name))


def remove_bundle(path: str | Path) -> None:
    """Delete a bundle without ever leaving a partial one under its name.

    :func:`detector.atomic.remove_path`: the folder is first renamed to a hidden temp name (atomic,
    fsynced), so a crash mid-delete leaves only a temp folder for
    :func:`detector.atomic.clean_stale_temps`, never a half-deleted bundle that looks complete.
    Deleting what is already gone (a kill after an earlier removal) is done, not an error. On an
    object store: :func:`detector.bundle.remote.remove_bundle` (its marker first).
    """
    if is_url(path):
        remote.remove_bundle(str(path))
    else:
        remove_path(Path(path))


def bundle_origin(path: str | Path) -> tuple[str | None, int | None]:
    """``(run_id, step)`` from a bundle's metadata; ``None`` for what it does not say or cannot be read."""
    try:
        if is_url(path):
            metadata = json.loads(remote.read_file(str(path), METADATA_FILE).decode("utf-8"))
        else:
            metadata = json.loads((Path(path) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(metadata, dict):
        return None, None
    run_id, step = metadata.get("run_id"), metadata.get("step")
    return (run_id if isinstance(run_id, str) else None), (step if isinstance(step, int) else None)


@dataclass
class LineagePlan:
    """What a (resumed) run does with the bundles of its version already in its folder.

    ``foreign``: written by another run (or by no known run): the run is refused, nothing touched.
    ``stale``: written by this run's lineage after the step it resumes from (a kill before the
    checkpoint recording them): removed, the resumed run writes them again when due.
    """

    foreign: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)


def plan_lineage(
    root: str | Path, version: str, run_id: str, step: int, written: Sequence[str]
) -> LineagePlan:
    """Sort the bundles of ``version`` in ``root`` for run ``run_id`` resuming at ``step`` (no Trainer).

    A bundle is this run's when its metadata names ``run_id`` or when it is in ``written`` (the epoch
    bundles the checkpoint says the run kept); the lineage's bundles up to ``step`` stay as they are.
    """
    plan = LineagePlan()
    for name in existing_bundles(root, version):
        owner, at = bundle_origin(bundle_at(root, name))
        if owner != run_id or at is None:
            if name not in written:
                plan.foreign.append(name)
        elif at > step:
            plan.stale.append(name)
    return plan


def retire_final(root: str | Path, version: str, run_id: str, step: int) -> tuple[bool, str | None]:
    """Before run ``run_id`` writes its final bundle at ``step``: ``(already_there, kept_as)``.

    ``already_there``: the lineage's final bundle of ``step`` exists (a finished run re-run), nothing to
    write. Otherwise the lineage's earlier final bundle (the run being extended) is renamed to
    :func:`final_name_at` its step, its name returned, so the new final bundle takes the plain name.
    On an object store the rename is :func:`detector.bundle.remote.move_bundle` (copy, then delete).
    """
    if is_url(root):
        return _retire_remote_final(str(root), version, run_id, step)
    root = Path(root)
    final = root / bundle_name(version)
    owner, at = bundle_origin(final) if final.is_dir() else (None, None)
    if owner != run_id or at is None:
        return False, None
    if at == step:
        return True, None
    kept = final_name_at(version, at)
    if (root / kept).exists():  # the same final state already kept under that name
        remove_bundle(final)
        return False, None
    os.rename(final, root / kept)
    fsync_dir(root)  # the rename survives a power loss, as every other commit here does
    return False, kept


def _retire_remote_final(root: str, version: str, run_id: str, step: int) -> tuple[bool, str | None]:
    final = join(root, bundle_name(version))
    owner, at = bundle_origin(final) if remote.is_complete(final) else (None, None)
    if owner != run_id or at is None:
        return False, None
    if at == step:
        return True, None
    kept = final_name_at(version, at)
    if remote.is_complete(join(root, kept)):  # a kill after the copy, before the delete
        remote.remove_bundle(final)
        return False, None
    remote.move_bundle(final, join(root, kept))
    return False, kept


def hf_state_dict(module_state: Mapping[str, Tensor], prefix: str = MODULE_PREFIX) -> dict[str, Tensor]:
    """The Hugging Face weights in a LightningModule state dict: ``prefix`` stripped, on the CPU.

    DTensors (FSDP2) are gathered with ``full_tensor()``, a collective: call it on every rank.
    """
    weights = {}
    for key, value in module_state.items():
        if key.startswith(prefix):
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            weights[key[len(prefix) :]] = value.detach().cpu()
    if not weights:
        heads = sorted({k.split(".")[0] for k in module_state})
        raise ValueError(f"no key starts with {prefix!r}; keys start with {heads}")
    return weights


def choose_threshold(
    scores: tuple[Tensor, Tensor] | None, target_fpr: float = DEFAULT_TARGET_FPR
) -> dict[str, Any]:
    """Threshold metadata from validation ``(probs, labels)``; the 0.5 default, with the reason, without."""
    fields: dict[str, Any] = {"target_fpr": target_fpr, "threshold_val_fpr": None, "threshold_val_tpr": None}
    if scores is None:
        reason = "no validation scores (the module has no last_val_scores() or it returned None)"
        return {
            **fields,
            "decision_threshold": DEFAULT_THRESHOLD,
            "threshold_source": f"default 0.5: {reason}",
        }
    probs, labels = scores
    try:
        threshold = threshold_at_fpr(probs, labels, target_fpr)
    except ValueError as err:
        return {**fields, "decision_threshold": DEFAULT_THRESHOLD, "threshold_source": f"default 0.5: {err}"}
    fpr, tpr = rates_at_threshold(probs, labels, threshold)
    n_human = int((labels == 0).sum())
    source = f"validation set ({n_human} human, {len(labels) - n_human} machine texts)"
    return {**fields, "decision_threshold": threshold, "threshold_source": source,
            "threshold_val_fpr": fpr, "threshold_val_tpr": tpr}  # fmt: skip


def checkpoint_weights(checkpoint: Mapping[str, Any], use_ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """``(Hugging Face weights, "ema" | "trained")`` from a Lightning checkpoint dict.

    The EMA weights are the ``EMACallback`` state's ``ema`` tensors once it has folded in an update;
    before that the EMA equals the training weights, which are shipped as such.
    """
    if use_ema:
        for state in checkpoint.get("callbacks", {}).values():
            if (
                isinstance(state, Mapping)
                and EMA_STATE_FIELD in state
                and int(state.get("num_updates", 0)) > 0
            ):
                return hf_state_dict(state[EMA_STATE_FIELD]), "ema"
        if "current_model_state" in checkpoint:  # Lightning's WeightAveraging: state_dict is the average
            return hf_state_dict(checkpoint["state_dict"]), "ema"
    raw = checkpoint.get("current_model_state", checkpoint["state_dict"])
    return hf_state_dict(raw), "trained"


def _default_load_state(path: Path | str) -> dict[str, Any]:
    return load_checkpoint_state(path)


def export_checkpoint(
    checkpoint_path: str | Path,
    out_root: str | Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    version: str = "1.0",
    name: str | None = None,
    use_ema: bool = True,
    val_scores: tuple[Tensor, Tensor] | None = None,
    target_fpr: float = DEFAULT_TARGET_FPR,
    onnx: bool = False,
    int8: Int8Check | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    load_state: Callable[[Path | str], Mapping[str, Any]] | None = None,
) -> Path | str:
    """Write a bundle from a saved checkpoint through :func:`write_bundle`; return its path (or URL).

    Args:
        checkpoint_path: a checkpoint in the project's safetensors format.
        out_root: the folder receiving the bundle (``outputs/models/inference``), or its URL (``s3://...``).
        model: a classifier of the checkpoint's architecture (its weights are not used).
        tokenizer: the tokenizer the checkpoint was trained with.
        version: semantic ``X.Y`` or ``X.Y.Z``; the name defaults to ``model_v{version}_epoch{N}``.
        use_ema: ship the EMA weights when the checkpoint holds them.
        val_scores: validation ``(probs, labels)`` of these weights, for the threshold at
            ``target_fpr``; without them the threshold is 0.5 and the metadata says why.
        onnx: also write ``model.onnx``.
        int8: also write ``model_int8.onnx``, checked on these validation texts (see
            :func:`detector.bundle.writer.write_bundle`).
        extra_metadata: fields that override those read from the checkpoint (e.g. ``metrics``).
        load_state: reads the checkpoint dict; defaults to
            :func:`detector.checkpoint.reader.load_checkpoint_state`.
    """
    path = checkpoint_path if is_url(checkpoint_path) else Path(checkpoint_path)
    checkpoint = (load_state or _default_load_state)(path)
    weights, source = checkpoint_weights(checkpoint, use_ema)
    epoch = int(checkpoint.get("epoch", 0))
    config = {
        "model": checkpoint.get("hyper_parameters", {}),
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
    }
    metadata = {
        "version": validate_version(version),
        "epoch": epoch,
        "step": int(checkpoint.get("global_step", 0)),
        "metrics": checkpoint.get("metrics", {}),
        "checkpoint": str(path),
        "seed": checkpoint.get("seed"),
        "config": config,
        "data_fingerprint": checkpoint.get("data_fingerprint"),
        "weights": source,
        **choose_threshold(val_scores, target_fpr),
        **(extra_metadata or {}),
    }
    name = name or bundle_name(version, epoch)
    return write_bundle(model, tokenizer, out_root, name, metadata, weights=weights, onnx=onnx, int8=int8)
