"""Exponential moving average of a module's weights: schedule, fused float32 updates, swap in and out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from detector.checkpoint.compat import foreach_copy_, foreach_lerp_


@dataclass(frozen=True)
class EMASchedule:
    """When the EMA is updated and with which decay.

    The EMA is updated after optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ... once more
    than ``start_step`` steps are done and the epoch is at least ``start_epoch``. The decay depends on
    ``n``, the number of updates already applied: the first update (``n == 0``) copies the weights;
    after it the decay is ``decay``, or with ``warmup`` timm's schedule
    ``min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power)``, which rises from 0 toward ``decay``
    (with gamma 1 and power 3/4 it reaches 0.999 at about 10k updates, 0.9999 at about 215k).

    Args:
        decay: Weight of the running average at each update, in [0, 1).
        warmup: Ramp the decay up with timm's schedule instead of using ``decay`` from the second update.
        warmup_gamma: Time scale of the warm-up, in updates (> 0).
        warmup_power: Exponent of the warm-up (> 0): 2/3 suits long runs, 3/4 shorter ones.
        every_n_steps: Update after every N-th optimizer step (>= 1).
        start_step: Updates begin after this many optimizer steps (>= 0).
        start_epoch: Updates begin in this (zero-based) epoch (>= 0).
    """

    decay: float = 0.999
    warmup: bool = False
    warmup_gamma: float = 1.0
    warmup_power: float = 0.75
    every_n_steps: int = 1
    start_step: int = 0
    start_epoch: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.warmup_gamma <= 0.0:
            raise ValueError(f"warmup_gamma must be > 0, got {self.warmup_gamma}")
        if self.warmup_power <= 0.0:
            raise ValueError(f"warmup_power must be > 0, got {self.warmup_power}")
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {self.start_epoch}")

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update that follows ``num_updates`` earlier updates (0.0 for the first)."""
        if num_updates <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + num_updates / self.warmup_gamma) ** -self.warmup_power)

    def should_update(self, step: int, epoch: int) -> bool:
        """Whether to update after ``step`` optimizer steps (1-based count) in zero-based ``epoch``."""
        return step > self.start_step and epoch >= self.start_epoch and step % self.every_n_steps == 0


_CAST_CHUNK_NUMEL = 1 << 24  # 64 MiB of float32


def _local(tensor: Tensor) -> Tensor:
    # In-place ops on a DTensor's local tensor act on the rank's shard (FSDP2 keeps it as a view).
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _master_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def _lerp_groups(targets: list[Tensor], averages: list[Tensor]) -> list[list[int]]:
    # Entries already in the averages' dtype and device go in one fused call; the others are cast in
    # chunks so the temporary float32 copies never add up to a second copy of the model.
    direct: list[int] = []
    chunks: list[list[int]] = [[]]
    chunk_numel = 0
    for i, (target, average) in enumerate(zip(targets, averages, strict=True)):
        if not target.dtype.is_floating_point:
            continue
        if (target.dtype, target.device) == (average.dtype, average.device):
            direct.append(i)
            continue
        if chunk_numel >= _CAST_CHUNK_NUMEL:
            chunks.append([])
            chunk_numel = 0
        chunks[-1].append(i)
        chunk_numel += target.numel()
    return [group for group in (direct, *chunks) if group]


def _shard(average: Tensor, target: Tensor) -> Tensor:
    if not isinstance(target, DTensor):
        return average.detach()
    mesh = target.device_mesh
    return DTensor.from_local(
        average.to(mesh.device_type), mesh, target.placements, shape=target.shape, stride=target.stride()
    )


def _gather(average: Tensor, target: Tensor) -> Tensor:
    sharded = _shard(average, target)
    if not isinstance(sharded, DTensor):
        return sharded
    return sharded.full_tensor().cpu()  # one full tensor at a time on the accelerator


