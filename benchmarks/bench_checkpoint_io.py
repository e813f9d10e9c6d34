"""Save/load speed and memory of the safetensors state format vs torch.save/torch.load and the disk (dd).

Usage:
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py            # small + base, 3 repeats
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py --quick    # small only
    PYTHONPATH=. python benchmarks/bench_checkpoint_io.py --sizes base --repeats 5 --dir /mnt/fast

States: ``small`` is ``build_classifier(None, 8000)``; ``base`` a DeBERTa-v3-base-shaped classifier
(hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 128100: 184M parameters). Each holds the
weights plus AdamW's ``exp_avg``/``exp_avg_sq``/``step`` and a scheduler, in the shape of a Lightning
checkpoint (3 x fp32 weights: about 2.2 GB for ``base``).

``ours`` uses the default ``xxh3-tree`` checksum; ``_mmap`` rows load with ``mmap=True`` (tensors
over a private mapping of the file). Each repeat runs in a fresh worker process that builds the state
once, then runs every measurement. Before each one the worker returns freed heap to the OS
(``malloc_trim``) and resets its peak RSS (``/proc/self/clear_refs``), so "peak RSS" is the increase
during that operation alone. Loads are timed warm (the file just written, in the page cache) and cold
(its pages dropped with ``posix_fadvise(DONTNEED)``). After every load, ours and the peers', one
element per 4 KiB page of every tensor is read, so each mapped page is faulted in and resident:
``torch.load(mmap=True)`` alone only maps the file, and ours reads every byte anyway to verify it.
Like for like, both end with every page of the file in memory; ours has also hashed every byte.
``snapshot_*`` is what an asynchronous save blocks the training loop for at the save:
``snapshot_deferred`` copies the small parts and leaves the weights and moments to a background copy
(in training the loop may also wait for that copy before its next optimizer step:
``bench_async_save.py`` measures both), ``snapshot_staged`` copies everything at once into reused
buffers, ``snapshot_fresh`` into new memory; a synchronous save blocks it for ``ours_save_replace``.
Medians over the repeats. Disks on shared machines are noisy: compare ratios from one run, not
absolute times across runs.
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
SAVES = [
    "dd",
    "ours_save_fresh",
    "ours_save_replace",
    "torch_save",
    "safetensors_save",
    "lightning_save",
    "baseline_save_replace",
]
LOADS = [
    "page_cache_read",
    "ours_load_warm",
    "torch_load_warm",
    "safetensors_load_warm",
    "baseline_load_warm",
    "ours_load_cold",
    "torch_load_cold",
    "safetensors_load_cold",
    "baseline_load_cold",
    "ours_mmap_warm",
    "torch_mmap_warm",
    "ours_mmap_cold",
    "torch_mmap_cold",
    "ours_verify_warm",
    "snapshot_fresh",
    "snapshot_staged",
    "snapshot_deferred",
]
OPS = SAVES + LOADS


def build_model(size: str) -> Any:
    """The classifier of ``size``: ``small`` (the project's default) or ``base`` (DeBERTa-v3-base's shape)."""
    from detector.backbone import architecture_config, build_classifier

    if size == "small":
        return build_classifier(None, 8000)
    from transformers import DebertaV2ForSequenceClassification

    overrides = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    config = architecture_config(128100, intermediate_size=3072, position_buckets=256, **overrides)
    return DebertaV2ForSequenceClassification(config)


def build_state(size: str) -> dict[str, Any]:
    """A Lightning-checkpoint-shaped training state: weights, AdamW state, scheduler, loop counters."""
    import torch

    model = build_model(size)
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
    """Read one element per 4 KiB page of every tensor (each page it spans), so mapped data is loaded."""
    from detector.checkpoint.format import flatten_state

    tensors, _ = flatten_state(state)
    for tensor in tensors.values():
        flat = tensor.reshape(-1)
        if flat.numel():  # the last element too: a tensor that starts mid-page ends on one more page
            flat[:: max(1, 4096 // tensor.element_size())].float().sum() + flat[-1:].float().sum()


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


def _worker(size: str, folder: Path, baseline: bool, ops: list[str]) -> None:
    """One round: build the state, run every measurement, print one JSON line per measurement."""
    import torch
    from lightning.fabric.utilities.cloud_io import _atomic_save
    from safetensors.torch import load_file, save_file

    from detector.atomic import fsync_file
    from detector.checkpoint.format import flatten_state, load_state, save_state, snapshot_state, verify_state
    from detector.checkpoint.reclaim import wait_reclaimed
    from detector.checkpoint.staging import StagingBuffers, storages

    state = build_state(size)
    nbytes = _tensor_bytes(state)
    ours, fresh, theirs = folder / "ours.safetensors", folder / "fresh.safetensors", folder / "torch.ckpt"
    flat, disk, light = folder / "flat.safetensors", folder / "dd.bin", folder / "lightning.ckpt"
    old = folder / "baseline.safetensors"
    count = math.ceil(nbytes / (16 << 20))
    dd = ["dd", "if=/dev/zero", f"of={disk}", "bs=16M", f"count={count}", "conv=fsync", "status=none"]
    read = ["dd", f"if={ours}", "of=/dev/null", "bs=16M", "status=none"]
    tensors = {k: v for k, v in flatten_state(state)[0].items() if isinstance(v, torch.Tensor)}
    staging = StagingBuffers()
    staging.snapshot(state)  # the first snapshot allocates; a training run's later ones reuse
    # What an async save defers to its background copy: the weights and the optimizer's moments.
    moments = [t for s in state["optimizer_states"][0]["state"].values() for t in s.values()]
    steps_change = storages([*state["state_dict"].values(), *moments])
    old_format: Any = None
    if baseline:
        import detector_baseline.checkpoint.format as old_format  # type: ignore[import-not-found,no-redef]

    def with_fsync(save: Callable[[Path], None], path: Path) -> Callable[[], None]:
        return lambda: (save(path), fsync_file(path))  # ours fsyncs; compare like with like

    def unlink(*paths: Path) -> Callable[[], None]:
        return lambda: [path.unlink(missing_ok=True) for path in paths] and wait_reclaimed()

    def touched(loader: Callable[[], Any], path: Path, cold: bool) -> tuple[Callable[[], Any], Any]:
        return (lambda: _touch(loader())), ((lambda: _drop_cache(path)) if cold else None)

    runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
        "dd": (lambda: subprocess.run(dd, check=True), unlink(disk)),
        "ours_save_fresh": (lambda: save_state(state, fresh), unlink(fresh)),
        "ours_save_replace": (lambda: save_state(state, ours), wait_reclaimed),
        "torch_save": (with_fsync(lambda p: torch.save(state, p), theirs), None),
        "safetensors_save": (with_fsync(lambda p: save_file(tensors, p), flat), None),
        "lightning_save": (with_fsync(lambda p: _atomic_save(state, p), light), None),
        "page_cache_read": (lambda: subprocess.run(read, check=True), None),
        "ours_verify_warm": (lambda: verify_state(ours), None),
        "snapshot_fresh": (lambda: snapshot_state(state), None),
        "snapshot_staged": (lambda: staging.snapshot(state), None),
        "snapshot_deferred": (lambda: staging.snapshot(state, defer=steps_change), None),
    }
    for cold in (False, True):
        when = "cold" if cold else "warm"
        runs[f"ours_load_{when}"] = touched(lambda: load_state(ours), ours, cold)
        runs[f"torch_load_{when}"] = touched(lambda: torch.load(theirs, weights_only=True), theirs, cold)
        runs[f"safetensors_load_{when}"] = touched(lambda: load_file(flat), flat, cold)
        runs[f"ours_mmap_{when}"] = touched(lambda: load_state(ours, mmap=True), ours, cold)
        runs[f"torch_mmap_{when}"] = touched(
            lambda: torch.load(theirs, weights_only=True, mmap=True), theirs, cold
        )
        if baseline:
            runs[f"baseline_load_{when}"] = touched(lambda: old_format.load_state(old), old, cold)
    if baseline:
        runs["baseline_save_replace"] = (lambda: old_format.save_state(state, old), None)
    save_state(state, ours)  # so the first "replace" replaces
    for op in ops:
        if op not in runs:
            continue
        run, prepare = runs[op]
        seconds, peak_mib = _measure(run, prepare)
        print(json.dumps({"size": size, "op": op, "seconds": seconds, "peak_mib": peak_mib, "bytes": nbytes}))
        sys.stdout.flush()
    _profile(state, ours, size)


def _profile(state: Any, path: Path, size: str) -> None:
    """Thread seconds spent in each part of one replacing save and one default load (summed over threads)."""
    import detector.atomic as atomic
    import detector.checkpoint.format as fmt
    import detector.checkpoint.pieces as pieces
    from detector.checkpoint.reclaim import wait_reclaimed

    spent: dict[str, list[float]] = {}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent.setdefault(name, []).append(time.perf_counter() - start)

        return wrapper

    saved = (fmt.write_at, fmt.read_at, dict(pieces.PIECE_DIGESTS), atomic.fsync_file, os.replace)
    fmt.write_at, fmt.read_at = timed("write", fmt.write_at), timed("read", fmt.read_at)
    for kind, digest in saved[2].items():
        pieces.PIECE_DIGESTS[kind] = timed("digest", digest)
    atomic.fsync_file, atomic.os.replace = timed("fsync", atomic.fsync_file), timed("rename", os.replace)
    try:
        for op, run in (
            ("save", lambda: fmt.save_state(state, path)),
            ("load", lambda: fmt.load_state(path)),
        ):
            spent.clear()
            wait_reclaimed()
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
            parts = {name: sum(times) for name, times in spent.items()}
            print(json.dumps({"size": size, "profile": op, "wall": wall, **parts}))
    finally:
        fmt.write_at, fmt.read_at, atomic.fsync_file, atomic.os.replace = (
            saved[0],
            saved[1],
            saved[3],
            saved[4],
        )
        pieces.PIECE_DIGESTS.update(saved[2])


def _baseline_package(revision: str, folder: Path) -> Path:
    """``detector/`` at ``revision`` copied into ``folder`` as the package ``detector_baseline``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "detector"], check=True, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    package = folder / "detector_baseline"
    (folder / "detector").rename(package)
    for source in package.rglob("*.py"):
        text = source.read_text()
        text = text.replace("from detector.", "from detector_baseline.").replace(
            "import detector.", "import detector_baseline."
        )
        source.write_text(text.replace("from detector import", "from detector_baseline import"))
    return folder


