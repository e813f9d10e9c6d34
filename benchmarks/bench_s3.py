"""Save/load of a training state on a local S3 server (moto) vs local disk vs Lightning's path to the URL.

Usage:
    PYTHONPATH=. python benchmarks/bench_s3.py                      # small state, 3 repeats
    PYTHONPATH=. python benchmarks/bench_s3.py --size base --repeats 5
    PYTHONPATH=. python benchmarks/bench_s3.py --endpoint http://127.0.0.1:9000   # an S3 server already up

Rows (medians over the repeats, the same state each time, built as ``bench_checkpoint_io.build_state``):

- ``disk``: :func:`detector.checkpoint.format.save_state` / ``load_state`` in a temp folder.
- ``s3 ours``: :func:`detector.checkpoint.objects.save_state_to_url` (multipart upload streamed from the
  tensors) / :func:`detector.checkpoint.reader.load_checkpoint_state` on the URL (download to a temp
  file, checksum verified; the download cache is cleared before each load).
- ``s3 lightning``: what Lightning's ``ModelCheckpoint`` runs for an ``s3://`` dirpath
  (``TorchCheckpointIO.save_checkpoint`` -> ``lightning.fabric.utilities.cloud_io._atomic_save``:
  ``torch.save`` into an in-memory buffer, then one fsspec write) and what ``fit(ckpt_path=URL)`` loads
  with (``cloud_io._load``: ``torch.load`` over an fsspec file).

Without ``--endpoint`` a moto server is started on a free port of 127.0.0.1 and stopped at the end. The
server runs on the same machine, so "network" time is moto's CPU and loopback: compare ratios.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec.config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the moto server did not start")


FAILURES: dict[str, str] = {}  # op -> the last error it raised (a failed op counts as NaN)


def timed(run: Callable[[], Any], op: str = "") -> float:
    start = time.perf_counter()
    try:
        run()
    except Exception as error:  # a server or client failure is a result too: reported, not fatal
        FAILURES[op] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(f"{op}: failed: {FAILURES[op]}", flush=True)
        return math.nan
    return time.perf_counter() - start


def measure(state: Any, bucket: str, folder: Path) -> dict[str, float]:
    from lightning.fabric.utilities.cloud_io import _atomic_save, _load

    from detector.checkpoint import objects
    from detector.checkpoint.format import load_state, save_state
    from detector.checkpoint.reader import load_checkpoint_state

    ours_url, lightning_url = f"{bucket}/ours/state.safetensors", f"{bucket}/lightning/state.ckpt"
    disk = folder / "state.safetensors"

    def load_ours() -> Any:
        objects._copies.clear()  # a fresh download each time, as in a new process
        return load_checkpoint_state(ours_url)

    ops: dict[str, Callable[[], Any]] = {
        "disk save": lambda: save_state(state, disk),
        "disk load": lambda: load_state(disk),
        "s3 ours save": lambda: objects.save_state_to_url(state, ours_url),
        "s3 ours load": load_ours,
        "s3 lightning save": lambda: _atomic_save(state, lightning_url),
        "s3 lightning load": lambda: _load(lightning_url, map_location="cpu", weights_only=False),
    }
    row = {op: timed(run, op) for op, run in ops.items()}
    print(" ".join(f"{op}={seconds:.3f}" for op, seconds in row.items()), flush=True)
    return row


def report(rows: list[dict[str, float]], nbytes: int, size: str, repeats: int) -> str:
    def median_of(key: str) -> float:  # over the rounds where the op succeeded; NaN if it never did
        values = [row[key] for row in rows if not math.isnan(row[key])]
        return statistics.median(values) if values else math.nan

    median = {key: median_of(key) for key in rows[0]}
    lines = [
        f"state: {size}, {nbytes / 1e6:.1f} MB of tensors; medians of {repeats} repeats",
        "| op | save s | load s |",
        "|---|---|---|",
    ]
    for name in ("disk", "s3 ours", "s3 lightning"):
        lines.append(f"| {name} | {median[name + ' save']:.3f} | {median[name + ' load']:.3f} |")
    lines += ["", "| ratio | save | load |", "|---|---|---|"]
    for label, ours, other in (
        ("s3 ours / disk ours", "s3 ours", "disk"),
        ("s3 ours / s3 lightning", "s3 ours", "s3 lightning"),
    ):
        save = median[f"{ours} save"] / median[f"{other} save"]
        load = median[f"{ours} load"] / median[f"{other} load"]
        lines.append(f"| {label} | {save:.2f} | {load:.2f} |")
    lines += [f"{op} failed (last error): {error}" for op, error in sorted(FAILURES.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "base"], help="the state to time")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians over them")
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint already up (default: start moto)")
    args = parser.parse_args(argv)
    from bench_checkpoint_io import _tensor_bytes, build_state

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        server, endpoint = start_moto()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # moto's CompleteMultipartUpload of a GB-sized object takes tens of seconds (it joins the parts in
    # memory, moto/s3/models.py FakeMultipart.complete); past s3fs's default read_timeout (15 s)
    # botocore re-sends it while the first still runs, the first to finish disposes of the parts and
    # the others answer 500. One complete at a time: every S3FileSystem this process makes (ours and
    # Lightning's fsspec.open alike) waits up to 10 minutes for an answer.
    fsspec.config.conf.setdefault("s3", {}).setdefault("config_kwargs", {})["read_timeout"] = 600
    try:
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem().mkdir(bucket)
        state = build_state(args.size)
        with tempfile.TemporaryDirectory() as folder:
            rows = [measure(state, f"s3://{bucket}", Path(folder)) for _ in range(args.repeats)]
        print(report(rows, _tensor_bytes(state), args.size, args.repeats))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
