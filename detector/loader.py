"""A resumable DataLoader: sample order is a pure function of (seed, epoch), position is batches consumed.

Lightning saves ``state_dict()`` of every training dataloader in the fit loop's checkpoint state and
calls ``load_state_dict`` on resume, so a run stopped mid-epoch continues with the very next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or weighted, with replacement) indices of one rank's share, reproducible per epoch.

    Lightning calls ``set_epoch`` at every epoch start (it looks for ``loader.sampler.set_epoch``).

    Args:
        num_samples: dataset size.
        seed: the order of epoch ``e`` depends only on ``(seed, e)``, never on the global RNG.
        shuffle: shuffle each epoch; otherwise sequential.
        weights: per-sample weights for balanced sampling with replacement (``num_samples`` draws).
        rank, world_size: this process's share: every ``world_size``-th sample from ``rank``; the
            order is padded by wrapping around so every rank gets as many samples.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def skip(self, epoch: int, samples: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``samples`` samples."""
        self._skip = (epoch, samples)

    def pending_skip(self) -> int:
        """Samples the next iteration will skip."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order for ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        total = len(self) * self.world_size
        padded = order.repeat(-(-total // max(len(order), 1)))[:total]
        return padded[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        start = self.pending_skip()
        self._skip = None
        yield from self.indices(self.epoch)[start:]

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` with ``state_dict``/``load_state_dict``.

    ``consumed`` tells how many batches of the current epoch the training loop has used. Lightning
    fetches one batch ahead, so the count of batches this loader yielded would be one too many; the
    data module passes the loop's own counter instead. Without it the yielded count is used.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: ResumableSampler,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        consumed: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # A private generator keeps worker seeding off the global RNG, so dropout continues exactly.
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_fn, **kwargs)
        self._consumed = consumed
        self._yielded = 0

    @property
    def resumable_sampler(self) -> ResumableSampler:
        """The sampler that orders and positions the data."""
        return self.sampler  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._yielded = self.resumable_sampler.pending_skip() // (self.batch_size or 1)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of its batches already consumed."""
        consumed = self._consumed() if self._consumed is not None else self._yielded
        sampler = self.resumable_sampler
        return {
            "epoch": sampler.epoch,
            "batches_consumed": int(consumed),
            "seed": sampler.seed,
            "batch_size": int(self.batch_size or 1),
            "world_size": sampler.world_size,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume: the next iteration of the saved epoch starts after its consumed batches."""
        sampler = self.resumable_sampler
        if state_dict.get("seed", sampler.seed) != sampler.seed:
            raise ValueError(
                f"the checkpoint's data order used seed {state_dict['seed']}, this run uses {sampler.seed}"
            )
        _check_global_batch(state_dict, int(self.batch_size or 1), sampler)
        sampler.skip(int(state_dict["epoch"]), int(state_dict["batches_consumed"]) * (self.batch_size or 1))


def _check_global_batch(state_dict: dict[str, int], batch_size: int, sampler: ResumableSampler) -> None:
    """Mid-epoch, the position is in batches: it maps onto this run only with the same global batch."""
    saved_batch = int(state_dict.get("batch_size", batch_size))
    saved_world = int(state_dict.get("world_size", sampler.world_size))
    per_rank = -(-sampler.num_samples // saved_world)
    mid_epoch = 0 < int(state_dict["batches_consumed"]) < -(-per_rank // saved_batch)
    if mid_epoch and saved_batch * saved_world != batch_size * sampler.world_size:
        raise ValueError(
            f"the checkpoint stopped mid-epoch with batches of {saved_batch} on {saved_world} rank(s); this "
            f"run has {batch_size} on {sampler.world_size}: resume mid-epoch with the same global batch "
            "(data.batch_size x devices), or resume from an epoch-end checkpoint"
        )
