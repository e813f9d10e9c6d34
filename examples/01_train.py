"""Train with automatic checkpoints: the command line (LightningCLI) with EMA and bundle export.

Run from the repository root: ``python examples/01_train.py``. Equivalent to::

    python -m detector fit --config configs/default.yaml --checkpoint.every_n_train_steps 4 ...

Writes under ``outputs/examples/train/``, the one folder ``--trainer.default_root_dir`` names:
``checkpoints/`` (latest, best, top-K, periodic), ``models/inference/`` (bundles), ``logs/``
(metrics.csv and TensorBoard events) and ``summary.json``.
"""

from __future__ import annotations

import json

from common import WORK, data_args, demo_data

from detector.cli import build_cli

RUN = WORK / "train"
CALLBACKS = [
    {"class_path": "callbacks.ema.EMACallback", "init_args": {"decay": 0.9, "warmup": True}},
    {"class_path": "callbacks.inference_export.InferenceExportCallback", "init_args": {"version": "1.0"}},
]


def main() -> None:
    if (RUN / "models/inference").exists():
        raise SystemExit(
            f"{RUN} holds an earlier run; delete it to train again (bundles are never overwritten)"
        )
    args = [
        "fit", *data_args(demo_data()),
        # One folder for the whole run: checkpoints, bundles, logs and summary go under it.
        "--trainer.max_epochs", "3", "--trainer.default_root_dir", str(RUN),
        "--trainer.callbacks", json.dumps(CALLBACKS),
        # The checkpoint callback is always there; its options are --checkpoint.*.
        "--checkpoint.monitor", "val_f1",
        "--checkpoint.mode", "max", "--checkpoint.save_top_k", "2",
        "--checkpoint.every_n_train_steps", "4", "--checkpoint.keep_last_steps", "2",
    ]  # fmt: skip
    cli = build_cli(args)
    checkpoint = cli.trainer.checkpoint_callback
    print(f"steps: {cli.trainer.global_step}; best checkpoint: {checkpoint.best_model_path}")
    for path in sorted((RUN / "checkpoints").iterdir()):
        print(f"  {path.name}")


if __name__ == "__main__":
    main()
