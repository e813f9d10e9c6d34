"""FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``, with safetensors checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.fabric.strategies.model_parallel import (
    _load_raw_module_state,
)
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.optim import Optimizer
from typing_extensions import override


class SafetensorsModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` that reads full-state checkpoints through the Trainer's ``CheckpointIO``.

    Saving (``save_distributed_checkpoint=False``, the default here): every rank takes part in
    gathering the full weights and optimizer state into CPU memory of global rank zero, which writes
    them through the ``CheckpointIO`` (one safetensors file; note rank zero then holds the whole state
    in CPU memory). Loading such a file: every rank reads it through the same ``CheckpointIO`` (no
    pickle), and rank zero's tensors are broadcast into the shards of the current mesh, so a
    checkpoint resumes on any number of ranks. Lightning's own ``ModelParallelStrategy`` reads a
    full checkpoint with ``torch.load`` instead, which cannot read this format.

    Sharded checkpoints are not supported yet: Lightning's (``save_distributed_checkpoint=True``) is a
    ``torch.distributed.checkpoint`` folder with a pickled ``meta.pt``, which this project never loads,
    and which the top-K checkpoint callback cannot link or rotate.

    Args:
        data_parallel_size: ranks that shard the model (FSDP2); ``"auto"``: every rank.
        tensor_parallel_size: ranks of a tensor-parallel group; ``"auto"``: 1 (no tensor parallelism,
            unlike Lightning's default, which gives every device of a node to tensor parallelism).
        save_distributed_checkpoint: must be ``False`` (kept so configs can state it).
        process_group_backend: ``"gloo"``, ``"nccl"``; ``None`` picks by device.

    Example:
        .. code-block:: yaml

            trainer:
              strategy:
                class_path: detector.model_parallel.SafetensorsModelParallelStrategy
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
    ) -> None:
        if save_distributed_checkpoint:
            raise ValueError(
                "save_distributed_checkpoint=True writes Lightning's sharded folder with a pickled meta.pt, "
                "which this project does not load; use False (the full state, gathered on global rank zero)"
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    @override
    def setup_environment(self) -> None:
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder (a sharded torch.distributed.checkpoint, with a pickled meta.pt?): "
                "only full-state safetensors checkpoint files are loaded"
            )
        checkpoint = self.checkpoint_io.load_checkpoint(path)
        module, strict = self.model, self.lightning_module.strict_loading  # type: ignore[union-attr]
        _load_raw_module_state(checkpoint["state_dict"], module, strict=strict)  # type: ignore[arg-type]
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            state = optimizer_state_by_name(state, optimizer, module)  # type: ignore[arg-type]
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=options)  # type: ignore[arg-type]
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
