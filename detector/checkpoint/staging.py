"""CPU snapshots of a training state into buffers reused from one save to the next, for background writes.

An asynchronous save blocks the training loop only while the state is copied to CPU memory. Copying
into fresh memory pays a page fault per 4 KiB page (and the kernel zeroing it): on a 2.2 GB state
that is most of the copy's time. :class:`StagingBuffers` keeps the previous snapshot's tensors and
copies the next state into them when shapes and dtypes match (they do, save after save, in
training), so a snapshot after the first costs one memory copy. The price is that the buffers (one
state's worth of memory) stay allocated between saves; :meth:`StagingBuffers.release` frees them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch


class StagingBuffers:
    """Snapshots states into reused CPU buffers; one snapshot in use at a time.

    The caller must be done with a snapshot (its write finished) before taking the next one: the next
    :meth:`snapshot` overwrites the same buffers.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def snapshot(self, state: Any) -> Any:
        """A copy of ``state`` with every tensor copied into a CPU buffer (reused when it fits).

        Containers are rebuilt; a tensor met twice is copied once, so aliasing is kept, as in
        :func:`detector.checkpoint.format.snapshot_state`.
        """
        used: list[torch.Tensor] = []
        copy = self._copy(state, {}, used)
        self._buffers = used
        return copy

    def release(self) -> None:
        """Free the buffers (the next snapshot allocates afresh)."""
        self._buffers = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def _copy(self, value: Any, memo: dict[int, Any], used: list[torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = self._stage(value.detach(), used)
            return memo[id(value)]
        if isinstance(value, np.ndarray):
            return memo.setdefault(id(value), value.copy())
        if type(value) in (dict, OrderedDict):
            copy = type(value)((key, self._copy(item, memo, used)) for key, item in value.items())
            if hasattr(value, "_metadata"):
                copy._metadata = self._copy(value._metadata, memo, used)  # type: ignore[attr-defined]
            return copy
        if type(value) in (list, tuple):
            return type(value)(self._copy(item, memo, used) for item in value)
        return value

    def _stage(self, tensor: torch.Tensor, used: list[torch.Tensor]) -> torch.Tensor:
        # Buffers are matched by position: the same training state flattens in the same order each time.
        position = len(used)
        buffer = self._buffers[position] if position < len(self._buffers) else None
        fits = (
            buffer is not None
            and buffer.shape == tensor.shape
            and buffer.dtype == tensor.dtype
            and tensor.layout == torch.strided
            and not (tensor.is_conj() or tensor.is_neg() or buffer.is_conj() or buffer.is_neg())
        )
        if buffer is None or not fits:
            buffer = tensor.to("cpu", copy=True)
        else:
            buffer.copy_(tensor)
        used.append(buffer)
        return buffer
