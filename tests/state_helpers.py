"""Shared helpers for the state-format tests: a state holding every value type, and exact comparison."""

from __future__ import annotations

import math
import pathlib
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


def every_type_state() -> dict[Any, Any]:
    """A nested state with every value type the format promises to keep exactly."""
    generator = torch.Generator().manual_seed(0)
    weights = OrderedDict(
        [("layer.weight", torch.randn(3, 4, generator=generator)), ("layer.bias", torch.zeros(3))]
    )
    weights._metadata = OrderedDict([("", {"version": 1}), ("layer", {"version": 1})])  # type: ignore[attr-defined]
    return {
        "epoch": 3,
        "global_step": 120,
        "big_int": 2**70,
        "floats": [0.1, -0.0, 1e-300, math.nan, math.inf, -math.inf, 1.0],
        "flags": (True, False, None),
        "text": 'résumé \u2603 "quoted" {braces}',
        "state_dict": weights,
        "optimizer_states": [
            {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"betas": (0.9, 0.999)}]}
        ],
        "mixed_keys": {1: "int", "1": "str", 2.5: "float", False: "bool", None: "none", (1, "a"): "tuple"},
        "tag_key": {"__t__": "not a tag"},
        "empty": {"dict": {}, "list": [], "tuple": ()},
        "dtypes": {
            str(dtype): torch.ones(2, dtype=dtype)
            for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint32, torch.bool)
        },
        "complex": torch.tensor([1 + 2j], dtype=torch.complex64),
        "scalar_tensor": torch.tensor(7, dtype=torch.int64),
        "empty_tensor": torch.zeros(0, 3),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "numpy_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.float64("nan")],
        "numpy_arrays": [np.arange(6, dtype=np.int16).reshape(2, 3), np.array(2.5), np.arange(6.0)[::2]],
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "paths": [pathlib.Path("outputs/checkpoints"), pathlib.PurePosixPath("/a/b")],
        "bytes": b"\x00\xffraw",
    }


def assert_identical(actual: Any, expected: Any, where: str = "state") -> None:
    """Equal values of exactly the same types, all the way down (NaN equals NaN)."""
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert np.array_equal(actual, expected), where
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for (key, value), other_key in zip(expected.items(), actual, strict=True):
            assert type(other_key) is type(key), f"{where}: key {key!r} type"
            assert_identical(actual[key], value, f"{where}[{key!r}]")
        assert_identical(getattr(actual, "_metadata", None), getattr(expected, "_metadata", None), where)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_identical(a, e, f"{where}[{i}]")
    elif isinstance(expected, float | np.floating) and math.isnan(expected):
        assert math.isnan(actual), where
    elif isinstance(expected, float):
        assert actual == expected and math.copysign(1, actual) == math.copysign(1, expected), where
    else:
        assert actual == expected, where


def save_forever(path: str, first_version: int, ready: Any) -> None:
    """Crash-test child: save a ~20 MB state to ``path`` again and again, filled with its version."""
    from detector.checkpoint.format import save_state

    version = first_version
    while True:
        state = {
            "version": version,
            "w": torch.full((5_000_000,), float(version)),
            "step": torch.tensor(version),
        }
        save_state(state, path)
        ready.set()
        version += 1


def save_sharded_forever(path: str, first_version: int, ready: Any) -> None:
    """Crash-test child: save a ~20 MB state as a sharded folder at ``path`` again and again."""
    from detector.checkpoint.sharded import save_sharded_state

    version = first_version
    while True:
        save_sharded_state({"version": version, "w": torch.full((5_000_000,), float(version))}, path)
        ready.set()
        version += 1


def build_cli_in(cwd: pathlib.Path, args: list[str]) -> Any:
    """``build_cli(args)`` run from a new folder ``cwd`` (its ``outputs/`` lands there)."""
    import pytest

    from detector.cli import build_cli

    cwd.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return build_cli(args)


def final_training_state(cli: Any) -> dict[str, dict[str, torch.Tensor]]:
    """What an exact resume must reproduce: the weights, AdamW's state and the EMA of a finished fit."""
    from callbacks.ema import EMACallback

    (ema,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EMACallback)]
    optimizer = cli.trainer.optimizers[0].state_dict()["state"]
    return {
        "weights": dict(cli.model.state_dict()),
        "optimizer": {f"{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()},
        "ema": ema.averaged_state_dict(),
    }


def write_tiny_checkpoint(path: pathlib.Path, tokenizer: Any, arch: dict[str, int]) -> pathlib.Path:
    """A checkpoint of a classifier of shape ``arch`` (seeded weights) at epoch 1, step 8, with
    ``tokenizer``'s files and ``max_length`` 48: what ``export`` reads."""
    from detector.checkpoint.format import save_state
    from detector.module import DetectorModule
    from detector.tokenizer import tokenizer_files

    torch.manual_seed(3)
    module = DetectorModule(arch=arch, vocab_size=len(tokenizer))
    checkpoint = {
        "epoch": 1,
        "global_step": 8,
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"max_length": 48},
        "DetectorDataModule": {"tokenizer_files": tokenizer_files(tokenizer)},
    }
    save_state(checkpoint, path)
    return path
