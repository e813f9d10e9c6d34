"""A resumable DataLoader: batch order is a pure function of (seed, epoch), position is batches consumed.

Lightning saves ``state_dict()`` of every training dataloader in the fit loop's checkpoint state and
calls ``load_state_dict`` on resume, so a run stopped mid-epoch continues with the very next batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled (or weighted, with replacement) batches of one rank's share, reproducible per epoch.

    Args:
        num_samples: dataset size.
        batch_size: samples per batch.
        seed: the order of epoch ``e`` depends only on ``(seed, e)``, never on the global RNG.
        shuffle: shuffle each epoch; otherwise sequential.
        weights: per-sample weights for balanced sampling with replacement (``num_samples`` draws).
        rank, world_size: this process's share: every ``world_size``-th sample from ``rank``.
        drop_last: drop the last incomplete batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip_epoch: int | None = None
        self._skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (Lightning calls this each epoch)."""
        self.epoch = epoch

    def skip(self, epoch: int, batches: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``batches`` batches."""
        self._skip_epoch, self._skip_batches = epoch, batches

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order for ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        elif self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        per_rank = -(-self.num_samples // self.world_size)
        padded = order.repeat(-(-per_rank * self.world_size // max(len(order), 1)))[
            : per_rank * self.world_size
        ]
        return padded[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.indices(self.epoch)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        start = self._skip_batches if self._skip_epoch == self.epoch else 0
        self._skip_epoch, self._skip_batches = None, 0
        yield from batches[start:]

    def __len__(self) -> int:
        per_rank = -(-self.num_samples // self.world_size)
        full, rest = divmod(per_rank, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``ResumableBatchSampler`` with ``state_dict``/``load_state_dict``.

    ``consumed`` tells how many batches of the current epoch the training loop has used. Lightning
    fetches one batch ahead, so the count of batches this loader yielded would be one too many; the
    data module passes the loop's own counter instead. Without it the yielded count is used.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: ResumableBatchSampler,
        collate_fn: Callable[[list[Any]], Any],
        consumed: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        # A private generator keeps worker seeding off the global RNG, so dropout continues exactly.
        kwargs.setdefault("generator", torch.Generator().manual_seed(batch_sampler.seed))
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, **kwargs)
        self._consumed = consumed
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableBatchSampler = self.batch_sampler  # type: ignore[assignment]
        self._yielded = sampler._skip_batches if sampler._skip_epoch == sampler.epoch else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the number of its batches already consumed."""
        sampler: ResumableBatchSampler = self.batch_sampler  # type: ignore[assignment]
        consumed = self._consumed() if self._consumed is not None else self._yielded
        return {"epoch": sampler.epoch, "batches_consumed": int(consumed), "seed": sampler.seed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume: the next iteration of the saved epoch starts after its consumed batches."""
        sampler: ResumableBatchSampler = self.batch_sampler  # type: ignore[assignment]
        if state_dict.get("seed", sampler.seed) != sampler.seed:
            raise ValueError(
                f"the checkpoint's data order used seed {state_dict['seed']}, this run uses {sampler.seed}"
            )
        sampler.skip(int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
