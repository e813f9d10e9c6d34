"""The corrupt-file matrix: each ``python -m detector`` tool on corrupt and hostile checkpoints and bundles.

Builds a tiny run (one checkpoint, one bundle), derives variants from them (flipped bytes,
truncations, hostile headers, pickles with a payload, folders and FIFOs under a file's name, tampered
bundle files, NaN weights), runs each tool on each variant in-process through
``detector.__main__.main`` and sorts the outcome:

- ``clear``: non-zero exit, no traceback, the error line names the file;
- ``clear_after_traceback``: an exception escaped (a traceback), but its message names the file;
- ``unclear``: anything else that refused (no file named; a hang, cut after ``MATRIX_HANG_SECONDS``);
- ``accepted``: exit 0 on a corrupt or hostile file;
- ``code_run``: a pickle payload ran (its marker file appeared).

Each tool runs in its own process, so the same script measures another checkout's code:
``PYTHONPATH=/path/to/old/checkout python benchmarks/corrupt_matrix.py --workdir /tmp/matrix``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'
OUTCOMES = ("clear", "clear_after_traceback", "unclear", "accepted", "code_run")
CHECKPOINT_TOOLS = ("verify", "show", "list", "convert", "export", "fit_ckpt_path", "evaluate_checkpoint")
BUNDLE_TOOLS = ("score", "evaluate_bundle")
HANG_SECONDS = int(os.environ.get("MATRIX_HANG_SECONDS", "30"))


class Payload:
    """Touches a marker file when unpickled: proof that a pickle's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def fit_args(work: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "2",
        "--trainer.max_epochs", "1", "--model.arch", TINY, "--data.batch_size", "8",
        "--data.train_path", str(work / "train.jsonl"), "--data.val_path", str(work / "val.jsonl"),
        "--data.tokenizer_root", str(work / "tokenizer"), *extra,
    ]  # fmt: skip


def build_base(work: Path) -> None:
    """A two-step run and a bundle exported from its checkpoint (skipped when already there)."""
    if (work / "base" / "bundle").is_dir():
        return
    from detector.demo import demo_rows

    work.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate([("train", 48), ("val", 16)]):
        (work / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_rows(n, seed=i)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "detector", *fit_args(work)], cwd=work, check=True, env=env)
    base = work / "base"
    base.mkdir()
    shutil.copy(work / "outputs/checkpoints/checkpoint_latest.safetensors", base / "checkpoint.safetensors")
    subprocess.run(
        [sys.executable, "-m", "detector", "export", str(base / "checkpoint.safetensors"),
         "--out", str(base), "--name", "bundle"],
        cwd=work, check=True, env=env,
    )  # fmt: skip


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _replace_after(data: bytes, key: bytes, old: bytes, new: bytes) -> bytes:
    at = data.index(old, data.index(key))
    return data[:at] + new + data[at + len(old) :]


