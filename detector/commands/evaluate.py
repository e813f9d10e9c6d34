"""``detector evaluate``: score a labelled data file with a checkpoint, a bundle and/or the TF-IDF baseline.

Writes a report folder (see :func:`detector.evaluation.report.write_report`) with every system side by side::

    python -m detector evaluate --data val.jsonl \
        --checkpoint outputs/checkpoints/checkpoint_best_val_f1.safetensors \
        --baseline-train train.jsonl --out outputs/reports/val
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from detector.bundle.export import checkpoint_weights
from detector.bundle.writer import read_metadata
from detector.checkpoint.reader import load_checkpoint_state
from detector.commands import add_no_verify
from detector.data import EncodedDataset, pad_batch
from detector.evaluation.baseline import train_baseline
from detector.evaluation.report import write_report
from detector.records import Records, read_records
from detector.scoring import prob_machine
from detector.tokenizer import checkpoint_tokenizer

DETECTOR, BASELINE = "detector", "tfidf_baseline"


def score_checkpoint(
    checkpoint: str | Path,
    texts: Sequence[str],
    batch_size: int | None = None,
    device: str = "cpu",
    weights: Literal["ema", "raw"] = "ema",
) -> np.ndarray:
    """P(machine) per text from a checkpoint (see :func:`score_checkpoint_weights`)."""
    return score_checkpoint_weights(checkpoint, texts, batch_size, device, weights)[0]


def score_checkpoint_weights(
    checkpoint: str | Path,
    texts: Sequence[str],
    batch_size: int | None = None,
    device: str = "cpu",
    weights: Literal["ema", "raw"] = "ema",
) -> tuple[np.ndarray, str]:
    """P(machine) per text from a checkpoint, batched in file order as Lightning's ``test`` does, and
    which weights scored: ``ema`` (the default, as ``test`` and the bundles; the raw ones when the
    checkpoint has no EMA) or ``raw``.

    The tokenizer is the one stored in the checkpoint (:func:`detector.tokenizer.checkpoint_tokenizer`),
    so no tokenizer folder or training file is needed. Tokenization (``max_length``) and the default
    batch size are the checkpoint's data settings, so the scores equal those ``python -m detector
    test`` computes on the same file.
    """
    from detector.module import DetectorModule

    state = load_checkpoint_state(checkpoint)
    data_hparams = dict(state.get("datamodule_hyper_parameters") or {})
    tokenizer = checkpoint_tokenizer(state, checkpoint)
    max_length = int(data_hparams.get("max_length", 256))
    batch_size = (
        batch_size or data_hparams.get("eval_batch_size") or 2 * int(data_hparams.get("batch_size", 16))
    )
    # LightningCLI adds its own entries (`_instantiator`, `_class_path`) beside the module's arguments.
    hparams = {k: v for k, v in state.get("hyper_parameters", {}).items() if not k.startswith("_")}
    module = DetectorModule(**hparams)
    chosen, source = checkpoint_weights(state, use_ema=weights == "ema")
    module.model.load_state_dict(chosen)
    module = module.to(device).eval()
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    dataset = EncodedDataset(encoded, [None] * len(encoded))
    scores = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = pad_batch(items, tokenizer.pad_token_id or 0)
            logits = module(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores.append(prob_machine(logits).cpu())
    return torch.cat(scores).numpy(), "ema" if source == "ema" else "raw"


def score_bundle(
    bundle: str | Path, texts: Sequence[str], batch_size: int = 32, device: str = "cpu", verify: bool = True
) -> np.ndarray:
    """P(machine) per text from an inference bundle (:func:`detector.bundle.loading.load_detector`)."""
    from detector.bundle.loading import load_detector

    results = load_detector(bundle, device=device, verify=verify).score(texts, batch_size=batch_size)
    return np.array([row["prob_machine"] for row in results], dtype=np.float64)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m detector evaluate``."""
    parser = argparse.ArgumentParser(
        prog="detector evaluate",
        description="Evaluate on a labelled JSONL/CSV/Parquet file: metrics.json, summary.md, plots.",
    )
    parser.add_argument(
        "--data", required=True, help="labelled file to evaluate on (text, label[, source, generator])"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="a training checkpoint (.safetensors) to score with")
    model.add_argument("--bundle", help="an inference bundle folder to score with")
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="--checkpoint: score the EMA weights (what fit ranks and bundles ship; the raw ones when the "
        "checkpoint has no EMA) or the raw training weights",
    )
    parser.add_argument("--baseline-train", help="train the TF-IDF baseline on this file and report it too")
    parser.add_argument("--out", required=True, help="report folder to write")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: no intervals)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--batch-size", type=int, default=None, help="scoring batch size")
    parser.add_argument("--device", default="cpu", help="PyTorch device for the checkpoint or bundle")
    add_no_verify(parser)
    return parser


def score_systems(args: argparse.Namespace, records: Records) -> dict[str, np.ndarray]:
    """P(machine) per row for each system the arguments name, detector first.

    Sets ``args.scored_weights`` to the weights the detector scored with (``ema``, ``raw``, or
    the bundle's shipped weights, as its metadata names them).
    """
    systems: dict[str, np.ndarray] = {}
    args.scored_weights = None
    if args.checkpoint:
        systems[DETECTOR], args.scored_weights = score_checkpoint_weights(
            args.checkpoint, records.text, args.batch_size, args.device, args.weights
        )
    if args.bundle:
        args.scored_weights = f"the bundle's ({read_metadata(args.bundle).get('weights')})"
        systems[DETECTOR] = score_bundle(
            args.bundle, records.text, args.batch_size or 32, args.device, verify=not args.no_verify
        )
    if args.baseline_train:
        systems[BASELINE] = train_baseline(args.baseline_train).predict_proba(records.text)
    return systems


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``detector evaluate``; 0 on success, 2 on bad input (the message goes to stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.bundle or args.baseline_train):
        parser.error("give --checkpoint or --bundle, and/or --baseline-train")
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0, got {args.bootstrap}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        records = read_records(args.data)
        systems = score_systems(args, records)
        report = write_report(
            systems,
            [int(label) for label in records.label if label is not None],  # all labelled (read_records)
            records.extra,
            args.out,
            bootstrap=args.bootstrap,
            seed=args.seed,
            data=str(args.data),
            weights=args.scored_weights,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"detector evaluate: error: {err}", file=sys.stderr)
        return 2
    print(_overview(report["overall"], args.out, args.scored_weights))
    return 0


def _overview(overall: Mapping[str, Mapping[str, Any]], out: str, weights: str | None = None) -> str:
    lines = [f"report written to {out}"]
    if weights is not None:
        lines.append(f"scored weights: {weights}")
    for name, entry in overall.items():
        values = ", ".join(
            f"{m} {entry[m]:.4f}" for m in ("auroc", "f1", "tpr_at_1fpr", "ece") if entry[m] is not None
        )
        lines.append(f"{name}: {values}")
    return "\n".join(lines)
