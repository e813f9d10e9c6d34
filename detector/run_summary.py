"""The end-of-fit run summary, without a Trainer: disk use, the summary dict, its JSON file and table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from detector.atomic import write_text
from detector.checkpoint import objects
from detector.checkpoint.reader import disk_usage
from detector.checkpoint.topk import CheckpointTracker


def finite_or_none(value: float | None) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite (JSON has no NaN)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def checkpoint_section(
    tracker: CheckpointTracker, dirpath: str | Path, monitor: str, best_path: str
) -> dict[str, Any]:
    """What a checkpoint callback kept: best (score, epoch, step, path), top-K, periodic files, disk use.

    For an object-store ``dirpath`` the paths are URLs and ``disk_bytes`` the bytes of its state objects.
    """
    remote = objects.is_url(dirpath)
    root = str(dirpath).rstrip("/") if remote else str(Path(dirpath))

    def where(name: str) -> str:
        return objects.join(root, name) if remote else str(Path(root) / name)

    best = None
    if tracker.best is not None:
        best = {**tracker.best, "score": finite_or_none(tracker.best["score"]), "path": best_path}
    return {
        "dirpath": root,
        "monitor": monitor,
        "mode": tracker.top_k.mode,
        "best": best,
        "top_k": [{"path": where(r.name), "score": finite_or_none(r.score)} for r in tracker.top_k.kept],
        "epoch_files": [where(name) for name in tracker.epochs.kept],
        "step_files": [where(name) for name in tracker.steps.kept],
        "disk_bytes": objects.stored_bytes(root) if remote else disk_usage(root),
    }


def build_summary(
    *,
    global_step: int,
    epochs: int,
    wall_time_s: float,
    save_time_s: float | None,
    saves: int | None,
    checkpoints: Mapping[str, Any] | None,
    bundles: Sequence[str],
    stopped: str = "finished",
    val_weights: str | None = None,
    metrics_csv: str | None = None,
) -> dict[str, Any]:
    """The summary as plain JSON-able values.

    Args:
        global_step: optimizer steps taken (``trainer.global_step``).
        epochs: completed epochs (``trainer.current_epoch`` after fit).
        wall_time_s: seconds from the start of ``fit`` to its end, in this process.
        save_time_s: seconds the training loop was blocked by checkpoint saves, in this process.
        saves: checkpoint writes in this process.
        checkpoints: :func:`checkpoint_section`'s output, or None without a checkpoint callback.
        bundles: paths of the inference bundles the run wrote and keeps.
        stopped: why the run stopped: ``"finished"``, or the signal that interrupted it (``"SIGTERM"``).
        val_weights: the weights validation scored, so the ones ranked: ``ema`` or ``raw``.
        metrics_csv: the CSV logger's ``metrics.csv``.
    """
    return {
        "global_step": int(global_step),
        "epochs": int(epochs),
        "wall_time_s": round(float(wall_time_s), 3),
        "save_time_s": None if save_time_s is None else round(float(save_time_s), 3),
        "saves": saves,
        "checkpoints": None if checkpoints is None else dict(checkpoints),
        "bundles": list(bundles),
        "stopped": stopped,
        "val_weights": val_weights,
        "metrics_csv": metrics_csv,
    }


def write_summary(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``summary`` as JSON to ``path`` atomically (temp file, fsync, rename); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(summary, indent=2, allow_nan=False) + "\n")


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return f"{nbytes} B"


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The summary as (label, value) rows, the order the table shows them."""
    stopped = summary.get("stopped", "finished")
    rows = [] if stopped == "finished" else [("stopped by", f"{stopped}: resume with --ckpt_path last")]
    rows += [
        ("steps", str(summary["global_step"])),
        ("epochs", str(summary["epochs"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
    ]
    if summary["save_time_s"] is not None:
        rows.append(("time saving", f"{summary['save_time_s']:.1f} s in {summary['saves']} saves"))
    section = summary["checkpoints"]
    if section is not None:
        best = section["best"]
        name = f"best {section['monitor']}"
        rows.append((name, "none" if best is None else f"{_score(best['score'])} at step {best['step']}"))
        if best is not None:
            rows.append(("best checkpoint", best["path"]))
        rows += [
            (f"top-{i + 1}", f"{_score(r['score'])}  {r['path']}") for i, r in enumerate(section["top_k"])
        ]
        rows.append(("checkpoint disk", _size(section["disk_bytes"])))
    rows += [("bundle", path) for path in summary["bundles"]]
    if summary.get("val_weights") is not None:
        rows.append(("validated on", f"{summary['val_weights']} weights"))
    if summary.get("metrics_csv") is not None:
        rows.append(("metrics", summary["metrics_csv"]))
    return rows


def next_step(summary: Mapping[str, Any]) -> str | None:
    """One line saying what to run next: score with the final bundle, else export the best checkpoint."""
    if summary["bundles"]:
        return f"Next: python -m detector score {summary['bundles'][-1]} YOUR_TEXTS.jsonl -o scores.jsonl"
    best = (summary["checkpoints"] or {}).get("best")
    if best is not None:
        return f"Next: python -m detector export {best['path']} --version 1.0"
    return None


def summary_table(summary: Mapping[str, Any], title: str = "Run summary") -> Table:
    """A two-column Rich table of :func:`summary_rows`."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in summary_rows(summary):
        table.add_row(label, value)
    return table


def unique(paths: Iterable[str]) -> list[str]:
    """``paths`` without repeats, first occurrence kept."""
    return list(dict.fromkeys(paths))
