"""CPU snapshots of a training state into buffers reused from one save to the next, for background writes.

An asynchronous save must not block the training loop for the copy of the state. Two things make the
copy cheap for the loop:

- **Reused buffers.** Copying into fresh memory pays a page fault per 4 KiB page (and the kernel
  zeroing it): on a 2.2 GB state that is most of the copy's time. :class:`StagingBuffers` keeps the
  previous snapshot's tensors and copies the next state into them when shapes and dtypes match (they
  do, save after save, in training). The price: the buffers (one state's worth of memory) stay
  allocated between saves; :meth:`StagingBuffers.release` frees them.
- **Deferred copies.** The tensors that only an optimizer step changes (the parameters, the
  optimizer's moments, the EMA weights) are the bulk of the state, and the next batch's forward and
  backward only read them. :meth:`StagingBuffers.snapshot` takes the rest (RNG, scheduler, counters,
  loop and loader state, buffers, every small tensor) at once and leaves those tensors to
  :meth:`Snapshot.copy`, which a background thread runs while training goes on. Whoever is about to
  change them first calls :func:`wait_for_copies` (the fence): the checkpoint callback before every
  optimizer step, the EMA before it updates or swaps weights.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

# Smaller tensors are copied at once: the copy costs less than keeping track of it.
DEFER_MIN_BYTES = 64 << 10
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # tensor subclasses (DTensor) are never deferred

_pending: list[threading.Event] = []  # deferred copies not done yet, in this process
_pending_lock = threading.Lock()


def wait_for_copies() -> float:
    """Block until every deferred snapshot copy of this process is done; the seconds waited.

    Call it before changing a tensor that a snapshot may still be copying (the fence).
    """
    with _pending_lock:
        events = list(_pending)
    if not events:
        return 0.0
    start = time.perf_counter()
    for event in events:
        event.wait()
    return time.perf_counter() - start


def storages(tensors: Iterable[Any]) -> set[int]:
    """The storage addresses of ``tensors``, for :meth:`StagingBuffers.snapshot`.

    Non-tensors, empty tensors and tensors without a storage of their own (DTensor shards' wrappers)
    are skipped: what is not named is copied at once, never deferred.
    """
    found = set()
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel() and type(tensor) in _PLAIN:
            found.add(tensor.untyped_storage().data_ptr())
    return found


class Snapshot:
    """A snapshot's state tree and the copies still to be done into it (see :meth:`copy`)."""

    def __init__(self, state: Any, copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.state = state
        self._copies = copies
        self._done = threading.Event()
        if copies:
            with _pending_lock:
                _pending.append(self._done)
        else:
            self._done.set()

    @property
    def deferred_bytes(self) -> int:
        """Bytes the deferred copies still have to move (0 once copied)."""
        return 0 if self._done.is_set() else sum(b.numel() * b.element_size() for b, _ in self._copies)

    def copy(self) -> None:
        """Do the deferred copies into the snapshot's buffers; the fence opens even if one fails."""
        try:
            with torch.no_grad():
                for buffer, source in self._copies:
                    buffer.copy_(source)
        finally:
            self._copies = []
            self._done.set()
            with _pending_lock:
                if self._done in _pending:
                    _pending.remove(self._done)


class StagingBuffers:
    """Snapshots states into reused CPU buffers; one snapshot in use at a time.

    The caller must be done with a snapshot (its write finished) before taking the next one: the next
    :meth:`snapshot` overwrites the same buffers.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def snapshot(self, state: Any, defer: set[int] | frozenset[int] = frozenset()) -> Snapshot:
        """A copy of ``state`` with every tensor copied into a CPU buffer (reused when it fits).

        Containers are rebuilt; a tensor met twice is copied once, so aliasing is kept, as in
        :func:`detector.checkpoint.format.snapshot_state`.

        Args:
            state: the tree to copy.
            defer: storage addresses (:func:`storages`) of tensors whose copy may wait for
                :meth:`Snapshot.copy`: their buffers are in the tree but filled only then. Tensors of
                at least ``DEFER_MIN_BYTES`` on these storages are deferred; everything else is
                copied now.
        """
        used: list[torch.Tensor] = []
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        tree = self._copy(state, {}, used, (defer, copies))
        self._buffers = used
        return Snapshot(tree, copies)

    def release(self) -> None:
        """Free the buffers (the next snapshot allocates afresh)."""
        self._buffers = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers)

    def _copy(self, value: Any, memo: dict[int, Any], used: list[torch.Tensor], deferral: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:
                memo[id(value)] = self._stage(value.detach(), used, *deferral)
            return memo[id(value)]
        if isinstance(value, np.ndarray):
            return memo.setdefault(id(value), value.copy())
        if type(value) in (dict, OrderedDict):
            copy = type(value)((key, self._copy(item, memo, used, deferral)) for key, item in value.items())
            if hasattr(value, "_metadata"):
                copy._metadata = self._copy(value._metadata, memo, used, deferral)  # type: ignore[attr-defined]
            return copy
        if type(value) in (list, tuple):
            return type(value)(self._copy(item, memo, used, deferral) for item in value)
        return value

    def _stage(
        self,
        tensor: torch.Tensor,
        used: list[torch.Tensor],
        defer: set[int] | frozenset[int],
        copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        # Buffers are matched by position: the same training state flattens in the same order each time.
        position = len(used)
        buffer = self._buffers[position] if position < len(self._buffers) else None
        plain = tensor.layout == torch.strided and not (tensor.is_conj() or tensor.is_neg())
        fits = (
            buffer is not None
            and buffer.shape == tensor.shape
            and buffer.dtype == tensor.dtype
            and plain
            and not (buffer.is_conj() or buffer.is_neg())
        )
        later = (
            plain
            and tensor.numel() * tensor.element_size() >= DEFER_MIN_BYTES
            and tensor.untyped_storage().data_ptr() in defer
        )
        if later:
            if buffer is None or not fits:  # untouched fresh memory: its page faults happen in the copy
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
            copies.append((buffer, tensor))
        elif buffer is None or not fits:
            buffer = tensor.to("cpu", copy=True)
        else:
            buffer.copy_(tensor)
        used.append(buffer)
        return buffer
