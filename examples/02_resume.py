"""Resume an interrupted run from a checkpoint, mid-epoch included.

Run from the repository root: ``python examples/02_resume.py``. The first run saves a step
checkpoint every 4 optimizer steps and stops after 5 (as a killed job would); the second continues
from ``checkpoint_step_4`` (mid-epoch: an epoch here is 6 steps) to the end of epoch 1 with the same
flags plus ``--ckpt_path``. After a kill, resume from ``checkpoint_latest.safetensors`` (on SIGTERM or
a first Ctrl-C the checkpoint callback writes it before exiting). On the command line::

    python -m detector fit --config configs/default.yaml \\
        --ckpt_path outputs/checkpoints/checkpoint_latest.safetensors
"""

from __future__ import annotations

import shutil

from common import WORK, data_args, demo_data

from detector.checkpoint.format import read_header
from detector.cli import build_cli

RUN = WORK / "resume"
EMA = '[{"class_path": "callbacks.ema.EMACallback", "init_args": {"decay": 0.9}}]'


def fit(*extra: str):
    args = [
        "fit", *data_args(demo_data()), "--trainer.callbacks", EMA,
        "--trainer.default_root_dir", str(RUN), "--trainer.logger", "false",
        "--checkpoint.dirpath", str(RUN / "checkpoints"), "--summary.path", str(RUN / "summary.json"),
        *extra,
    ]  # fmt: skip
    return build_cli(args)


def main() -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    first = fit("--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "4")
    step_file = RUN / "checkpoints" / "checkpoint_step_4.safetensors"
    state = read_header(step_file)["state"]
    print(
        f"interrupted at step {first.trainer.global_step}; {step_file.name} holds step {state['global_step']}"
    )
    # Same flags, a later stopping point, and the checkpoint to continue from.
    second = fit("--trainer.max_epochs", "2", "--ckpt_path", str(step_file))
    print(f"resumed from step {state['global_step']}, finished at step {second.trainer.global_step}")
    if second.trainer.global_step != 12:  # 96 rows / 16 per batch = 6 steps an epoch
        raise SystemExit(f"expected 12 steps in all, got {second.trainer.global_step}")


if __name__ == "__main__":
    main()