def _with_header(data: bytes, edit) -> bytes:
    """``data`` with its header JSON re-encoded after ``edit(header)``, checksum left as it was."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + size :]


def checkpoint_variants(work: Path) -> dict[str, Path]:
    """Corrupt and hostile files, each under ``variants/checkpoints/<name>/checkpoint_x.safetensors``."""
    import torch
    from safetensors.torch import save_file

    data = (work / "base/checkpoint.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    end = 8 + size
    marker = str(work / "pwned")
    blobs: dict[str, bytes] = {
        "flip_length_prefix": _flip(data, 2),
        "flip_header_hidden_size": _replace_after(data, b"hidden_size", b"32", b"33"),
        "flip_header_learning_rate_key": _replace_after(data, b"learning_rate", b"learning", b"le`rning"),
        "flip_header_global_step": _replace_after(data, b"global_step", b":2", b":3"),
        "flip_header_pretrained": _replace_after(data, b"pretrained", b"null", b"nul "),
        "flip_checksum_digit": _replace_after(data, b'"checksum', b"crc", b"crd")
        if b"crc" in data[:end]
        else _flip(data, data.index(b'"checksum') + 20),
        "flip_data_first": _flip(data, end),
        "flip_data_middle": _flip(data, (end + len(data)) // 2),
        "flip_data_last": _flip(data, len(data) - 1),
        "truncated_empty": b"",
        "truncated_4_bytes": data[:4],
        "truncated_prefix_only": data[:8],
        "truncated_mid_header": data[: 8 + size // 2],
        "truncated_header_only": data[:end],
        "truncated_last_byte": data[:-1],
        "trailing_byte": data + b"\0",
        "header_length_huge": struct.pack("<Q", 2**63) + data[8:],
        "header_length_file_size": struct.pack("<Q", len(data)) + data[8:],
        "header_not_utf8": data[:8] + b"\xff\xfe" + data[10:],
        "header_deep_nesting": (lambda raw: struct.pack("<Q", len(raw)) + raw)(
            b'{"__metadata__":' + b"[" * 60_000 + b"]" * 60_000 + b"}"
        ),
        "header_no_format": _with_header(data, lambda h: h["__metadata__"].pop("format")),
        "header_format_version_9": _with_header(data, lambda h: h["__metadata__"].update(format_version="9")),
        "header_negative_shape": _with_header(data, lambda h: _first_tensor(h).update(shape=[-1])),
        "header_offsets_overlap": _with_header(data, lambda h: _first_tensor(h).update(data_offsets=[0, 0])),
        "header_skeleton_deep": _with_header(
            data, lambda h: h["__metadata__"].update(skeleton="[" * 5000 + "]" * 5000)
        ),
        "zip_garbage": b"PK\x03\x04" + os.urandom(200),
        "pickle_payload_raw": pickle.dumps({"state_dict": {}, "x": Payload(marker)}, protocol=2),
    }
    buffer = io.BytesIO()
    torch.save({"state_dict": {}, "x": Payload(marker)}, buffer)
    blobs["pickle_payload_torch_save"] = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    blobs["pickle_weights_only_no_state_dict"] = buffer.getvalue()
    variants = {}
    for name, blob in blobs.items():
        path = _variant_path(work, name)
        path.write_bytes(blob)
        variants[name] = path
    foreign = _variant_path(work, "foreign_safetensors")
    save_file({"w": torch.ones(2)}, foreign)
    variants["foreign_safetensors"] = foreign
    folder = _variant_path(work, "folder_named_safetensors")
    folder.mkdir()
    variants["folder_named_safetensors"] = folder
    fifo = _variant_path(work, "fifo_named_safetensors")
    os.mkfifo(fifo)
    variants["fifo_named_safetensors"] = fifo
    return variants


def _first_tensor(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _variant_path(work: Path, name: str) -> Path:
    folder = work / "variants" / "checkpoints" / name
    folder.mkdir(parents=True)
    return folder / "checkpoint_x.safetensors"


def bundle_variants(work: Path) -> dict[str, Path]:
    """Tampered copies of the base bundle, each under ``variants/bundles/<name>/bundle``."""
    import torch
    from safetensors.torch import load_file, save_file

    def config_edit(**changes):
        def edit(bundle: Path) -> None:
            config = json.loads((bundle / "config.json").read_text())
            (bundle / "config.json").write_text(json.dumps({**config, **changes}, indent=2))

        return edit

    def weights_edit(value: float):
        def edit(bundle: Path) -> None:
            weights = load_file(bundle / "model.safetensors")
            weights["classifier.weight"][0, 0] = value
            save_file(weights, bundle / "model.safetensors", metadata={"format": "pt"})

        return edit

    def bytes_edit(name: str, change):
        def edit(bundle: Path) -> None:
            path = bundle / name
            data = path.read_bytes()
            path.unlink()
            change(path, data)

        return edit

    def metadata_edit(bundle: Path) -> None:
        meta = json.loads((bundle / "training_metadata.json").read_text())
        meta["decision_threshold"] = 0.999
        (bundle / "training_metadata.json").write_text(json.dumps(meta, indent=2))

    def pickle_weights(bundle: Path) -> None:
        torch.save({"x": Payload(str(work / "pwned"))}, bundle / "model.safetensors")

    def deep_weights(bundle: Path) -> None:
        raw = b'{"__metadata__":' + b"[" * 60_000 + b"]" * 60_000 + b"}"
        (bundle / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)

    def tokenizer_edit(bundle: Path) -> None:
        text = (bundle / "tokenizer.json").read_text()
        (bundle / "tokenizer.json").write_text(text.replace('"[UNK]"', '"[UNKNOWN]"', 1))

    edits = {
        "nan_classifier_weight": weights_edit(float("nan")),
        "inf_classifier_weight": weights_edit(float("inf")),
        "config_hidden_act": config_edit(hidden_act="relu"),
        "config_layer_norm_eps": config_edit(layer_norm_eps=0.5),
        "config_num_hidden_layers": config_edit(num_hidden_layers=1),
        "config_id2label_swapped": config_edit(id2label={"0": "machine", "1": "human"}),
        "config_truncated": bytes_edit("config.json", lambda p, d: p.write_bytes(d[: len(d) // 2])),
        "weights_flip_data_byte": bytes_edit(
            "model.safetensors", lambda p, d: p.write_bytes(_flip(d, len(d) - 5))
        ),
        "weights_flip_header_byte": bytes_edit("model.safetensors", lambda p, d: p.write_bytes(_flip(d, 20))),
        "weights_truncated": bytes_edit("model.safetensors", lambda p, d: p.write_bytes(d[:-100])),
        "weights_deep_header": deep_weights,
        "weights_missing": lambda b: (b / "model.safetensors").unlink(),
        "weights_folder": bytes_edit("model.safetensors", lambda p, d: p.mkdir()),
        "weights_fifo": bytes_edit("model.safetensors", lambda p, d: os.mkfifo(p)),
        "weights_pickle_payload": pickle_weights,
        "tokenizer_piece_edited": tokenizer_edit,
        "tokenizer_missing": lambda b: (b / "tokenizer.json").unlink(),
        "metadata_threshold_edited": metadata_edit,
        "metadata_broken_json": bytes_edit("training_metadata.json", lambda p, d: p.write_bytes(d[:-10])),
    }
    variants = {}
    for name, edit in edits.items():
        bundle = work / "variants" / "bundles" / name / "bundle"
        shutil.copytree(work / "base" / "bundle", bundle)
        edit(bundle)
        variants[name] = bundle
    return variants


def tool_argv(tool: str, variant: Path, work: Path, scratch: Path) -> list[str]:
    val = str(work / "val.jsonl")
    return {
        "verify": ["checkpoints", "verify", str(variant)],
        "show": ["checkpoints", "show", str(variant)],
        "list": ["checkpoints", "list", str(variant.parent)],
        "convert": ["checkpoints", "convert", str(variant), str(scratch / "converted.safetensors")],
        "export": ["export", str(variant), "--out", str(scratch / "bundles")],
        "fit_ckpt_path": fit_args(
            work, "--ckpt_path", str(variant), "--trainer.default_root_dir", str(scratch)
        ),
        "evaluate_checkpoint": ["evaluate", "--data", val, "--checkpoint", str(variant), "--out",
                                str(scratch / "report"), "--bootstrap", "0"],
        "score": ["score", str(variant), val, "-o", str(scratch / "scores.jsonl")],
        "evaluate_bundle": ["evaluate", "--data", val, "--bundle", str(variant), "--out",
                            str(scratch / "report"), "--bootstrap", "0"],
    }[tool]  # fmt: skip


class Hang(Exception):
    pass


def _alarm(*_: object) -> None:
    raise Hang(f"no answer within {HANG_SECONDS} s")


_RELEASE = """
import contextlib, os, sys, time
from pathlib import Path
variant, flag, delay = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
flag.touch()
for path in [variant, *(variant.rglob("*") if variant.is_dir() else [])]:
    if path.is_fifo():
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
"""


def _watchdog(variant: Path, flag: Path) -> subprocess.Popen:
    """A process that, after the time limit, flags a hang and opens every FIFO of the variant for
    writing: that wakes a reader blocked in a native open() that holds the GIL, where neither the
    alarm nor a thread can."""
    return subprocess.Popen([sys.executable, "-c", _RELEASE, str(variant), str(flag), str(HANG_SECONDS + 1)])


def run_one(tool: str, name: str, variant: Path, work: Path) -> str:
    """Run ``tool`` on ``variant`` in this process and sort the outcome."""
    from detector.__main__ import main

    marker = work / "pwned"
    marker.unlink(missing_ok=True)
    scratch = work / "scratch" / tool / name
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    err, out = io.StringIO(), io.StringIO()
    escaped: BaseException | None = None
    code: object = 0
    old_cwd = os.getcwd()
    os.chdir(scratch)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    hung = scratch / "HUNG"
    watchdog = _watchdog(variant, hung)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main(tool_argv(tool, variant, work, scratch))
    except SystemExit as exit_:
        code = exit_.code
    except Hang:
        return "unclear"
    except BaseException as error:
        escaped = error
    finally:
        signal.alarm(0)
        watchdog.kill()
        watchdog.wait()
        os.chdir(old_cwd)
    if marker.exists():
        return "code_run"
    if hung.exists():
        return "unclear"
    names = (str(variant), variant.name) if variant.is_dir() and tool in BUNDLE_TOOLS else (str(variant),)
    if escaped is not None:
        return "clear_after_traceback" if any(n in str(escaped) for n in names) else "unclear"
    if code in (0, None):
        if tool == "list" and "unreadable:" in out.getvalue():
            return "clear" if str(variant) in out.getvalue() else "unclear"
        return "accepted"
    text = err.getvalue() + out.getvalue()
    lines = [line for line in text.splitlines() if "error" in line.lower() or "FAILED" in line]
    if "Traceback" in text:
        return "clear_after_traceback" if any(n in text for n in names) else "unclear"
    return "clear" if lines and any(n in lines[-1] for n in names) else "unclear"


def run_tool(tool: str, work: Path) -> dict[str, str]:
    kind = "bundles" if tool in BUNDLE_TOOLS else "checkpoints"
    root = work / "variants" / kind
    results = {}
    for folder in sorted(root.iterdir()):
        variant = folder / ("bundle" if kind == "bundles" else "checkpoint_x.safetensors")
        results[folder.name] = run_one(tool, folder.name, variant, work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="built once, reused by later runs")
    parser.add_argument("--tool", help="(internal) run one tool in this process and print JSON")
    parser.add_argument("--json", type=Path, help="write the per-variant outcomes here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir.resolve()
    if args.tool:
        print(json.dumps(run_tool(args.tool, work)))
        return
    build_base(work)
    if not (work / "variants").is_dir():
        checkpoint_variants(work)
        bundle_variants(work)
    table = {}
    for tool in CHECKPOINT_TOOLS + BUNDLE_TOOLS:
        done = subprocess.run(
            [sys.executable, __file__, "--workdir", str(work), "--tool", tool],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        table[tool] = json.loads(done.stdout.strip().splitlines()[-1])
        counts = Counter(table[tool].values())
        print(f"{tool:20s} " + "  ".join(f"{o} {counts.get(o, 0)}" for o in OUTCOMES), flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
