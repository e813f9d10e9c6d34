"""Checksummed, pickle-free safetensors checkpoints of a whole training state, for Lightning.

The public API: save, load and verify a state file (:func:`save_state`, :func:`load_state`,
:func:`verify_state`), read either layout (a full-state file or a sharded FSDP2 folder) through
:func:`load_checkpoint_state`, plug it into a Trainer (:class:`SafetensorsCheckpointIO`,
:class:`SafetensorsModelParallelStrategy`), keep the right files (:class:`CheckpointTracker`), capture RNGs.
Imports only torch, NumPy, Lightning, safetensors, xxhash and :mod:`detector.atomic` (a test keeps it so).
"""

from detector.checkpoint.collective import CollectiveError
from detector.checkpoint.format import load_state, read_header, save_state, snapshot_state, verify_state
from detector.checkpoint.plugin import SafetensorsCheckpointIO, load_module_from_checkpoint
from detector.checkpoint.reader import (
    disk_usage,
    load_checkpoint_state,
    read_checkpoint_header,
    verify_checkpoint,
)
from detector.checkpoint.rng import capture_rng_state, restore_rng_state
from detector.checkpoint.strategy import SafetensorsModelParallelStrategy
from detector.checkpoint.topk import CheckpointTracker
from detector.checkpoint.tree import CheckpointFormatError

__all__ = [
    "CheckpointFormatError",
    "CheckpointTracker",
    "CollectiveError",
    "SafetensorsCheckpointIO",
    "SafetensorsModelParallelStrategy",
    "capture_rng_state",
    "disk_usage",
    "load_checkpoint_state",
    "load_module_from_checkpoint",
    "load_state",
    "read_checkpoint_header",
    "read_header",
    "restore_rng_state",
    "save_state",
    "snapshot_state",
    "verify_checkpoint",
    "verify_state",
]
