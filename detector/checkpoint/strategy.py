"""FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, with safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer
from typing_extensions import override

from detector.checkpoint.collective import CollectiveError
from detector.checkpoint.compat import PathLike as _PATH
from detector.checkpoint.compat import (
    load_full_state_into_sharded_module,
    model_parallel_sizes,
    resolve_auto_parallel_sizes,
    saves_distributed_checkpoint,
)
from detector.checkpoint.format import CheckpointFormatError
from detector.checkpoint.objects import is_url, local, local_copy, named_by_url, resolve
from detector.checkpoint.sharded import (
    INDEX_NAME,
    is_sharded_checkpoint,
    load_sharded_state,
    save_sharded_state,
    save_sharded_state_to_url,
    split_sharded,
)


class SafetensorsModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2) whose checkpoints are safetensors: sharded or full, never pickled.

    ``save_distributed_checkpoint=True`` (what ``configs/fsdp.yaml`` sets): every rank writes its own
    shard of the weights, optimizer state and other DTensors, rank zero the rest, committed together
    as one folder (:mod:`detector.checkpoint.sharded`); no rank ever holds the whole state. Loading one,
    each rank reads through ``torch.distributed.checkpoint`` (its ``HuggingFaceStorageReader``) just the
    chunks its shards need, on any number of ranks. Lightning's own sharded checkpoint would instead
    pickle everything but the tensors into a ``meta.pt``.

    ``save_distributed_checkpoint=False`` (the default): the full weights and optimizer state are
    gathered into CPU memory of global rank zero, which writes one safetensors file through the
    ``CheckpointIO``. Loading such a file, every rank reads it (no pickle; Lightning's own strategy
    would ``torch.load`` it) and rank zero's tensors are broadcast into the shards of the current mesh.

    Either layout resumes on any number of ranks, and the ``CheckpointIO`` reads both, so a sharded
    run can also be resumed, validated or tested on a single device.

    A URL (``s3://...``, any fsspec URL) is a key prefix: every rank uploads its own shard object
    (:func:`~detector.checkpoint.sharded.save_sharded_state_to_url`). Loading one, every rank downloads
    the checkpoint's objects to a local temp folder once and reads it as above; errors name the URL.

    Args:
        data_parallel_size: ranks that shard the model (FSDP2); ``"auto"``: every rank.
        tensor_parallel_size: ranks of a tensor-parallel group; ``"auto"``: 1 (no tensor parallelism,
            unlike Lightning's default, which gives every device of a node to tensor parallelism).
        save_distributed_checkpoint: write the sharded folder layout instead of one gathered file.
        process_group_backend: ``"gloo"``, ``"nccl"``; ``None`` picks by device.

    Example:
        .. code-block:: yaml

            trainer:
              strategy:
                class_path: detector.checkpoint.strategy.SafetensorsModelParallelStrategy
                init_args: {save_distributed_checkpoint: true}
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    @property
    def saves_sharded(self) -> bool:
        """Whether checkpoints are written as sharded folders (every rank writes)."""
        return saves_distributed_checkpoint(self)

    @override
    def setup_environment(self) -> None:
        data_parallel, tensor_parallel = model_parallel_sizes(self)
        resolve_auto_parallel_sizes(
            self,
            self.num_nodes * self.num_processes if data_parallel == "auto" else data_parallel,
            1 if tensor_parallel == "auto" else tensor_parallel,
        )
        super().setup_environment()

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if not self.saves_sharded:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        filepath = self.broadcast(filepath)
        if is_url(filepath):
            save_sharded_state_to_url(checkpoint, str(filepath), storage_options or self._storage_options)
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__} takes storage_options for URLs only, got {storage_options!r}"
            )
        save_sharded_state(checkpoint, Path(local(filepath)))

    @property
    def _storage_options(self) -> Any:
        return getattr(self.checkpoint_io, "storage_options", None)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path: Path | str = self.broadcast(checkpoint_path)
        if is_url(path):
            copy = local_copy(str(path), self._storage_options)  # every rank: the whole checkpoint
            if not is_sharded_checkpoint(copy):
                return self._load_full(str(path))
            try:
                return self._load_sharded(copy)
            except (CheckpointFormatError, CollectiveError) as error:
                raise named_by_url(error, copy, resolve(str(path), self._storage_options)) from None
        path = Path(local(path))
        if is_sharded_checkpoint(path):
            return self._load_sharded(path)
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder without {INDEX_NAME} (Lightning's sharded checkpoint, with a pickled "
                "meta.pt?): only this project's safetensors checkpoints are loaded"
            )
        return self._load_full(path)

    def _load_full(self, path: Path | str) -> dict[str, Any]:
        """Read a full-state file on every rank and broadcast rank zero's tensors into this mesh's shards."""
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        module, strict = self.model, self.lightning_module.strict_loading  # type: ignore[union-attr]
        load_full_state_into_sharded_module(checkpoint["state_dict"], module, strict=strict)
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            state = optimizer_state_by_name(state, optimizer, module)  # type: ignore[arg-type]
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)  # type: ignore[arg-type]
        return checkpoint

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """Fill this mesh's shards from a sharded folder; every rank reads only what its shards need."""
        module, strict = self.model, self.lightning_module.strict_loading  # type: ignore[union-attr]
        current = {
            "state_dict": get_model_state_dict(module),  # type: ignore[arg-type]
            "optimizer_states": [get_optimizer_state_dict(module, o) for o in self.optimizers],  # type: ignore[arg-type]
        }
        checkpoint = load_sharded_state(path, split_sharded(current)[1])
        set_model_state_dict(module, checkpoint["state_dict"], options=StateDictOptions(strict=strict))  # type: ignore[arg-type]
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state)  # type: ignore[arg-type]
        return checkpoint


def optimizer_state_by_name(state: dict[str, Any], optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """A full optimizer state keyed by parameter name, as ``set_optimizer_state_dict`` takes it.

    Saved parameter ids are matched to the optimizer's parameters by position within each param
    group, as ``Optimizer.load_state_dict`` does: right for a plain optimizer's state (ids in group
    order) and for a gathered FSDP2 one (ids in module order) alike.

    Raises:
        ValueError: if the saved param groups do not match the optimizer's in number or size.
    """
    groups = optimizer.param_groups
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise ValueError(
            f"the checkpoint's optimizer has param groups of sizes {sizes}, this one "
            f"{[len(g['params']) for g in groups]}: not the same model or optimizer settings"
        )
    names = {id(param): name for name, param in module.named_parameters()}
    key = {
        saved: names[id(param)]
        for saved_group, group in zip(state["param_groups"], groups, strict=True)
        for saved, param in zip(saved_group["params"], group["params"], strict=True)
    }
    return {
        "state": {key[saved]: value for saved, value in state["state"].items()},
        "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]],
    }
