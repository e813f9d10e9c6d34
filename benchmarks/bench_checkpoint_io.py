"""Save/load speed and memory of the safetensors state format vs torch.save/torch.load and the disk (dd).

Usage:
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py            # small + base, 3 repeats
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py --quick    # small only
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py --sizes base --repeats 5 --dir /mnt/fast

States: ``small`` is ``build_classifier(None, 8000)``; ``base`` a DeBERTa-v3-base-shaped classifier
(hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 128100: 184M parameters). Each holds the
weights plus AdamW's ``exp_avg``/``exp_avg_sq``/``step`` and a scheduler, in the shape of a Lightning
checkpoint (3 x fp32 weights: about 2.2 GB for ``base``).

``ours`` uses the default ``crc32-tree`` checksum; the ``_sha256`` rows the ``sha256-tree`` one;
``_mmap`` rows load with ``mmap=True`` (tensors over a private mapping of the file).
Each repeat runs in a fresh worker process that builds the state once, then runs every measurement.
Before each one the worker returns freed heap to the OS (``malloc_trim``) and resets its peak RSS
(``/proc/self/clear_refs``), so "peak RSS" is the increase during that operation alone. Loads are
timed warm (the file just written, in the page cache) and cold (its pages dropped with
``posix_fadvise(DONTNEED)``), and every tensor's pages are touched after loading. ``snapshot`` is
what an asynchronous save blocks the training loop for (cloning to CPU memory); a synchronous save
blocks it for ``ours save``. Medians over the repeats. Disks on shared machines are noisy: compare
ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OPS = [
    "dd",
    "ours_save",
    "ours_save_sha256",
    "torch_save",
    "ours_load_warm",
    "ours_load_sha256_warm",
    "torch_load_warm",
    "ours_load_cold",
    "torch_load_cold",
    "ours_load_mmap_warm",
    "ours_load_mmap_cold",
    "ours_verify_warm",
    "snapshot",
]


def build_state(size: str) -> dict[str, Any]:
    """A Lightning-checkpoint-shaped training state: weights, AdamW state, scheduler, loop counters."""
    import torch

    from detector.backbone import architecture_config, build_classifier

    if size == "small":
        model = build_classifier(None, 8000)
    else:
        from transformers import DebertaV2ForSequenceClassification

        overrides = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
        config = architecture_config(128100, intermediate_size=3072, position_buckets=256, **overrides)
        model = DebertaV2ForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=100)
    with torch.no_grad():  # AdamW's state as after some steps, without paying for a backward pass
        for param in model.parameters():
            optimizer.state[param] = {
                "step": torch.tensor(100.0),
                "exp_avg": param.mul(1e-3),
                "exp_avg_sq": param.square(),
            }
    return {
        "epoch": 1,
        "global_step": 100,
        "state_dict": model.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 1, "completed": 1}}}},
        "hyper_parameters": {"lr": 2e-5, "arch": size},
    }


def _tensor_bytes(state: Any) -> int:
    import torch

    from detector.checkpoint.format import flatten_state

    tensors, _ = flatten_state(state)
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


def _touch(state: Any) -> None:
    """Read one element per 4 KiB page of every tensor, so lazily mapped data is really loaded."""
    from detector.checkpoint.format import flatten_state

    tensors, _ = flatten_state(state)
    for tensor in tensors.values():
        flat = tensor.reshape(-1)
        if flat.numel():
            flat[:: max(1, 4096 // tensor.element_size())].float().sum()


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(run: Callable[[], Any], prepare: Callable[[], None] | None = None) -> tuple[float, float]:
    """Seconds and peak RSS increase (MiB) of ``run``, with freed memory returned first."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if prepare:
        prepare()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    del result
    return seconds, (peak - before) / 1024


