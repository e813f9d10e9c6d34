"""Callbacks that stop a `python -m detector fit` child at a chosen point (`--trainer.callbacks+=`)."""

from __future__ import annotations

import importlib
import os
import signal
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class KillAt(Callback):
    """SIGKILLs this process at the ``nth`` call of the function ``where`` (``module.name``) with an
    argument that contains ``match``, ``before`` or ``after`` the call: a kill inside a chosen window."""

    def __init__(
        self, where: str, nth: int = 1, when: Literal["before", "after"] = "before", match: str = ""
    ) -> None:
        self.where, self.nth, self.when, self.match = where, nth, when, match

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        module_name, name = self.where.rsplit(".", 1)
        module = importlib.import_module(module_name)
        original, calls = getattr(module, name), [0]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hit = not self.match or any(self.match in str(arg) for arg in args)
            calls[0] += hit
            if hit and calls[0] == self.nth and self.when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if hit and calls[0] == self.nth and self.when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(module, name, wrapper)


class SignalAt(Callback):
    """Sends ``signum`` to this process once, after the training batch that reaches ``step``; with
    ``in_validation``, during the first validation batch at that step instead."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), in_validation: bool = False) -> None:
        self.step, self.signum, self.in_validation = step, signum, in_validation
        self._sent = False

    def _send(self, trainer: pl.Trainer) -> None:
        if not self._sent and trainer.global_step == self.step:
            self._sent = True
            os.kill(os.getpid(), self.signum)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.in_validation:
            self._send(trainer)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.in_validation and not trainer.sanity_checking:
            self._send(trainer)
