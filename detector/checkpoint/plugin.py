"""Lightning integration of the state format: a CheckpointIO plugin and pickle-free module loading.

``Trainer(plugins=[SafetensorsCheckpointIO()])`` makes every ``trainer.save_checkpoint`` write, and
every ``ckpt_path=...`` (``fit`` resume, ``validate``, ``test``, ``predict``) read, this format; the
trainer's own restore machinery then restores model, optimizers, schedulers, loops and callbacks.

``LightningModule.load_from_checkpoint`` does not go through the CheckpointIO: in Lightning 2.6 it
calls ``torch.load`` directly (``lightning.pytorch.core.saving._load_from_checkpoint`` -> ``pl_load``).
:class:`SafetensorsLoadingMixin` overrides it for a module class, reading the file with
:func:`detector.checkpoint.format.load_state` and handing the dict to the same Lightning code that builds
the module from a loaded checkpoint (private: :func:`detector.checkpoint.compat.build_module_from_checkpoint`;
``tests/test_checkpoint_io.py`` pins the behaviour).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import CheckpointIO
from typing_extensions import override

from detector.atomic import fsync_dir, remove_path
from detector.checkpoint.compat import PathLike as _PATH
from detector.checkpoint.compat import build_module_from_checkpoint
from detector.checkpoint.format import CheckpointFormatError, save_state
from detector.checkpoint.objects import is_url, local, remove, save_state_to_url
from detector.checkpoint.reader import load_checkpoint_state

_Module = TypeVar("_Module", bound="pl.LightningModule")


class SafetensorsCheckpointIO(CheckpointIO):
    """Writes and reads the whole Lightning checkpoint as one checksummed safetensors file, without pickle.

    It also reads a sharded checkpoint folder (:mod:`detector.checkpoint.sharded`, written by
    :class:`~detector.checkpoint.strategy.SafetensorsModelParallelStrategy`), assembled into the full state,
    so any strategy can resume from it or ``validate``/``test``/``predict`` with it.

    Saves are atomic (temp file in the same folder, fsync, rename, folder fsync); loads verify the
    checksum and refuse anything that is not an intact checkpoint of this format (a pickled ``.ckpt``
    included; convert one with ``python -m detector checkpoints convert``).

    A URL of a remote filesystem (``s3://bucket/prefix/name.safetensors``, any fsspec URL) is uploaded as
    one object, and read from a verified local copy (:mod:`detector.checkpoint.objects`).
    """

    def __init__(self, storage_options: dict[str, Any] | None = None) -> None:
        """Set the fsspec options for URLs.

        Args:
            storage_options: fsspec options for URLs (endpoint, credentials, ...) when a save passes none,
                and for every load; ``None``: the environment's and config files', as s3fs/gcsfs read them.
        """
        self.storage_options = storage_options

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if is_url(path):
            save_state_to_url(checkpoint, str(path), storage_options or self.storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes storage_options for URLs only, got {storage_options!r}"
            )
        path = Path(local(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_state(checkpoint, path)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is torch.load's pickle restriction; nothing here unpickles, so it is moot.
        state = load_checkpoint_state(
            path, map_location=_as_device(map_location), storage_options=self.storage_options
        )
        return _as_checkpoint(state, path)

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        if is_url(path):
            remove(str(path), self.storage_options)
            return
        path = Path(path)
        remove_path(path)
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(path.parent)


def load_module_from_checkpoint(
    cls: type[_Module],
    checkpoint_path: _PATH,
    map_location: str | torch.device | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> _Module:
    """Build ``cls`` from its saved hyperparameters and load its weights from a safetensors checkpoint.

    The pickle-free counterpart of ``cls.load_from_checkpoint``: ``kwargs`` override saved
    hyperparameters, ``strict`` and the module's ``on_load_checkpoint`` behave as in Lightning.
    """
    checkpoint = _as_checkpoint(
        load_checkpoint_state(checkpoint_path, map_location=map_location), checkpoint_path
    )
    if "state_dict" not in checkpoint:
        raise CheckpointFormatError(
            f"{checkpoint_path}: holds no 'state_dict'; keys: {sorted(map(str, checkpoint))}"
        )
    model = build_module_from_checkpoint(cls, checkpoint, checkpoint_path, strict, **kwargs)
    if not isinstance(model, cls):
        raise TypeError(f"{checkpoint_path} built a {type(model).__name__}, expected {cls.__name__}")
    tensors = (t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor))
    return model.to(next(tensors, torch.tensor(0)).device)


class SafetensorsLoadingMixin:
    """Makes ``Module.load_from_checkpoint(path)`` read safetensors checkpoints, never a pickle.

    Put it first among the bases: ``class DetectorModule(SafetensorsLoadingMixin, LightningModule)``.
    ``hparams_file`` and ``weights_only`` are not supported (the file holds the hyperparameters, and
    nothing is unpickled).
    """

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: _PATH,
        map_location: str | torch.device | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load the module from a safetensors checkpoint; see :func:`load_module_from_checkpoint`."""
        for unsupported in ("hparams_file", "weights_only"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"{cls.__name__}.load_from_checkpoint does not support {unsupported}")
        return load_module_from_checkpoint(cls, checkpoint_path, map_location, strict, **kwargs)  # type: ignore[type-var]


def _as_checkpoint(state: Any, path: _PATH) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(state).__name__}, not a Lightning checkpoint dict"
        )
    return state


def _as_device(map_location: Any) -> str | torch.device | None:
    """Lightning passes ``None`` or a device; torch.load's callables and dicts have no meaning here."""
    if map_location is None or isinstance(map_location, str | torch.device):
        return map_location
    raise ValueError(
        f"SafetensorsCheckpointIO takes a device as map_location, got {map_location!r}; "
        "the state is loaded on the CPU by default and Lightning moves it where it belongs"
    )
