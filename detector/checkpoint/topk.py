"""Checkpoint retention policy, without a Trainer: top-K by a metric, best, last-N periodic files, history.

Scores are ranked so that every finite score beats every non-finite one (NaN, +inf, -inf): a
non-finite score is never the best and only fills a top-K slot that no finite score wants; the first
finite score to arrive evicts it. Among equal scores the earlier one stays: a new score must be
strictly better than the worst kept one to displace it. Files are tracked by name (no folder), so a
run whose checkpoint folder moved keeps rotating.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["max", "min"]
MODES: tuple[str, ...] = ("max", "min")
SUFFIX = ".safetensors"
LATEST_NAME = f"checkpoint_latest{SUFFIX}"
KEEP_ALL = -1


def safe_metric_name(monitor: str) -> str:
    """``monitor`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``, for file names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", monitor)


def best_name(monitor: str) -> str:
    """``checkpoint_best_val_f1.safetensors`` for ``monitor="val_f1"``."""
    return f"checkpoint_best_{safe_metric_name(monitor)}{SUFFIX}"


def top_k_name(monitor: str, epoch: int, step: int, score: float) -> str:
    """``checkpoint_top_epoch_3_step_400_val_f1_0.8123.safetensors``: unique per (epoch, step)."""
    return f"checkpoint_top_epoch_{epoch}_step_{step}_{safe_metric_name(monitor)}_{score:.4f}{SUFFIX}"


def epoch_name(epoch: int) -> str:
    """``checkpoint_epoch_N.safetensors``; N is Lightning's 0-based epoch index (the file's ``epoch``)."""
    return f"checkpoint_epoch_{epoch}{SUFFIX}"


def step_name(step: int) -> str:
    """``checkpoint_step_N.safetensors``; N is the number of optimizer steps taken (``global_step``)."""
    return f"checkpoint_step_{step}{SUFFIX}"


def is_better(score: float, other: float, mode: Mode) -> bool:
    """Whether ``score`` ranks strictly above ``other``; a non-finite score never ranks above anything."""
    if not math.isfinite(score):
        return False
    if not math.isfinite(other):
        return True
    return score > other if mode == "max" else score < other


def check_limit(name: str, value: int, allow_zero: bool) -> None:
    """Raise ValueError unless ``value`` is a count >= 1 (or 0 where allowed) or -1 (keep all)."""
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or (value < lowest and value != KEEP_ALL):
        raise ValueError(f"{name} must be an int >= {lowest} or -1 (keep all), got {value!r}")


@dataclass(frozen=True)
class Ranked:
    """A kept file and its score."""

    score: float
    name: str


class TopK:
    """The ``k`` best (score, file name) pairs, best first; ``k=-1`` keeps all, ``k=0`` none."""

    def __init__(self, k: int, mode: Mode) -> None:
        check_limit("save_top_k", k, allow_zero=True)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.k, self.mode = k, mode
        self.kept: list[Ranked] = []

    def offer(self, score: float, name: str) -> tuple[bool, list[str]]:
        """Offer a candidate; return whether it is kept and the names it evicts.

        A name already kept (the same validation replayed after a resume) is replaced, not duplicated.
        """
        self.kept = [r for r in self.kept if r.name != name]
        if self.k == 0:
            return False, []
        index = next((i for i, r in enumerate(self.kept) if is_better(score, r.score, self.mode)), None)
        self.kept.insert(len(self.kept) if index is None else index, Ranked(float(score), name))
        limit = len(self.kept) if self.k == KEEP_ALL else self.k
        evicted = [r.name for r in self.kept[limit:]]
        self.kept = self.kept[:limit]
        kept = name not in evicted
        return kept, [n for n in evicted if n != name]

    def state_dict(self) -> list[list[Any]]:
        return [[r.score, r.name] for r in self.kept]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        self.kept = [Ranked(float(score), str(name)) for score, name in state]


class LastN:
    """The ``n`` most recent file names of one periodic kind; ``n=-1`` keeps all."""

    def __init__(self, n: int, name: str) -> None:
        check_limit(name, n, allow_zero=False)
        self.n = n
        self.kept: list[str] = []

    def add(self, name: str) -> list[str]:
        """Add the newest name (moved to the end if already kept); return the names it evicts."""
        self.kept = [*(k for k in self.kept if k != name), name]
        if self.n == KEEP_ALL or len(self.kept) <= self.n:
            return []
        evicted, self.kept = self.kept[: -self.n], self.kept[-self.n :]
        return evicted


class CheckpointTracker:
    """Which checkpoint files to keep: top-K, best, last N epoch files, last N step files, plus history.

    Registrations collect evicted names in :attr:`deletions`. The owner writes the new file, *then*
    deletes those names and calls :meth:`clear_deletions`; the list is part of :meth:`state_dict`, so
    a run that crashed between the commit and the deletions finishes them when it resumes.

    Example:
        >>> t = CheckpointTracker(mode="max", save_top_k=2)
        >>> [t.offer_top_k(s, f"c{i}") for i, s in enumerate([0.5, float("nan"), 0.7, 0.6])]
        [True, True, True, True]
        >>> [r.name for r in t.top_k.kept], t.deletions
        (['c2', 'c3'], ['c1', 'c0'])
    """

    def __init__(
        self, mode: Mode = "max", save_top_k: int = 1, keep_last_epochs: int = 1, keep_last_steps: int = 1
    ) -> None:
        self.top_k = TopK(save_top_k, mode)
        self.epochs = LastN(keep_last_epochs, "keep_last_epochs")
        self.steps = LastN(keep_last_steps, "keep_last_steps")
        self.best: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self.deletions: list[str] = []

    def offer_top_k(self, score: float, name: str) -> bool:
        """Offer a scored file to the top-K; return whether it is kept."""
        kept, evicted = self.top_k.offer(score, name)
        self._evict(evicted)
        return kept

    def offer_best(self, score: float, epoch: int, step: int) -> bool:
        """Return whether ``score`` is a new best (finite and strictly better than the best so far)."""
        current = math.nan if self.best is None else self.best["score"]
        if not is_better(score, current, self.top_k.mode):
            return False
        self.best = {"score": float(score), "epoch": epoch, "step": step}
        return True

    def add_epoch(self, name: str) -> None:
        """Register a periodic epoch file."""
        self._evict(self.epochs.add(name))

    def add_step(self, name: str) -> None:
        """Register a periodic step file."""
        self._evict(self.steps.add(name))

    def record(self, epoch: int, step: int, metrics: Mapping[str, float]) -> None:
        """Append one validation's metrics to the history."""
        self.history.append(
            {"epoch": epoch, "step": step, "metrics": {k: float(v) for k, v in metrics.items()}}
        )

    def kept_names(self) -> set[str]:
        """Every file name some kind still keeps."""
        return {r.name for r in self.top_k.kept} | set(self.epochs.kept) | set(self.steps.kept)

    def clear_deletions(self) -> None:
        """Forget the pending deletions once they are done."""
        self.deletions = []

    def _evict(self, names: list[str]) -> None:
        kept = self.kept_names()
        self.deletions += [n for n in names if n not in kept and n not in self.deletions]
        # A name registered again (a resumed run replaying a step) must not be deleted after its write.
        self.deletions = [n for n in self.deletions if n not in kept]

    def state_dict(self) -> dict[str, Any]:
        """Scores, names, best, history and pending deletions: plain JSON-able values."""
        return {
            "mode": self.top_k.mode,
            "top_k": self.top_k.state_dict(),
            "epochs": list(self.epochs.kept),
            "steps": list(self.steps.kept),
            "best": None if self.best is None else dict(self.best),
            "history": [dict(h, metrics=dict(h["metrics"])) for h in self.history],
            "deletions": list(self.deletions),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; limits and mode stay those of this instance.

        Raises:
            ValueError: if the state was written with the other ``mode`` (its ranking would be reversed).
        """
        if state["mode"] != self.top_k.mode:
            raise ValueError(
                f"tracker state has mode={state['mode']!r}, this run has mode={self.top_k.mode!r}"
            )
        self.top_k.load_state_dict(state["top_k"])
        self.epochs.kept = [str(n) for n in state["epochs"]]
        self.steps.kept = [str(n) for n in state["steps"]]
        self.best = None if state["best"] is None else dict(state["best"])
        self.history = [dict(h, metrics=dict(h["metrics"])) for h in state["history"]]
        self.deletions = [str(n) for n in state["deletions"]]