def _worker(size: str, folder: Path) -> None:
    """One repeat: build the state, run every measurement, print one JSON line per measurement."""
    import torch

    from detector.atomic import fsync_file
    from detector.checkpoint.format import load_state, save_state, snapshot_state, verify_state

    state = build_state(size)
    nbytes = _tensor_bytes(state)
    ours, theirs, disk = folder / "ours.safetensors", folder / "torch.ckpt", folder / "dd.bin"
    ours_sha = folder / "ours_sha256.safetensors"
    count = math.ceil(nbytes / (16 << 20))
    dd = ["dd", "if=/dev/zero", f"of={disk}", "bs=16M", f"count={count}", "conv=fsync", "status=none"]

    def torch_save() -> None:
        torch.save(state, theirs)
        fsync_file(theirs)  # ours fsyncs; compare like with like

    def load_touched(loader: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: _touch(loader())

    ours_load = load_touched(lambda: load_state(ours))
    ours_mmap = load_touched(lambda: load_state(ours, mmap=True))
    torch_load = load_touched(lambda: torch.load(theirs, map_location="cpu", weights_only=True))
    runs: dict[str, tuple[Callable[[], Any], Callable[[], None] | None]] = {
        "dd": (lambda: subprocess.run(dd, check=True), None),
        "ours_save": (lambda: save_state(state, ours), None),
        "ours_save_sha256": (lambda: save_state(state, ours_sha, checksum="sha256-tree"), None),
        "torch_save": (torch_save, None),
        "ours_load_warm": (ours_load, None),
        "torch_load_warm": (torch_load, None),
        "ours_load_sha256_warm": (load_touched(lambda: load_state(ours_sha)), None),
        "ours_load_cold": (ours_load, lambda: _drop_cache(ours)),
        "torch_load_cold": (torch_load, lambda: _drop_cache(theirs)),
        "ours_load_mmap_warm": (ours_mmap, None),
        "ours_load_mmap_cold": (ours_mmap, lambda: _drop_cache(ours)),
        "ours_verify_warm": (lambda: verify_state(ours), None),
        "snapshot": (lambda: snapshot_state(state), None),
    }
    for op in OPS:
        run, prepare = runs[op]
        seconds, peak_mib = _measure(run, prepare)
        print(json.dumps({"size": size, "op": op, "seconds": seconds, "peak_mib": peak_mib, "bytes": nbytes}))
        sys.stdout.flush()


def _run_repeats(size: str, repeats: int, folder: Path) -> list[dict[str, Any]]:
    rows = []
    for repeat in range(repeats):
        command = [sys.executable, __file__, "--worker", size, "--dir", str(folder)]
        python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        print(f"  {size}: repeat {repeat + 1}/{repeats} done", file=sys.stderr)
    return rows


def _summaries(rows: list[dict[str, Any]], size: str) -> dict[str, dict[str, float]]:
    """Per operation: median, min and max seconds, and median peak RSS increase."""
    summary = {}
    for op in OPS:
        seconds = [row["seconds"] for row in rows if row["size"] == size and row["op"] == op]
        peaks = [row["peak_mib"] for row in rows if row["size"] == size and row["op"] == op]
        summary[op] = {
            "seconds": statistics.median(seconds),
            "min": min(seconds),
            "max": max(seconds),
            "peak_mib": statistics.median(peaks),
        }
    return summary


def _report(rows: list[dict[str, Any]], repeats: int) -> str:
    lines = [
        f"medians of {repeats} repeats; peak RSS = increase during the operation (mapped file pages count)"
    ]
    for size in dict.fromkeys(row["size"] for row in rows):
        nbytes = next(row["bytes"] for row in rows if row["size"] == size)
        summary = _summaries(rows, size)
        lines.append(f"\n{size}: {nbytes / 1e9:.3f} GB of tensors")
        lines.append(
            f"{'operation':<22}{'seconds':>9}{'min-max':>14}{'GB/s':>7}{'peak RSS MiB':>14}{'x data':>8}"
        )
        for op, row in summary.items():
            spread = f"{row['min']:.2f}-{row['max']:.2f}"
            ratio = row["peak_mib"] * (1 << 20) / nbytes
            rate = nbytes / row["seconds"] / 1e9
            lines.append(
                f"{op:<22}{row['seconds']:>9.3f}{spread:>14}{rate:>7.2f}{row['peak_mib']:>14.1f}{ratio:>8.2f}"
            )
        lines += _ratios({op: row["seconds"] for op, row in summary.items()})
    return "\n".join(lines)


def _ratios(s: dict[str, float]) -> list[str]:
    return [
        f"save: (torch.save+fsync) / ours = {s['torch_save'] / s['ours_save']:.2f}x (>1: ours faster)",
        f"save: ours / dd = {s['ours_save'] / s['dd']:.2f}x (1: at disk speed)",
        f"load warm: torch.load / ours = {s['torch_load_warm'] / s['ours_load_warm']:.2f}x (>1: faster)",
        f"load cold: torch.load / ours = {s['torch_load_cold'] / s['ours_load_cold']:.2f}x",
        f"load mmap: torch.load / ours = {s['torch_load_warm'] / s['ours_load_mmap_warm']:.2f}x warm, "
        f"{s['torch_load_cold'] / s['ours_load_mmap_cold']:.2f}x cold",
        f"loop blocked by a save: sync {s['ours_save']:.3f} s, async (snapshot) {s['snapshot']:.3f} s",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,base", help="comma-separated: small, base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small state only")
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder for the files (default: a temp folder)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.dir)
        return 0
    sizes = ["small"] if args.quick else args.sizes.split(",")
    if unknown := set(sizes) - {"small", "base"}:
        raise ValueError(f"unknown sizes {sorted(unknown)}; choose from small, base")
    folder = Path(tempfile.mkdtemp(prefix="bench_checkpoint_io_", dir=args.dir))
    try:
        rows = [row for size in sizes for row in _run_repeats(size, args.repeats, folder)]
    finally:
        shutil.rmtree(folder)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(_report(rows, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
