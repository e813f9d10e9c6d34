"""Collectives that also run in one process without a process group: rank, broadcast, agreed errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A step run on every rank failed on at least one; raised alike on every rank.

    ``failures`` holds ``"rank R: ErrorType: message"`` for each failing rank. Not a
    :class:`~detector.checkpoint.tree.CheckpointFormatError`: the cause may be a full disk or a
    permission as well as a damaged file; the messages say which.
    """

    def __init__(self, what: str, failures: list[str]) -> None:
        super().__init__(f"{what} failed: " + "; ".join(failures))
        self.failures = failures


def rank_world() -> tuple[int, int]:
    """(global rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value: Any) -> Any:
    """Rank zero's ``value`` on every rank."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collectively(work: Callable[[], None], what: str, cleanup: Callable[[], None] | None = None) -> None:
    """Run ``work`` on every rank; if it fails on any, raise on all (no rank left waiting in a collective).

    One process re-raises the error itself; several raise :class:`CollectiveError` on every rank
    with each failing rank's message. ``cleanup`` runs on rank zero after a failure.
    """
    rank, world_size = rank_world()
    error = None
    try:
        work()
    except Exception as err:
        if world_size == 1:
            if cleanup is not None:
                cleanup()
            raise
        error = f"rank {rank}: {type(err).__name__}: {err}"
    if world_size == 1:
        return
    errors: list[Any] = [None] * world_size
    dist.all_gather_object(errors, error)
    failures = [e for e in errors if e is not None]
    if failures:
        if cleanup is not None and rank == 0:
            cleanup()
        raise CollectiveError(what, failures)
