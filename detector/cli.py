"""The ``python -m detector`` command line: a LightningCLI with this project's defaults and links."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.prediction_writer import PredictionWriter
from callbacks.run_summary import RunSummary
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.checkpoint.reader import read_checkpoint_header, verify_checkpoint
from detector.data import DetectorDataModule
from detector.module import DetectorModule
from detector.tokenizer import checkpoint_tokenizer_files, save_tokenizer_files

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "outputs",
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "outputs", "name": "logs"},
    },
    # Every checkpoint is written and read as checksummed safetensors, never a pickle.
    "plugins": [{"class_path": "detector.checkpoint.plugin.SafetensorsCheckpointIO"}],
    # The data module shards and orders batches itself (resumable, a pure function of seed and epoch).
    "use_distributed_sampler": False,
}


class DetectorCLI(LightningCLI):
    """LightningCLI for ``DetectorModule`` and ``DetectorDataModule``, seeded by default.

    Every run has a ``SafetensorsTopKCheckpoint`` (``--checkpoint.*``), a ``PredictionWriter``
    (``--prediction_writer.*``, used by ``predict``) and a ``RunSummary`` (``--summary.*``, at the
    end of ``fit``). The tokenizer's vocabulary size flows from the
    data module to the model, and the model's ``pretrained`` backbone tells the data module which
    tokenizer to load.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always present, configured as --checkpoint.*, --prediction_writer.* and --summary.*.
        parser.add_lightning_class_args(SafetensorsTopKCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments(
            "data", "model.vocab_size", compute_fn=lambda data: data.vocab_size, apply_on="instantiate"
        )

    def _parse_ckpt_path(self) -> None:
        """Use a checkpoint's saved model hyperparameters, as LightningCLI does, but without pickle.

        Lightning's own version reads the file with ``torch.load``; this reads the safetensors header.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).exists():
            return
        hparams = dict(verified_header(ckpt_path)["state"].get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        ckpt_path, data = config.get("ckpt_path"), config["data"]
        if ckpt_path and Path(ckpt_path).exists() and data.get("tokenizer_path") is None:
            data["tokenizer_path"] = checkpoint_tokenizer_folder(ckpt_path, data["tokenizer_root"])


@functools.cache
def _verified(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    verify_checkpoint(path)
    return read_checkpoint_header(path)


def verified_header(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's header, read only once its checksum has been verified (once per file version).

    The CLI takes hyperparameters, tokenizer files and a ``pretrained`` path from the header: a flipped
    byte there must be reported as a corrupt file, not surface as a strange option or model error.

    Raises:
        CheckpointFormatError: naming the file and what is wrong.
    """
    info = Path(ckpt_path).stat()
    return _verified(str(ckpt_path), info.st_size, info.st_mtime_ns)


def checkpoint_tokenizer_folder(ckpt_path: str, root: str) -> str | None:
    """The checkpoint's tokenizer, written once under ``root/checkpoint-<checksum>``; ``None`` if absent."""
    header = verified_header(ckpt_path)
    files = checkpoint_tokenizer_files(header["state"])
    if files is None:
        return None
    return str(
        save_tokenizer_files(files, Path(root) / f"checkpoint-{header['checksum'].split(':')[-1][:16]}")
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