class ExponentialMovingAverage:
    """EMA of a module's state (parameters and persistent buffers), kept apart from the module.

    Floating-point entries are averaged in float32 (float64 stays float64) whatever the module's dtype;
    other entries (integer counters, masks) are copied. Entries are keyed like ``module.state_dict()``;
    tensors shared under several names are averaged once. With DTensor parameters (FSDP2, tensor
    parallel) each rank averages its local shard; ``state_dict`` gathers full tensors to CPU memory on
    every rank (a collective: all ranks must call it).

    Build it once the module is on its device and sharded: it holds references to the module's tensors.

    Args:
        module: The module to average.
        device: Where to keep the averages and, during a swap, the backed-up training weights
            (``"cpu"`` to spare accelerator memory); ``None`` keeps them beside each tensor.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.num_updates = 0
        self._backup: list[Tensor] | None = None
        self._index: dict[str, int] = {}  # state_dict key -> unique tensor, in state_dict order
        self._targets: list[Tensor] = []
        by_id: dict[int, int] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in by_id:
                by_id[id(tensor)] = len(self._targets)
                self._targets.append(tensor)
            self._index[name] = by_id[id(tensor)]
        locals_ = [_local(t).detach() for t in self._targets]
        self._averages = [
            t.to(device=self.device or t.device, dtype=_master_dtype(t.dtype), copy=True) for t in locals_
        ]
        self._groups = _lerp_groups(locals_, self._averages)
        self._copied = [i for i, t in enumerate(self._targets) if not t.dtype.is_floating_point]

    @property
    def swapped(self) -> bool:
        """Whether the module currently holds the averages (between ``swap_in`` and ``swap_out``)."""
        return self._backup is not None

    def update(self, decay: float) -> None:
        """Fold the module's current weights in: ``avg = decay * avg + (1 - decay) * weight``; count it."""
        self._fold(decay)
        self.num_updates += 1

    def reset(self) -> None:
        """Restart from the module's current weights: copy them in and set the count to zero."""
        self._fold(0.0)
        self.num_updates = 0

    @torch.no_grad()
    def _fold(self, decay: float) -> None:
        if self.swapped:
            raise RuntimeError("cannot update the EMA while its weights are swapped into the module")
        for group in self._groups:
            averages = [self._averages[i] for i in group]
            current = [_local(self._targets[i]) for i in group]
            current = [c.to(a.device, a.dtype) for c, a in zip(current, averages, strict=True)]
            foreach_lerp_(averages, current, 1.0 - decay)
        if self._copied:
            foreach_copy_(
                [self._averages[i] for i in self._copied], [_local(self._targets[i]) for i in self._copied]
            )

    @torch.no_grad()
    def swap_in(self) -> None:
        """Back up the module's training weights and copy the averages into it (cast to its dtypes)."""
        if self.swapped:
            raise RuntimeError("the EMA weights are already swapped in")
        targets = [_local(t) for t in self._targets]
        self._backup = [t.detach().to(device=self.device or t.device, copy=True) for t in targets]
        foreach_copy_(targets, self._averages)

    @torch.no_grad()
    def swap_out(self) -> None:
        """Restore the training weights backed up by ``swap_in``, bit for bit."""
        if self._backup is None:
            raise RuntimeError("the EMA weights are not swapped in")
        foreach_copy_([_local(t) for t in self._targets], self._backup)
        self._backup = None

    def state_dict(self, sharded: bool = False) -> dict[str, Tensor]:
        """The averages keyed like ``module.state_dict()`` (live views when the module is not sharded).

        Args:
            sharded: ``False``: full CPU tensors, gathered from the shards (a collective). ``True``:
                a sharded module's averages as DTensors over this rank's shards, without any
                communication, for a sharded checkpoint (:mod:`detector.checkpoint.sharded`) to store.
        """
        pick = _shard if sharded else _gather
        tensors = [pick(a, t) for a, t in zip(self._averages, self._targets, strict=True)]
        return {name: tensors[i] for name, i in self._index.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load averages saved by ``state_dict`` (full tensors; each rank keeps its shard)."""
        if set(state) != set(self._index):
            missing, unexpected = sorted(set(self._index) - set(state)), sorted(set(state) - set(self._index))
            raise ValueError(f"EMA state does not match the module: missing {missing}, extra {unexpected}")
        first = {i: name for name, i in reversed(self._index.items())}
        for i, (target, average) in enumerate(zip(self._targets, self._averages, strict=True)):
            full = state[first[i]]
            if full.shape != target.shape:
                shapes = f"{tuple(full.shape)}, expected {tuple(target.shape)}"
                raise ValueError(f"EMA entry {first[i]!r} has shape {shapes}")
            if isinstance(target, DTensor):
                mesh, placements = target.device_mesh, target.placements
                full = distribute_tensor(full.to(mesh.device_type), mesh, placements, src_data_rank=None)
                full = full.to_local()
            average.copy_(full)