def _run_repeats(
    size: str, repeats: int, folder: Path, baseline: Path | None, ops: str, log: Path | None
) -> list[dict[str, Any]]:
    rows = []
    for repeat in range(repeats):
        command = [sys.executable, __file__, "--worker", size, "--dir", str(folder), "--ops", ops]
        command += ["--with-baseline"] if baseline else []
        paths = [str(ROOT), str(baseline or ""), os.environ.get("PYTHONPATH")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows += [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        if log:  # every finished round is kept, so a long run stopped early still reports
            with log.open("a") as stream:
                stream.writelines(line + "\n" for line in output.splitlines() if line.startswith("{"))
        print(f"  {size}: round {repeat + 1}/{repeats} done", file=sys.stderr)
    return rows


def _summaries(rows: list[dict[str, Any]], size: str) -> dict[str, dict[str, float]]:
    """Per operation: median, min and max seconds, and median peak RSS increase."""
    summary = {}
    for op in OPS:
        seconds = [row["seconds"] for row in rows if row["size"] == size and row.get("op") == op]
        peaks = [row["peak_mib"] for row in rows if row["size"] == size and row.get("op") == op]
        if seconds:
            summary[op] = {
                "seconds": statistics.median(seconds),
                "min": min(seconds),
                "max": max(seconds),
                "peak_mib": statistics.median(peaks),
            }
    return summary


def _report(rows: list[dict[str, Any]], repeats: int) -> str:
    lines = [
        f"medians of {repeats} rounds; peak RSS = increase during the operation (mapped file pages count)"
    ]
    for size in dict.fromkeys(row["size"] for row in rows):
        nbytes = next(row["bytes"] for row in rows if row["size"] == size and "bytes" in row)
        summary = _summaries(rows, size)
        lines.append(f"\n{size}: {nbytes / 1e9:.3f} GB of tensors")
        lines.append(
            f"{'operation':<24}{'seconds':>9}{'min-max':>14}{'GB/s':>7}{'peak RSS MiB':>14}{'x data':>8}"
        )
        for op, row in summary.items():
            spread = f"{row['min']:.2f}-{row['max']:.2f}"
            ratio = row["peak_mib"] * (1 << 20) / nbytes
            rate = nbytes / row["seconds"] / 1e9
            lines.append(
                f"{op:<24}{row['seconds']:>9.3f}{spread:>14}{rate:>7.2f}{row['peak_mib']:>14.1f}{ratio:>8.2f}"
            )
        lines += _ratios({op: row["seconds"] for op, row in summary.items()}, summary, nbytes)
        lines += _profiles(rows, size)
    return "\n".join(lines)


def _ratios(s: dict[str, float], summary: dict[str, dict[str, float]], nbytes: int) -> list[str]:
    """The issue's table: ours against each peer, as a ratio of medians (< 1: ours takes less time)."""
    pairs = [
        ("save, replacing latest", "ours_save_replace", "torch_save", "torch.save + fsync", 1.0),
        ("save, replacing latest", "ours_save_replace", "dd", "dd + fsync", 1.3),
        ("save, replacing latest", "ours_save_replace", "ours_save_fresh", "ours, fresh name", 1.0),
        ("save, replacing latest", "ours_save_replace", "safetensors_save", "save_file + fsync", None),
        ("save, replacing latest", "ours_save_replace", "lightning_save", "Lightning _atomic_save", None),
        ("save, replacing latest", "ours_save_replace", "baseline_save_replace", "baseline (before)", None),
        ("load warm, default", "ours_load_warm", "torch_load_warm", "torch.load", 1.0),
        ("load warm, default", "ours_load_warm", "safetensors_load_warm", "load_file (no checksum)", None),
        ("load warm, default", "ours_load_warm", "baseline_load_warm", "baseline (before)", None),
        ("load cold, default", "ours_load_cold", "torch_load_cold", "torch.load", 1.0),
        ("load cold, default", "ours_load_cold", "safetensors_load_cold", "load_file (no checksum)", None),
        ("load cold, default", "ours_load_cold", "baseline_load_cold", "baseline (before)", None),
        ("load warm, mmap=True", "ours_mmap_warm", "torch_mmap_warm", "torch.load(mmap=True)", 1.5),
        ("load cold, mmap=True", "ours_mmap_cold", "torch_mmap_cold", "torch.load(mmap=True)", None),
        ("async save: loop blocked", "snapshot_deferred", "ours_save_replace", "a sync save", 0.15),
        ("async, full copy at once", "snapshot_staged", "ours_save_replace", "a sync save", None),
        ("async, first save", "snapshot_fresh", "ours_save_replace", "a sync save", None),
    ]
    lines = ["", f"{'operation':<26}{'ours s':>8}  {'peer':<26}{'peer s':>8}{'ours/peer':>10}  target"]
    for label, ours, peer, peer_label, target in pairs:
        if ours not in s or peer not in s:
            continue
        ratio = s[ours] / s[peer]
        verdict = "" if target is None else f"<= {target}: {'holds' if ratio <= target else 'MISSED'}"
        lines.append(f"{label:<26}{s[ours]:>8.3f}  {peer_label:<26}{s[peer]:>8.3f}{ratio:>10.2f}  {verdict}")
    for op in ("ours_save_replace", "lightning_save", "torch_save"):
        if op in summary:
            share = summary[op]["peak_mib"] * (1 << 20) / nbytes
            lines.append(
                f"extra RAM during {op}: {summary[op]['peak_mib']:.1f} MiB = {share:.2%} of the state"
            )
    return lines


def _profiles(rows: list[dict[str, Any]], size: str) -> list[str]:
    """Median thread seconds per part of one save and one load."""
    lines = []
    for op in ("save", "load"):
        profiles = [row for row in rows if row["size"] == size and row.get("profile") == op]
        if not profiles:
            continue
        parts = sorted({key for row in profiles for key in row} - {"size", "profile"})
        cells = ", ".join(f"{p} {statistics.median(row.get(p, 0.0) for row in profiles):.2f}" for p in parts)
        lines.append(f"where one {op} spends its time (wall s in each call, summed over threads): {cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,base", help="comma-separated: small, base")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (fresh processes), medians over them")
    parser.add_argument("--quick", action="store_true", help="small state only")
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder for the files (default: a temp folder)"
    )
    parser.add_argument("--baseline", default=None, help="a git revision whose format to time alongside")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of: {', '.join(OPS)}")
    parser.add_argument("--json", type=Path, default=None, help="append every measurement here (JSON lines)")
    parser.add_argument("--report", type=Path, default=None, help="only print the report of a --json file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--with-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.dir, args.with_baseline, args.ops.split(","))
        return 0
    if args.report:
        rows = [json.loads(line) for line in args.report.read_text().splitlines()]
        rounds = max(
            sum(row.get("op") == "ours_save_replace" for row in rows if row["size"] == size)
            for size in {row["size"] for row in rows}
        )
        print(_report(rows, rounds))
        return 0
    sizes = ["small"] if args.quick else args.sizes.split(",")
    if unknown := set(sizes) - {"small", "base"}:
        raise ValueError(f"unknown sizes {sorted(unknown)}; choose from small, base")
    if unknown := set(args.ops.split(",")) - set(OPS):
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    folder = Path(tempfile.mkdtemp(prefix="bench_checkpoint_io_", dir=args.dir))
    try:
        (folder / "src").mkdir()
        baseline = _baseline_package(args.baseline, folder / "src") if args.baseline else None
        rows = [
            row
            for size in sizes
            for row in _run_repeats(size, args.repeats, folder, baseline, args.ops, args.json)
        ]
    finally:
        shutil.rmtree(folder)
    print(_report(rows, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
