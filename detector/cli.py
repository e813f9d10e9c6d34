"""The ``python -m detector`` command line: a LightningCLI with this project's defaults and links."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from detector.data import DetectorDataModule
from detector.module import DetectorModule

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "outputs",
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "outputs", "name": "logs"},
    },
    # Every checkpoint is written and read as checksummed safetensors, never a pickle.
    "plugins": [{"class_path": "detector.checkpoint_io.SafetensorsCheckpointIO"}],
    # The data module shards and orders batches itself (resumable, a pure function of seed and epoch).
    "use_distributed_sampler": False,
}


class DetectorCLI(LightningCLI):
    """LightningCLI for ``DetectorModule`` and ``DetectorDataModule``, seeded by default.

    The tokenizer's vocabulary size flows from the data module to the model, and the model's
    ``pretrained`` backbone tells the data module which tokenizer to load.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments(
            "data", "model.vocab_size", compute_fn=lambda data: data.vocab_size, apply_on="instantiate"
        )


def build_cli(args: list[str] | None = None, run: bool = True) -> DetectorCLI:
    """Build (and by default run) the CLI on ``args`` (``sys.argv[1:]`` when ``None``)."""
    return DetectorCLI(
        DetectorModule,
        DetectorDataModule,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
