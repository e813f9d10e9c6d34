"""benchmarks/bench_sharded_io.py: its load check catches a load that restored nothing; a 1-round run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_sharded_io.py"
spec = importlib.util.spec_from_file_location("bench_sharded_io", SCRIPT)
bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["bench_sharded_io"] = bench
spec.loader.exec_module(bench)  # type: ignore[union-attr]


def _state() -> dict:
    return {
        "global_step": 3,
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
        "optimizer_states": [{"state": {"w": {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]}],
    }


def test_the_load_check_names_every_tensor_a_load_left_untouched() -> None:
    saved = _state()
    assert bench._mismatches(_state(), saved) == []
    assert bench._mismatches(bench._fresh(saved), saved) == [
        "state_dict.w",
        "optimizer_states.0.state.w.step",
    ]
    changed = {**_state(), "global_step": 4}
    assert bench._mismatches(changed, saved) == ["global_step"]


@pytest.mark.slow
def test_one_round_prints_every_row_with_its_ratio() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "small", "--repeats", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "both loads restored every saved tensor exactly (checked once, before the rounds)" in lines
    for op in bench.OPS:
        assert any(line.split()[:1] == [op] for line in lines), op
    for label, _, _ in bench.ROWS:
        row = next(line for line in lines if line.startswith(label))
        ours, peer, ratio = (float(v) for v in row[len(label) :].split()[:3])
        assert ours > 0 and peer > 0 and ratio > 0, row
