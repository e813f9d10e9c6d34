"""Every private Lightning and PyTorch internal the project touches, in one place: why, and for which version.

Checked against torch 2.13 and Lightning 2.6 (the versions ``pyproject.toml`` pins or allows). On an
upgrade, read this module first: each entry says what it stands for, and the tests that would break
(``tests/test_checkpoint_io.py``, ``tests/test_sharded_state.py``, ``tests/test_exact_resume.py``,
``tests/test_ema.py``) run through it. Nothing else in ``detector`` or ``callbacks`` imports a private
name or reads a private attribute of a Lightning or PyTorch object. Imports only torch and Lightning
(it lives in the checkpoint package, which may not import the app).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _load_raw_module_state

# Lightning's own alias for "a path" (str | Path) in the CheckpointIO and Strategy signatures we
# override; using it keeps our overrides' signatures identical to Lightning's (Lightning 2.6).
from lightning.fabric.utilities.types import _PATH as PathLike
from lightning.pytorch.core.saving import _load_state
from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

__all__ = [
    "DCP_OFFSETS_KEY",
    "PathLike",
    "apply_pending_loader_states",
    "attached_trainer",
    "build_module_from_checkpoint",
    "dump_checkpoint",
    "foreach_copy_",
    "foreach_lerp_",
    "load_full_state_into_sharded_module",
    "local_shape_and_offset",
    "model_parallel_sizes",
    "resolve_auto_parallel_sizes",
    "run_cli_subcommand",
    "saves_distributed_checkpoint",
    "validation_follows",
]

# Not wrapped: the ``_metadata`` attribute of the OrderedDict that ``nn.Module.state_dict()`` returns
# (per-module versions that ``load_state_dict`` hands to ``_load_from_state_dict``). It is part of
# the state dict's value, so the checkpoint tree stores and restores it like any other field.

# The header metadata key under which torch's HuggingFace DCP storage reads a shard's offsets in
# the global tensor: torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY (torch 2.13), a
# private constant copied rather than imported. Our shard files must carry it for
# HuggingFaceStorageReader to place them.
DCP_OFFSETS_KEY = "DCP_SHARDING_INFO"


def build_module_from_checkpoint(cls: Any, checkpoint: dict[str, Any], path: Any, strict: bool | None,
                                 **kwargs: Any) -> Any:  # fmt: skip
    """What ``cls.load_from_checkpoint`` does after its ``torch.load``: migrate, build, load weights.

    Why: ``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` (pickle) and has no
    hook for another reader; these two private functions are the rest of it
    (``lightning.pytorch.utilities.migration.utils._pl_migrate_checkpoint`` and
    ``lightning.pytorch.core.saving._load_state``, Lightning 2.6).
    """
    checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=Path(path))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)


def load_full_state_into_sharded_module(state_dict: dict[str, Any], module: Any, strict: bool) -> None:
    """Load a full (unsharded) state dict into an FSDP2 module, each rank keeping its shards.

    Why: ``ModelParallelStrategy.load_checkpoint`` does this with a pickled file only; the function it
    uses is private (``lightning.fabric.strategies.model_parallel._load_raw_module_state``, Lightning 2.6).
    """
    _load_raw_module_state(state_dict, module, strict=strict)


def model_parallel_sizes(strategy: Any) -> tuple[Any, Any]:
    """``(data_parallel_size, tensor_parallel_size)`` as configured, ``"auto"`` included.

    Why: ``ModelParallelStrategy`` keeps them in private attributes only (Lightning 2.6).
    """
    return strategy._data_parallel_size, strategy._tensor_parallel_size


def resolve_auto_parallel_sizes(strategy: Any, data_parallel: int, tensor_parallel: int) -> None:
    """Set the strategy's sizes before its ``setup_environment`` builds the device mesh.

    Why: Lightning 2.6 resolves ``"auto"`` tensor parallelism to every device of a node and offers no
    setter; the mesh is built from these private attributes.
    """
    strategy._data_parallel_size, strategy._tensor_parallel_size = data_parallel, tensor_parallel


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """The strategy's ``save_distributed_checkpoint`` setting (a private attribute in Lightning 2.6)."""
    return bool(getattr(strategy, "_save_distributed_checkpoint", False))


def local_shape_and_offset(tensor: Any) -> tuple[Sequence[int], Sequence[int]]:
    """A DTensor's local shard shape and its offset in the global tensor.

    Why: torch 2.13 has no public API for it; ``torch.distributed.tensor._utils.
    compute_local_shape_and_global_offset`` is what DCP itself uses.
    """
    return compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)


def dump_checkpoint(trainer: Any) -> dict[str, Any]:
    """The full checkpoint dict ``trainer.save_checkpoint`` would write, without writing it.

    Why: an asynchronous save snapshots the state and writes it in a thread; Lightning 2.6 builds the
    dict only in ``trainer._checkpoint_connector.dump_checkpoint`` (private).
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


def apply_pending_loader_states(trainer: Any) -> None:
    """Hand the checkpoint's saved dataloader states to the loaders Lightning already built.

    Why: Lightning 2.6 restores the fit loop (with the dataloader states) after
    ``configure_optimizers``; when that asks for ``trainer.estimated_stepping_batches`` (as a schedule
    over all steps does), the training loader is built first and ``setup_data`` never loads the states
    into it, so a mid-epoch resume would replay the epoch from its start. The pending states and the
    method that applies them are private to the fit loop. A no-op when Lightning already applied them.
    """
    fit_loop = trainer.fit_loop
    if getattr(fit_loop, "_combined_loader_states_to_load", None):
        fit_loop._load_combined_loader_states()


def validation_follows(trainer: Any) -> bool:
    """Whether the fit loop runs a validation right after the current training batch.

    Why: a step save that a validation follows is left to the validation's save (one file per step,
    and a kill during that validation reruns it on resume); Lightning 2.6 decides it in the epoch
    loop's private ``_should_check_val_fx`` over the fit loop's private ``_data_fetcher``.
    """
    loop = trainer.fit_loop
    fetcher = getattr(loop, "_data_fetcher", None)
    return fetcher is not None and bool(loop.epoch_loop._should_check_val_fx(fetcher))


def run_cli_subcommand(cli: Any, subcommand: str) -> None:
    """LightningCLI's own run of ``subcommand`` (its before/after hooks around the Trainer call).

    Why: a fit stopped by SIGTERM or Ctrl-C writes its summary and exits with 128 + signal; Lightning
    2.6's LightningCLI runs a subcommand in its private ``_run_subcommand``, which the CLI overrides to
    catch the stop and calls back through here.
    """
    from lightning.pytorch.cli import LightningCLI

    LightningCLI._run_subcommand(cli, subcommand)


def attached_trainer(module: Any) -> Any | None:
    """The module's Trainer, or None when it is not attached.

    Why: ``LightningModule.trainer`` raises when unattached (Lightning 2.6); ``_trainer`` does not.
    """
    return module._trainer


def foreach_lerp_(targets: list[torch.Tensor], ends: list[torch.Tensor], weight: float) -> None:
    """``t += weight * (end - t)`` for every pair, in one fused kernel per device and dtype.

    Why: ``torch._foreach_lerp_`` (torch 2.13) is the fused multi-tensor op ``torch.optim`` and timm's
    EMA use; underscored but without a public equivalent.
    """
    torch._foreach_lerp_(targets, ends, weight)


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy every source into its target in one fused kernel (``torch._foreach_copy_``, torch 2.13)."""
    torch._foreach_copy_(targets, sources)
