"""Seeded, stratified, group-aware train/validation split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np


def stratified_group_split(
    labels: Sequence[int], groups: Sequence[Hashable] | None, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split row indices into (train, val) so that no group spans both and classes keep their share.

    Rows without a group are their own group. Groups are stratified by their label mix (human only,
    machine only, both) and, within each stratum, a seeded shuffle sends ``val_fraction`` of the
    groups (at least one when the stratum has two or more) to validation.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index in range(len(labels)):
        key = groups[index] if groups is not None and groups[index] is not None else ("row", index)
        members[key].append(index)
    strata: dict[tuple[bool, bool], list[Hashable]] = defaultdict(list)
    for key, rows in members.items():
        present = {labels[i] for i in rows}
        strata[(0 in present, 1 in present)].append(key)
    rng = np.random.default_rng(seed)
    val_groups: set[Hashable] = set()
    for mix in sorted(strata):
        keys = strata[mix]
        order = rng.permutation(len(keys))
        take = round(val_fraction * len(keys))
        take = min(max(take, 1 if len(keys) > 1 else 0), len(keys) - 1)
        val_groups.update(keys[i] for i in order[:take])
    train = [i for key, rows in members.items() if key not in val_groups for i in rows]
    val = [i for key, rows in members.items() if key in val_groups for i in rows]
    return sorted(train), sorted(val)
