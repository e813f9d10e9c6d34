"""The ``python -m detector`` command line: a LightningCLI with this project's defaults and links."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.ema import EMACallback
from callbacks.plain_progress import PlainProgress
from callbacks.prediction_writer import PredictionWriter
from callbacks.run_summary import RunSummary
from callbacks.safetensors_checkpoint import SafetensorsTopKCheckpoint
from detector.checkpoint.compat import run_cli_subcommand
from detector.checkpoint.objects import is_url, local
from detector.checkpoint.reader import read_checkpoint_header, verify_checkpoint
from detector.data import DetectorDataModule
from detector.ema import EMASchedule
from detector.module import DetectorModule
from detector.run_folder import checkpoint_exists, earlier_checkpoints, refusal, resolve_last
from detector.tokenizer import checkpoint_tokenizer_files, save_tokenizer_files

DEFAULT_ROOT = "outputs"
TRAINER_DEFAULTS: dict[str, Any] = {
    # Every file of a run goes under this folder (see `run_paths`): one option moves a whole run.
    "default_root_dir": DEFAULT_ROOT,
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": DEFAULT_ROOT, "name": "logs"},
    },
    # Every checkpoint is written and read as checksummed safetensors, never a pickle.
    "plugins": [{"class_path": "detector.checkpoint.plugin.SafetensorsCheckpointIO"}],
    # The data module shards and orders batches itself (resumable, a pure function of seed and epoch).
    "use_distributed_sampler": False,
}

# (config section, option, path under trainer.default_root_dir) of every path option left unset.
RUN_PATHS = (
    ("data", "tokenizer_root", "tokenizer"),
    ("data", "demo_dir", "demo_data"),
    ("checkpoint", "dirpath", "checkpoints"),
    ("summary", "path", "summary.json"),
    ("prediction_writer", "output_path", "predictions/predictions.jsonl"),
)


class DetectorCLI(LightningCLI):
    """LightningCLI for ``DetectorModule`` and ``DetectorDataModule``, seeded by default.

    Every run has a ``SafetensorsTopKCheckpoint`` (``--checkpoint.*``), a ``PredictionWriter``
    (``--prediction_writer.*``, used by ``predict``) and a ``RunSummary`` (``--summary.*``, at the
    end of ``fit``). The tokenizer's vocabulary size flows from the
    data module to the model, and the model's ``pretrained`` backbone tells the data module which
    tokenizer to load.

    Every path left unset lives under ``trainer.default_root_dir`` (``outputs``): checkpoints,
    bundles, logs, predictions, summary, tokenizer cache, demo corpus. ``--early_stopping.*`` adds
    Lightning's ``EarlyStopping`` (``configs/early_stopping.yaml``); ``--tensorboard`` writes
    TensorBoard event files beside ``metrics.csv``; ``--weights`` picks the weights that
    ``validate``/``test``/``predict`` score. With stdout not a terminal, progress is printed as plain
    lines every ``trainer.log_every_n_steps`` steps (``callbacks.plain_progress.PlainProgress``).
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always present, configured as --checkpoint.*, --prediction_writer.* and --summary.*.
        parser.add_lightning_class_args(SafetensorsTopKCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(RunSummary, "summary")
        # Optional (off unless given): a subclass spec, not one of LightningCLI's always-on callbacks.
        parser.add_subclass_arguments(EarlyStopping, "early_stopping", required=False, fail_untyped=False)
        parser.add_argument(
            "--tensorboard",
            type=bool,
            default=True,
            help="also write TensorBoard event files beside metrics.csv (in the CSV logger's version folder)",
        )
        parser.add_argument(
            "--weights",
            type=Literal["ema", "raw"],
            default="ema",
            help="validate/test/predict: score the EMA weights (what fit ranks and bundles ship; the raw "
            "ones when the run has no EMA) or the raw training weights",
        )
        parser.link_arguments("model.pretrained", "data.pretrained")
        parser.link_arguments(
            "data", "model.vocab_size", compute_fn=lambda data: data.vocab_size, apply_on="instantiate"
        )

    def _parse_ckpt_path(self) -> None:
        """Use a checkpoint's saved model hyperparameters, as LightningCLI does, but without pickle.

        Lightning's own version reads the file with ``torch.load``; this reads the safetensors header.
        ``--ckpt_path last`` becomes ``checkpoint_latest`` in ``--checkpoint.dirpath`` (file or sharded
        folder), or a clear error where there is none (Lightning's "last" looks only for its own
        ``ModelCheckpoint`` and would start from scratch).
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path == "last":
            run_paths(self.config[subcommand])  # the checkpoint folder may follow default_root_dir
            checkpoint = self.config[subcommand]["checkpoint"]
            ckpt_path = resolve_last(checkpoint["dirpath"], checkpoint.get("storage_options"))
            self.config[subcommand]["ckpt_path"] = ckpt_path
        if not ckpt_path or not checkpoint_exists(ckpt_path):
            return
        hparams = dict(verified_header(ckpt_path)["state"].get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        run_paths(config)
        if self.subcommand == "fit" and config.get("weights") == "raw":
            raise ValueError(
                "--weights applies to validate, test and predict; fit validates (and ranks) on the EMA "
                "weights when it has an EMACallback (its eval_with_ema_for)"
            )
        ckpt_path, data = config.get("ckpt_path"), config["data"]
        if self.subcommand == "fit" and not ckpt_path and not config["trainer"].get("fast_dev_run"):
            # Decided before anything is built; the checkpoint callback checks again for Trainer users.
            checkpoint = config["checkpoint"]
            earlier = earlier_checkpoints(checkpoint["dirpath"], checkpoint.get("storage_options"))
            if earlier:
                raise refusal(config["checkpoint"]["dirpath"], "checkpoints", earlier)
        if ckpt_path and checkpoint_exists(ckpt_path) and data.get("tokenizer_path") is None:
            data["tokenizer_path"] = checkpoint_tokenizer_folder(ckpt_path, data["tokenizer_root"])

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a fit stopped by SIGTERM or Ctrl-C writes its summary and exits with 128 + signal."""
        try:
            run_cli_subcommand(self, subcommand)
        except SystemExit as stop:  # SIGTERMException; Lightning's exit(1) after a KeyboardInterrupt
            callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
            summary = next((cb for cb in callbacks if isinstance(cb, RunSummary)), None)
            signum = summary.stop_signal if summary is not None else None
            if signum is None and isinstance(stop, SIGTERMException):
                signum = signal.SIGTERM
            if signum is None:
                raise
            if summary is not None:
                summary.write_stopped(self.trainer)
            raise SystemExit(128 + int(signum)) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        init = self.config_init
        config = init.get(self.subcommand, init) if self.subcommand else init
        trainer_config = config.get("trainer", {})
        given = trainer_config.get("callbacks")
        callbacks = list(given) if isinstance(given, list) else [given] if given is not None else []
        if self.subcommand in ("validate", "test", "predict"):
            self.scored_weights = choose_scored_weights(callbacks, self.subcommand, config)
        if config.get("early_stopping") is not None:
            callbacks.append(config["early_stopping"])
        if plain_progress_wanted(trainer_config, callbacks):
            callbacks.append(PlainProgress())
        trainer = super().instantiate_trainer(**kwargs, callbacks=callbacks)
        if config.get("tensorboard", True):
            add_tensorboard_beside_csv(trainer)
        return trainer

    def _report_scored(self) -> None:
        if self.trainer.is_global_zero:
            print(f"Scored weights: {self.scored_weights}", flush=True)

    def after_validate(self) -> None:
        self._report_scored()

    def after_test(self) -> None:
        self._report_scored()

    def after_predict(self) -> None:
        self._report_scored()


def run_paths(config: Any) -> None:
    """Fill every unset path of a run from ``trainer.default_root_dir``, so one option moves a whole run.

    Filled in the config before anything is built (the data module needs its paths before the Trainer
    exists: the tokenizer sizes the model), so the saved ``config.yaml`` shows them; the callbacks also
    resolve an unset path in ``setup`` the same way, for use without the CLI, as Lightning's own do. A
    logger left at the default folder follows the root too.
    """
    root = Path(config["trainer"].get("default_root_dir") or DEFAULT_ROOT)
    # The resolved config (logs/version_N/config.yaml) then shows where everything went.
    for section, key, path in RUN_PATHS:
        options = config.get(section)
        if options is not None and options.get(key) is None:
            options[key] = str(root / path)
    callbacks = config["trainer"].get("callbacks")
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        init_args = getattr(callback, "init_args", None)
        is_export = str(getattr(callback, "class_path", "")).endswith("InferenceExportCallback")
        if is_export and init_args is not None and init_args.get("dirpath") is None:
            init_args["dirpath"] = str(root / "models" / "inference")
    if str(root) == DEFAULT_ROOT:
        return
    loggers = config["trainer"].get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT:
            init_args["save_dir"] = str(root)


def choose_scored_weights(callbacks: list[Any], stage: str, config: Any) -> str:
    """Set every EMA callback to score ``stage`` on the EMA or the raw weights; return which are scored.

    With ``--weights ema`` and a checkpoint that holds an EMA but a config without an ``EMACallback``,
    one is added with the checkpoint's settings, so the EMA is scored whatever config is given.
    """
    emas = [cb for cb in callbacks if isinstance(cb, EMACallback)]
    want_ema = config.get("weights", "ema") == "ema"
    ckpt_path = config.get("ckpt_path")
    settings = checkpoint_ema_settings(ckpt_path) if ckpt_path and checkpoint_exists(ckpt_path) else None
    if want_ema and not emas and settings is not None:
        emas.append(EMACallback(**settings))
        callbacks.append(emas[-1])
    for ema in emas:
        stages = set(ema.eval_with_ema_for)
        ema.eval_with_ema_for = frozenset(stages | {stage} if want_ema else stages - {stage})  # type: ignore[arg-type]
    # Without an EMA in the checkpoint the callback has nothing to swap in: the raw weights are scored.
    return "ema" if want_ema and settings is not None else "raw"


def checkpoint_ema_settings(ckpt_path: str) -> dict[str, Any] | None:
    """The ``EMACallback`` settings saved in a checkpoint that holds an EMA, else ``None``."""
    callbacks = read_checkpoint_header(ckpt_path)["state"].get("callbacks") or {}
    state = next((s for key, s in callbacks.items() if key.startswith("EMACallback")), None)
    if not isinstance(state, dict) or not state.get("num_updates"):
        return None
    saved: dict[str, Any] = {str(k): v for k, v in (state.get("settings") or {}).items()}
    # The schedule's field names; the callback calls one of them `update_every_n_steps`.
    renamed = {"every_n_steps": "update_every_n_steps"}
    known = {*EMASchedule.__dataclass_fields__, "cpu_offload"}
    return {renamed.get(k, k): v for k, v in saved.items() if k in known}


def plain_progress_wanted(trainer_config: Any, callbacks: list[Any]) -> bool:
    """Plain progress lines replace the bar when stdout is no terminal (nohup, CI, a scheduler)."""
    from lightning.pytorch.callbacks import ProgressBar

    enabled = trainer_config.get("enable_progress_bar")
    has_bar = any(isinstance(cb, ProgressBar) for cb in callbacks)
    return enabled is not False and not has_bar and not sys.stdout.isatty()


def add_tensorboard_beside_csv(trainer: Trainer) -> None:
    """Add a TensorBoard logger that writes into the CSV logger's version folder (beside metrics.csv)."""
    loggers = trainer.loggers
    csv = next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)
    if csv is None or any(isinstance(lg, TensorBoardLogger) for lg in loggers):
        return
    # name="" and version="": the event files go straight into `log_dir`, no nested version folder.
    board = TensorBoardLogger(save_dir=csv.log_dir, name="", version="", default_hp_metric=False)
    trainer.loggers = [*loggers, board]


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
    if is_url(ckpt_path):  # read from a local copy, downloaded once per object version
        verify_checkpoint(ckpt_path)
        return read_checkpoint_header(ckpt_path)
    ckpt_path = local(ckpt_path)
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
