"""Write an evaluation report folder: ``metrics.json``, ``summary.md``, a ROC curve and a reliability diagram.

Every file is written to a temp name in the report folder, fsynced and renamed into place, so a
report file is never half written. Plots use Matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import binary_roc

from detector.atomic import write_bytes
from detector.evaluation.bootstrap import METRICS
from detector.evaluation.metrics import ECE_BINS, as_arrays, evaluate, reliability_bins
from detector.scoring import DEFAULT_THRESHOLD

REPORT_FILES = ("metrics.json", "summary.md", "roc_curve.png", "reliability_diagram.png")
METRIC_TITLES = {
    "auroc": "AUROC",
    "f1": "macro-F1 (human and machine, P > 0.5)",
    "acc": "accuracy (P > 0.5)",
    "tpr_at_1fpr": "TPR at 1% FPR",
    "tpr_at_5fpr": "TPR at 5% FPR",
    "ece": f"ECE ({ECE_BINS} bins)",
}


def _clean(obj: Any) -> Any:
    # Strict JSON: NumPy values as numbers, tuples as lists, NaN as null.
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _cell(entry: Mapping[str, Any], metric: str) -> str:
    value = entry.get(metric)
    if value is None:
        return "n/a"
    interval = (entry.get("ci") or {}).get(metric)
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _table(header: str, rows: Mapping[str, Mapping[str, Any]], metric: str | None = None) -> list[str]:
    """A Markdown table: one row per metric (``metric`` None) or per subset (one ``metric``)."""
    systems = list(next(iter(rows.values())))
    lines = [f"| {header} | " + " | ".join(systems) + " |", "|---" * (len(systems) + 1) + "|"]
    if metric is None:
        overall = next(iter(rows.values()))
        lines += [
            f"| {METRIC_TITLES[m]} | " + " | ".join(_cell(overall[s], m) for s in systems) + " |"
            for m in METRICS
        ]
    else:
        for name, entry in rows.items():
            counts = f"{name} ({entry[systems[0]]['n_human']} h / {entry[systems[0]]['n_machine']} m)"
            lines.append(f"| {counts} | " + " | ".join(_cell(entry[s], metric) for s in systems) + " |")
    return [*lines, ""]


def render_summary(result: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The Markdown summary of :func:`detector.evaluation.metrics.evaluate`'s ``result``."""
    overall = result["overall"]
    first = next(iter(overall.values()))
    lines = [
        "# Evaluation report",
        "",
        f"Data: `{settings.get('data') or 'in memory'}`: {first['n']} texts "
        f"({first['n_human']} human, {first['n_machine']} machine).",
        f"Intervals: {settings['confidence']:.0%} percentile bootstrap, {settings['bootstrap']} resamples "
        f"stratified by label, seed {settings['seed']}."
        if settings["bootstrap"]
        else "No bootstrap intervals (0 resamples).",
        *([f"Weights scored: {settings['weights']}."] if settings.get("weights") else []),
        "",
        "## Overall",
        "",
        *_table("metric", {"overall": overall}),
    ]
    if "by_source" in result:
        lines += ["## AUROC by source", "", *_table("source", result["by_source"], "auroc")]
    if "by_generator" in result:
        lines += ["## AUROC by generator (its machine texts vs all human texts)", ""]
        lines += _table("generator", result["by_generator"], "auroc")
        lines += [
            "## TPR at 1% FPR by generator",
            "",
            *_table("generator", result["by_generator"], "tpr_at_1fpr"),
        ]
    return "\n".join(lines)


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plot_roc(systems: Mapping[str, np.ndarray], labels: np.ndarray) -> bytes:
    """PNG of each system's ROC curve, linear and with a log FPR axis (low FPRs matter most)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5))
    linear, log = figure.subplots(1, 2)
    y = torch.from_numpy(labels)
    for name, scores in systems.items():
        fpr, tpr, _ = binary_roc(torch.from_numpy(scores).float(), y)
        for axes in (linear, log):
            axes.plot(fpr.numpy(), tpr.numpy(), label=name, drawstyle="steps-post")
    for axes in (linear, log):
        for max_fpr in (0.01, 0.05):
            axes.axvline(max_fpr, color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel("false-positive rate (humans flagged)")
        axes.set_ylabel("true-positive rate (machine texts caught)")
        axes.legend(loc="lower right")
    linear.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8)
    log.set_xscale("log")
    log.set_xlim(1.0 / max(int((labels == 0).sum()), 1) / 2, 1.0)
    figure.suptitle("ROC curve")
    return _png(figure)


def plot_reliability(systems: Mapping[str, np.ndarray], labels: np.ndarray, n_bins: int = ECE_BINS) -> bytes:
    """PNG of the reliability diagram (share of machine texts per P(machine) bin) and bin counts."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6.5))
    curve, counts = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    curve.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8, label="perfect calibration")
    width = 1.0 / n_bins / (len(systems) + 1)
    for i, (name, scores) in enumerate(systems.items()):
        bins = reliability_bins(scores, labels, n_bins)
        filled = bins["count"] > 0
        curve.plot(bins["mean_score"][filled], bins["frac_machine"][filled], marker="o", label=name)
        counts.bar(bins["edges"][:-1] + (i + 0.5) * width, bins["count"], width=width, label=name)
    curve.set_ylabel("share of machine texts")
    curve.set_title(f"Reliability diagram ({n_bins} equal-width bins)")
    curve.legend(loc="upper left")
    counts.set_xlabel("predicted P(machine)")
    counts.set_ylabel("texts")
    counts.set_yscale("log")
    return _png(figure)


def write_report(
    scores: Mapping[str, Sequence[float] | np.ndarray] | Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    extra_columns: Mapping[str, Sequence[Any]] | None,
    out_dir: str | Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    data: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """Evaluate and write ``REPORT_FILES`` into ``out_dir`` (created; those files are replaced).

    Args:
        scores: P(machine) per row, or a mapping of system name to scores (reported side by side).
        labels: 0 (human) / 1 (machine) per row.
        extra_columns: optional ``source`` / ``generator`` columns for the breakdowns.
        out_dir: the report folder.
        bootstrap, seed, confidence: see :func:`detector.evaluation.metrics.evaluate`.
        data: the evaluated file, recorded in the report.
        weights: which weights the detector scored with (``ema`` or ``raw``), recorded in the report.

    Returns:
        The content of ``metrics.json``.
    """
    systems = dict(scores) if isinstance(scores, Mapping) else {"model": scores}
    checked = {name: as_arrays(values, labels) for name, values in systems.items()}
    arrays, y = {name: pair[0] for name, pair in checked.items()}, next(iter(checked.values()))[1]
    result = evaluate(arrays, y, extra_columns, bootstrap=bootstrap, seed=seed, confidence=confidence)
    settings = {
        "data": data,
        "weights": weights,
        "threshold": DEFAULT_THRESHOLD,
        "ece_bins": ECE_BINS,
        "bootstrap": bootstrap,
        "seed": seed,
        "confidence": confidence,
        "bootstrap_method": "percentile, stratified by label",
        "generator_breakdown": "each generator's machine texts vs all human texts",
    }
    content = _clean({"settings": settings, **result})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "metrics.json", (json.dumps(content, indent=2, allow_nan=False) + "\n").encode())
    write_bytes(out / "summary.md", render_summary(result, settings).encode())
    write_bytes(out / "roc_curve.png", plot_roc(arrays, y))
    write_bytes(out / "reliability_diagram.png", plot_reliability(arrays, y))
    return content
