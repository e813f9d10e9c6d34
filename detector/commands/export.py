"""``python -m detector export CHECKPOINT``: write an inference bundle from any saved checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from detector.bundle.export import checkpoint_weights, export_checkpoint
from detector.checkpoint.reader import load_checkpoint_state
from detector.errors import user_error
from detector.module import DetectorModule
from detector.records import read_records
from detector.tokenizer import checkpoint_tokenizer


@torch.no_grad()
def score_file(
    model: Any, tokenizer: Any, path: str, max_length: int, batch_size: int = 32
) -> tuple[Any, Any]:
    """P(machine) and labels of every row of a labelled data file, for the threshold choice."""
    records = read_records(path)
    model.eval()
    probs = []
    for start in range(0, len(records), batch_size):
        batch = tokenizer(
            records.text[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        probs.append(model(**batch).logits.float().softmax(-1)[:, 1])
    return torch.cat(probs), torch.tensor(records.label)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detector export", description=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint_*.safetensors file")
    parser.add_argument("--out", default="outputs/models/inference", help="folder receiving the bundle")
    parser.add_argument("--version", default="1.0", help="semantic version X.Y of the bundle")
    parser.add_argument("--name", help="bundle folder name (default model_vX.Y_epochN)")
    parser.add_argument("--no-ema", action="store_true", help="ship the trained weights even when EMA exists")
    parser.add_argument("--val-data", help="labelled file to choose the decision threshold on")
    parser.add_argument("--target-fpr", type=float, default=0.01)
    parser.add_argument("--onnx", action="store_true", help="also write a checked model.onnx")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export ``checkpoint`` to a bundle; print its path. 2 on bad input (one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        print(export(args))
    except (ValueError, OSError) as err:  # corrupt checkpoint, bad data, existing bundle, full disk
        print(f"detector export: error: {user_error(err) or err}", file=sys.stderr)
        return 2
    return 0


def export(args: argparse.Namespace) -> Path:
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
    path = export_checkpoint(
        Path(args.checkpoint), args.out, model, tokenizer, version=args.version, name=args.name,
        use_ema=not args.no_ema, val_scores=val_scores, target_fpr=args.target_fpr, onnx=args.onnx,
        extra_metadata={"max_length": max_length}, load_state=lambda _: checkpoint,
    )  # fmt: skip
    return path
