"""benchmarks/gpu_check.py: exits cleanly without CUDA; its FLOP count; a short run where a GPU exists."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from detector.backbone import architecture_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)  # type: ignore[union-attr]


def test_without_cuda_it_says_so_and_exits_with_status_zero(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--steps", "5", "--warmup", "1"]) == 0
    assert capsys.readouterr().out == (
        "gpu_check: no CUDA device visible; nothing measured. Run it on a machine with a GPU.\n"
    )


def test_warmup_must_leave_steps_to_time() -> None:
    with pytest.raises(ValueError, match="--warmup must be < --steps"):
        gpu_check.main(["--steps", "5", "--warmup", "5"])


def test_model_flops_per_sample_counts_the_matmuls_by_hand() -> None:
    config = architecture_config(100, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=16, position_buckets=4)  # fmt: skip
    s, h, i, span = 10, 8, 16, 8
    layer = 2 * s * (4 * h * h + 2 * h * i) + 4 * s * s * h + 4 * span * h * h + 4 * s * span * h
    assert gpu_check.model_flops_per_sample(config, s) == 3 * 2 * layer


def test_peak_tflops_from_the_name_or_the_override() -> None:
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0
    assert gpu_check.peak_tflops("Some GPU", None) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_short_gpu_run_reports_every_figure(tmp_path) -> None:
    out = tmp_path / "figures.json"
    args = ["--steps", "12", "--warmup", "2", "--batch", "2", "--seq", "128", "--json", str(out)]
    assert gpu_check.main(args) == 0
    figures = json.loads(out.read_text())
    assert figures["timed_steps"] == 10 and figures["samples_per_s"] > 0
    assert figures["peak_memory_gb"] > 0 and figures["checkpoint"]["size_gb"] > 0
