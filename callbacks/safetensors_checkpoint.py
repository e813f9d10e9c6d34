"""SafetensorsTopKCheckpoint: latest, best, top-K and periodic checkpoints of the full training state."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from detector.atomic import atomic_link, clean_stale_temps, fsync_dir, link_tree, remove_path
from detector.checkpoint.background import BackgroundWriteError, SerialJobs
from detector.checkpoint.compat import dump_checkpoint, validation_follows
from detector.checkpoint.format import save_state
from detector.checkpoint.interrupt import GracefulSigint
from detector.checkpoint.monitor import monitored_metrics
from detector.checkpoint.object_folder import ObjectCheckpointFolder
from detector.checkpoint.objects import is_url, local, save_state_to_url
from detector.checkpoint.plugin import SafetensorsCheckpointIO
from detector.checkpoint.reclaim import wait_reclaimed
from detector.checkpoint.rng import capture_rng_state, restore_rng_state
from detector.checkpoint.staging import StagingBuffers, storages, wait_for_copies
from detector.checkpoint.topk import (
    LATEST_NAME,
    CheckpointTracker,
    Mode,
    best_name,
    epoch_name,
    step_name,
    top_k_name,
)
from detector.run_folder import earlier_checkpoints, refusal


class SafetensorsTopKCheckpoint(Checkpoint):
    """Keeps the latest, the best, the top K and periodic checkpoints of a run, in the safetensors format.

    Files in ``dirpath`` (names: :mod:`detector.checkpoint.topk`): ``checkpoint_latest.safetensors`` (every
    save), ``checkpoint_best_{monitor}.safetensors``, ``checkpoint_top_epoch_E_step_S_{monitor}_X.XXXX``
    (the ``save_top_k`` best), ``checkpoint_epoch_N`` (every ``every_n_epochs``, last
    ``keep_last_epochs`` kept) and ``checkpoint_step_N`` (every ``every_n_train_steps`` optimizer steps,
    last ``keep_last_steps`` kept). A state is written once; its other names are hard links. A new
    file is committed before any old one is deleted. Under a strategy that saves sharded checkpoints
    (:class:`~detector.checkpoint.strategy.SafetensorsModelParallelStrategy` with
    ``save_distributed_checkpoint=True``) each name is a folder (:mod:`detector.checkpoint.sharded`) that
    every rank writes into, its other names folders of hard links, replaced and deleted atomically.
    Each checkpoint also holds every rank's RNG states (``rng_states``, indexed by global rank),
    restored on resume.

    When: after a mid-epoch validation (top-K, best, latest); after an optimizer step (step files,
    and latest at the step that reaches ``max_steps`` mid-epoch, so a longer resume continues it);
    at train epoch end (epoch files, and whatever the epoch's last batch or closing validation made
    due, so a resume starts from a completed epoch); at train end (latest, if that step is unsaved);
    on SIGTERM or a first Ctrl-C (latest, after the current batch; a second Ctrl-C stops at once,
    unsaved). Everything due at one global step goes into one file. Every rank takes the same
    decisions (the logged metrics are broadcast from rank zero); global rank zero does the file I/O.
    ``async_save`` writes in a background thread (at a lower CPU priority) from a CPU snapshot into
    buffers reused from save to save (one state's worth of memory while training), one write in
    flight; links and deletions follow the commit; a failed write raises at the next save or at the
    end of fit. The loop copies only the small parts of the state at the save; the background thread
    copies the parameters, the optimizer's moments and the EMA weights while the next batch's forward
    and backward run (they only read them), and the next optimizer step (``on_before_optimizer_step``),
    validation, load or save waits for that copy first (the fence, counted in :attr:`save_time`). The
    save that ends the fit (``max_steps``, the last epoch, train end) is written at once from the live
    state, without a snapshot: the end of fit waits for it anyway.

    ``dirpath`` may be a URL of an object store (``s3://bucket/prefix``, ``gs://...``, any fsspec URL;
    ``file://`` and plain paths are local folders): each state is then uploaded once as a new object
    and its names live in a manifest object written after the upload completes; objects no name points
    at are deleted after that (:mod:`detector.checkpoint.object_folder`). A sharded checkpoint is a new
    key prefix instead, under which every rank uploads its shard object and rank zero the state and
    then ``index.json``; the manifest names the prefix once every rank's upload is complete.

    Needs ``Trainer(plugins=[SafetensorsCheckpointIO()])`` so resuming reads the same format.

    Args:
        dirpath: folder of the checkpoint files.
        monitor: logged metric that ranks checkpoints (top K, best).
        mode: ``max`` when a higher ``monitor`` is better, ``min`` when lower is.
        save_top_k: how many of the best checkpoints by ``monitor`` to keep (0: none, -1: all).
        every_n_epochs: save ``checkpoint_epoch_N`` every N completed epochs (0: never).
        keep_last_epochs: how many epoch files to keep, newest first (-1: all).
        every_n_train_steps: save ``checkpoint_step_N`` every N optimizer steps (0: never).
        keep_last_steps: how many step files to keep, newest first (-1: all).
        async_save: write in a background thread after a CPU snapshot (full-state files only).
        save_on_interrupt: save ``checkpoint_latest`` on SIGTERM or a first Ctrl-C before stopping.
        storage_options: fsspec options for a URL ``dirpath`` (``endpoint_url``, ``key``, ``secret``,
            ``client_kwargs``, ...); unset: the environment's and the config files', as s3fs/gcsfs read them.

    Example:
        .. code-block:: yaml

            trainer:
              plugins: [detector.checkpoint.plugin.SafetensorsCheckpointIO]
              callbacks:
                - class_path: callbacks.safetensors_checkpoint.SafetensorsTopKCheckpoint
                  init_args: {monitor: val_f1, mode: max, save_top_k: 3, every_n_train_steps: 500}
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str = "val_f1",
        mode: Mode = "max",
        save_top_k: int = 3,
        every_n_epochs: int = 1,
        keep_last_epochs: int = 1,
        every_n_train_steps: int = 0,
        keep_last_steps: int = 1,
        async_save: bool = False,
        save_on_interrupt: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must name a logged metric, got {monitor!r}")
        for name, every in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if isinstance(every, bool) or not isinstance(every, int) or every < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 turns it off), got {every!r}")
        self._tracker = CheckpointTracker(mode, save_top_k, keep_last_epochs, keep_last_steps)
        # None: `<trainer.default_root_dir>/checkpoints`, resolved in setup (as Lightning's ModelCheckpoint).
        self._dirpath_given = dirpath is not None
        self.storage_options = storage_options
        self.dirpath: Path | str = Path(local(dirpath) if dirpath is not None else "outputs/checkpoints")
        self._objects: ObjectCheckpointFolder | None = None
        if is_url(dirpath):
            self.dirpath = str(dirpath).rstrip("/")
            self._objects = ObjectCheckpointFolder(self.dirpath, storage_options)
        self.monitor, self.mode = monitor, mode
        self.every_n_epochs, self.every_n_train_steps = every_n_epochs, every_n_train_steps
        self.async_save, self.save_on_interrupt = async_save, save_on_interrupt
        self._jobs = SerialJobs(background=async_save)
        self._staging = StagingBuffers()
        self._saved_step: int | None = None  # global step of the newest written file
        self._names_at_step: list[str] = []  # the names that file has
        self._due: list[str] = []  # names registered at this step, not written yet
        self._changed = False  # the tracker changed since the last write
        self._resume_deletions: list[str] = []
        self._sigint = GracefulSigint()
        self._save_seconds, self._saves = 0.0, 0  # this process: time the loop was blocked by saves

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def best_model_path(self) -> str:
        """The best checkpoint's path (what ``trainer.test(ckpt_path="best")`` loads), or ``""``."""
        return "" if self._tracker.best is None else self._url(best_name(self.monitor))

    @property
    def last_model_path(self) -> str:
        """``dirpath/checkpoint_latest`` if it exists, else ``""``: what ``--ckpt_path last`` resumes."""
        if self._objects is not None:
            return self._url(LATEST_NAME) if LATEST_NAME in self._objects.names() else ""
        latest = Path(self.dirpath) / LATEST_NAME
        return str(latest) if latest.exists() else ""

    @property
    def stopped_by_ctrl_c(self) -> bool:
        """Whether a first Ctrl-C (not a SIGTERM) made the graceful stop of this run."""
        return self._sigint.forwarded

    @property
    def save_time(self) -> tuple[float, int]:
        """Seconds the loop was blocked by saves in this process (fence waits too), and how many saves."""
        return self._save_seconds, self._saves

    @property
    def tracker(self) -> CheckpointTracker:
        """The retention state: kept files with scores, best, history."""
        return self._tracker

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._dirpath_given:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        if stage != TrainerFn.FITTING:
            return
        checkpoint_io = trainer.strategy.checkpoint_io
        if not isinstance(checkpoint_io, SafetensorsCheckpointIO):
            raise ValueError(
                f"{type(self).__name__} writes safetensors checkpoints; give the Trainer "
                f"plugins=[SafetensorsCheckpointIO()] (it has {type(checkpoint_io).__name__})"
            )
        if self.async_save and getattr(trainer.strategy, "saves_sharded", False):
            raise ValueError(
                "async_save is not supported with sharded checkpoints (save_distributed_checkpoint=True): "
                "every rank writes its shard in the save; set async_save=false or save full-state files"
            )
        if self._objects is not None:
            if trainer.is_global_zero:
                for key in self._objects.open():
                    rank_zero_info(f"Removed an object a crashed run uploaded but never named: {key}")
            return
        if trainer.is_global_zero:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            for path in clean_stale_temps(Path(self.dirpath)):
                rank_zero_info(f"Removed a temporary file left by a crashed run: {path}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fresh run never mixes its files (top-K, best) with another run's: refused before any step.
        fresh = not trainer.ckpt_path and not self._skip(trainer)  # fast_dev_run saves nothing
        earlier = self._committed_names() if trainer.is_global_zero and fresh else []
        earlier = trainer.strategy.broadcast(earlier, src=0)
        if earlier:
            raise refusal(self.dirpath, "checkpoints", earlier)
        if trainer.is_global_zero and self._resume_deletions and self._objects is not None:
            self._objects.remove(self._resume_deletions)
        elif trainer.is_global_zero and self._resume_deletions:
            for name in self._resume_deletions:
                remove_path(Path(self.dirpath) / name)
            fsync_dir(Path(self.dirpath))
        self._resume_deletions = []
        if self.save_on_interrupt:
            self._sigint.install()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, self.every_n_train_steps
        if self._skip(trainer) or step == 0 or step == self._saved_step:
            return
        name = step_name(step)
        periodic = every > 0 and step % every == 0 and name not in self._tracker.steps.kept
        if periodic:  # (a name already kept: gradient accumulation, several batches per step)
            self._tracker.add_step(name)
            self._due.append(name)
        # The step that reaches max_steps mid-epoch ends the run: saved here, the loops' state says
        # "mid-epoch", and a resume with a larger max_steps continues the epoch (at train end
        # Lightning has already counted the cut-short epoch as completed).
        last_step = trainer.max_steps not in (None, -1) and step >= trainer.max_steps
        # At the epoch's last batch or before a validation of this step, the save waits for it (one file
        # per step; a state saved before a due validation would resume past it, never running it).
        if (periodic or last_step) and not trainer.is_last_batch and not validation_follows(trainer):
            self._save(trainer, sync=last_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._fence()  # the step is about to change the weights and moments a snapshot may be copying

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A save is always followed by a training batch or the end of fit before any validation, so
        # this never waits; the EMA swap (ordered before this callback) calls the fence itself.
        self._fence()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer):
            return
        metrics = monitored_metrics(trainer, self.monitor)  # rank zero's: every rank saves alike
        epoch, step, score = trainer.current_epoch, trainer.global_step, metrics[self.monitor]
        self._tracker.record(epoch, step, metrics)
        name = top_k_name(self.monitor, epoch, step, score)
        if self._tracker.offer_top_k(score, name):
            self._due.append(name)
        if self._tracker.offer_best(score, epoch, step):
            self._due.append(best_name(self.monitor))
        self._changed = True
        # A validation that closes the epoch is saved at train epoch end (same step): a run resumed from
        # a completed epoch replays the uninterrupted run's RNG draws; one resumed mid-epoch-end does not.
        if not trainer.is_last_batch:
            self._save(trainer, sync=_fit_ends(trainer, epoch_end=False))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch cut short (max_steps, a stop request) is not a completed epoch: no epoch file, and
        # its state was saved mid-epoch at its last step or validation.
        if self._skip(trainer) or not trainer.is_last_batch:
            return
        self._register_epoch(trainer)
        if self._due or self._changed:
            self._save(trainer, sync=_fit_ends(trainer, epoch_end=True))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sigint.uninstall()
        if not self._skip(trainer):
            self._save(trainer, refresh=False, sync=True)
        self._jobs.wait()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._sigint.uninstall()
        try:
            self._jobs.wait()
        except BackgroundWriteError as error:
            rank_zero_warn(f"{error}: {error.__cause__!r}")
        if isinstance(exception, SIGTERMException) and self.save_on_interrupt and not self._skip(trainer):
            self._save(trainer, refresh=False, sync=True)
            rank_zero_info(f"Saved {self._url(LATEST_NAME)} at step {trainer.global_step} before exiting")
        elif isinstance(exception, KeyboardInterrupt) and self._saved_step is not None:
            rank_zero_warn(f"Interrupted mid-step: not saved; {LATEST_NAME} holds step {self._saved_step}")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sigint.uninstall()
        self._jobs.wait()
        self._staging.release()
        wait_reclaimed()  # replaced files' hidden names are gone when fit returns

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["rng_states"] = _gather_rng_states(trainer)
        # The metrics this state was saved with, for `detector checkpoints list` and bundle metadata.
        checkpoint["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs in Trainer._run before the strategy setup and before the fit loop builds its first
        # dataloader iterator, and nothing re-seeds afterwards: the resumed run draws what the
        # uninterrupted one drew from this point on.
        states = checkpoint.get("rng_states")
        if not states or trainer.global_rank >= len(states):
            saved = len(states) if states else 0
            rank_zero_warn(f"Checkpoint holds RNG states for {saved} ranks; RNG not restored on this rank")
            return
        restore_rng_state(states[trainer.global_rank])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self._tracker.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fence()  # a checkpoint load is about to overwrite the weights
        self._tracker.load_state_dict(state_dict["tracker"])
        # Deletions a crashed run committed to but may not have done; done on rank zero at train start.
        self._resume_deletions = list(self._tracker.deletions)
        self._tracker.clear_deletions()

    def _skip(self, trainer: pl.Trainer) -> bool:
        fast_dev_run = bool(getattr(trainer, "fast_dev_run", False))
        return trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or fast_dev_run

    def _url(self, name: str) -> str:
        return self._objects.url(name) if self._objects is not None else str(Path(self.dirpath) / name)

    def _committed_names(self) -> list[str]:
        return self._objects.names() if self._objects is not None else earlier_checkpoints(self.dirpath)

    def _register_epoch(self, trainer: pl.Trainer) -> None:
        epoch, every = trainer.current_epoch, self.every_n_epochs
        name = epoch_name(epoch)
        if every == 0 or (epoch + 1) % every or name in self._tracker.epochs.kept:
            return
        self._tracker.add_epoch(name)
        self._due.append(name)

    def _save(self, trainer: pl.Trainer, refresh: bool = True, sync: bool = False) -> None:
        """Write the state once under every name due at this step; ``refresh=False`` skips a saved step."""
        step = trainer.global_step
        if not refresh and not (self._due or self._changed) and step == self._saved_step:
            return
        names = [*self._due, LATEST_NAME]
        if step == self._saved_step:  # a newer state of the same step: move its older names onto it
            names += [n for n in self._names_at_step if n not in names]
        names = [n for n in names if n not in self._tracker.deletions]
        start = time.perf_counter()
        self._write(trainer, names, list(self._tracker.deletions), sync)
        self._save_seconds, self._saves = self._save_seconds + time.perf_counter() - start, self._saves + 1
        self._tracker.clear_deletions()
        self._saved_step, self._names_at_step, self._due, self._changed = step, names, [], False

    def _write(self, trainer: pl.Trainer, names: list[str], deletions: list[str], sync: bool) -> None:
        """Save the state as ``names[0]`` (a file, or a new object named in the manifest), then commit
        the other names and the deletions; async: from a snapshot, in the background thread."""
        objects, options = self._objects, self.storage_options
        target: Path | str
        if objects is None:
            target, storage_options = Path(self.dirpath) / names[0], None

            def write(state: Any) -> None:
                save_state(state, target)

            def commit() -> None:
                self._link_and_rotate(Path(target), names[1:], deletions)
        else:
            target, storage_options = objects.new_target(names[0]), options

            def write(state: Any) -> None:
                save_state_to_url(state, str(target), options)

            def commit() -> None:
                objects.publish(str(target), names, deletions)

        self._jobs.wait()  # at most one write in flight, and ours goes after it
        if sync or not self.async_save:
            # weights_only=False: the whole training state, said outright (Lightning logs a line otherwise).
            trainer.save_checkpoint(target, weights_only=False, storage_options=storage_options)
            if trainer.is_global_zero:
                commit()
            return
        checkpoint = dump_checkpoint(trainer)
        if not trainer.is_global_zero:
            return
        # The previous write is done: its buffers are free. Only an optimizer step changes the deferred
        # tensors, and on_before_optimizer_step waits for their copy.
        snapshot = self._staging.snapshot(checkpoint, defer=_changed_only_by_steps(trainer))
        del checkpoint

        def job() -> None:
            write(snapshot.state)
            commit()

        self._jobs.submit(job, label=str(target), first=snapshot.copy)

    def _fence(self) -> None:
        """Wait for a background copy of the state still reading the tensors about to change."""
        waited = wait_for_copies()
        self._save_seconds += waited

    def _link_and_rotate(self, target: Path, links: list[str], deletions: list[str]) -> None:
        """After ``target`` is committed: point the other names at it, then delete evicted files."""
        dirpath = Path(self.dirpath)
        for name in links:
            (link_tree if target.is_dir() else atomic_link)(target, dirpath / name)
        for name in deletions:
            remove_path(dirpath / name)
        if deletions:
            fsync_dir(dirpath)


def _fit_ends(trainer: pl.Trainer, epoch_end: bool) -> bool:
    """Whether no optimizer step follows this save in this fit: ``max_steps`` is reached, or (at an
    epoch's end) ``max_epochs``. Such a save is waited for at train end anyway, so an async save writes
    it at once from the live tensors: a snapshot would only add a copy of the state (an early stop or
    ``max_time`` is not foreseen here: that save takes the snapshot, which is merely slower)."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    return epoch_end and epochs not in (None, -1) and trainer.current_epoch + 1 >= epochs


def _changed_only_by_steps(trainer: pl.Trainer) -> set[int]:
    """Storages only an optimizer step changes: parameters, optimizer state, and what callbacks name.

    A callback names its own with ``tensors_changed_only_by_steps()`` (the EMA weights: updated after
    a step, swapped only behind the fence).
    """
    tensors: list[Any] = list(trainer.lightning_module.parameters())
    for optimizer in trainer.optimizers:
        tensors += [value for state in optimizer.state.values() for value in state.values()]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        named = getattr(callback, "tensors_changed_only_by_steps", None)
        if callable(named):
            tensors += list(named())
    return storages(tensors)


def _gather_rng_states(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """Every rank's RNG states, indexed by global rank; a collective under DDP (all ranks save)."""
    state = capture_rng_state()
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states
