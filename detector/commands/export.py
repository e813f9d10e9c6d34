"""``python -m detector export CHECKPOINT``: write an inference bundle from any saved checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from detector.bundle.export import checkpoint_weights, export_checkpoint
from detector.bundle.loading import Detector, model_logits
from detector.bundle.onnx import require_onnx
from detector.bundle.quantize import (
    DEFAULT_FP32_MATMULS,
    DEFAULT_MAX_AUROC_DROP,
    DEFAULT_MAX_DECISION_CHANGE,
    Int8Check,
    check_limits,
)
from detector.checkpoint.reader import load_checkpoint_state
from detector.errors import user_error
from detector.module import DetectorModule
from detector.records import read_records
from detector.tokenizer import checkpoint_tokenizer


def score_file(
    model: Any, tokenizer: Any, path: str, max_length: int, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """P(machine) and labels of every row of a labelled data file, for the threshold choice.

    Scored by :class:`detector.bundle.loading.Detector` with ``detector score``'s defaults (batch size,
    length-sorted windows, tokenization), so the threshold is chosen on the very numbers that
    ``python -m detector score BUNDLE path`` later compares with it.
    """
    records = read_records(path)
    detector = Detector(tokenizer, model_logits(model), max_length=max_length)
    probs = [row["prob_machine"] for row in detector.score(records.text, batch_size=batch_size)]
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(records.label)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detector export", description=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint_*.safetensors file or its URL (s3://...)")
    parser.add_argument(
        "--out", default="outputs/models/inference", help="folder (or s3://... URL) receiving the bundle"
    )
    parser.add_argument("--version", default="1.0", help="semantic version X.Y of the bundle")
    parser.add_argument("--name", help="bundle folder name (default model_vX.Y_epochN)")
    parser.add_argument("--no-ema", action="store_true", help="ship the trained weights even when EMA exists")
    parser.add_argument("--val-data", help="labelled file to choose the decision threshold on")
    parser.add_argument(
        "--target-fpr", type=float, default=0.01, help="validation false-positive rate the threshold aims at"
    )
    parser.add_argument("--onnx", action="store_true", help="also write a checked model.onnx")
    parser.add_argument(
        "--quantize",
        action="store_true",
        help="also write model_int8.onnx (implies --onnx), checked against the float model on --val-data "
        "(required) with its own threshold",
    )
    parser.add_argument(
        "--max-auroc-drop", type=float, default=DEFAULT_MAX_AUROC_DROP,
        help="--quantize: refuse when the int8 AUROC on --val-data is lower than the float one by more",
    )  # fmt: skip
    parser.add_argument(
        "--max-decision-change", type=float, default=DEFAULT_MAX_DECISION_CHANGE,
        help="--quantize: refuse when a larger share of --val-data texts changes its decision "
        "(the float model at its threshold, the int8 model at its own)",
    )  # fmt: skip
    parser.add_argument(
        "--fp32-matmuls", type=int, default=DEFAULT_FP32_MATMULS,
        help="--quantize: keep this many MatMuls fp32, those whose quantization alone moves the scores "
        "of 64 --val-data texts most (each costs int8 speed)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export ``checkpoint`` to a bundle; print its path. 2 on bad input (one line on stderr)."""
    args = _parser().parse_args(argv)
    wrong = _quantize_options(args)
    if wrong:
        print(f"detector export: error: {wrong}", file=sys.stderr)
        return 2
    if args.onnx or args.quantize:
        try:
            require_onnx()
        except ImportError as err:
            print(f"detector export: error: {err}", file=sys.stderr)
            return 2
    try:
        print(export(args))
    except (ValueError, OSError) as err:  # corrupt checkpoint, bad data, existing bundle, full disk
        print(f"detector export: error: {user_error(err) or err}", file=sys.stderr)
        return 2
    return 0


def _quantize_options(args: argparse.Namespace) -> str | None:
    try:
        check_limits(args.max_auroc_drop, args.max_decision_change)
    except ValueError as err:
        return f"--{err}".replace("_", "-")
    if args.fp32_matmuls < 0:
        return f"--fp32-matmuls must be >= 0, got {args.fp32_matmuls}"
    if args.quantize and not args.val_data:
        return (
            "--quantize needs --val-data: the int8 model is checked against the float one "
            "(AUROC, decisions changed) and its threshold chosen on labelled validation texts"
        )
    return None


def export(args: argparse.Namespace) -> Path | str:
    """The export ``args`` ask for; returns the bundle's path."""
    checkpoint = load_checkpoint_state(args.checkpoint)
    # LightningCLI adds its own entries (`_instantiator`, `_class_path`) beside the module's arguments.
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = DetectorModule(**hparams).model
    tokenizer = checkpoint_tokenizer(checkpoint, args.checkpoint)
    weights, _ = checkpoint_weights(checkpoint, use_ema=not args.no_ema)
    model.load_state_dict(weights)
    max_length = int(checkpoint.get("datamodule_hyper_parameters", {}).get("max_length", 512))
    val_scores = score_file(model, tokenizer, args.val_data, max_length) if args.val_data else None
    int8 = None
    if args.quantize:
        records = read_records(args.val_data)
        int8 = Int8Check(
            records.text, records.label, args.max_auroc_drop, args.max_decision_change,  # type: ignore[arg-type]
            fp32_matmuls=args.fp32_matmuls,
        )  # fmt: skip
    path = export_checkpoint(
        args.checkpoint, args.out, model, tokenizer, version=args.version, name=args.name,
        use_ema=not args.no_ema, val_scores=val_scores, target_fpr=args.target_fpr, onnx=args.onnx, int8=int8,
        extra_metadata={"max_length": max_length}, load_state=lambda _: checkpoint,
    )  # fmt: skip
    return path
