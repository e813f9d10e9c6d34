"""Detection quality: CPU training configs vs the TF-IDF baseline, in-domain and on a held-out domain.

Each config in ``--recipes`` (default: the from-scratch ``configs/cpu_recipe.yaml``; also
``configs/pretrained_cpu.yaml``, the packaged pretrained backbone) is a system, named after its file.
Two settings, each trained on the CPU and evaluated on data it never trained on:

- ``in_domain``: train on ``fdgpt_family/train.jsonl``, evaluate on ``val.jsonl``;
- ``heldout_pubmed``: train on ``train.jsonl`` without ``pubmed`` (validation: ``val.jsonl`` without
  ``pubmed``), evaluate on every ``pubmed`` text of ``train.jsonl`` and ``val.jsonl`` (134 human, 793
  machine: ``val.jsonl`` alone has only 10 pubmed humans, too few for TPR at 1% FPR).

The split files are written under ``--out`` at run time (never into the repository). The recipe
model is the final one (no checkpoint selection on the evaluation data). Each setting gets a full
report folder (``detector.evaluation.report.write_report``) and the script prints one table::

    python benchmarks/bench_quality.py --out /tmp/bench_quality --threads 1  # about 20 min, 2 cores
    python benchmarks/bench_quality.py --recipes configs/cpu_recipe.yaml configs/pretrained_cpu.yaml
    python benchmarks/bench_quality.py --settings in_domain --max-steps 50  # a quick smoke run
    python benchmarks/bench_quality.py --settings in_domain --no-time-cap   # every epoch, however busy
    python benchmarks/bench_quality.py --settings select --model.arch.num_hidden_layers 2  # tuning

Arguments the script does not know go to the recipe's command line (``--model.*``, ``--data.*``,
``--trainer.*``, ``--config extra.yaml``). The ``select`` setting trains on nine tenths of
``train.jsonl`` and validates and evaluates on the other tenth (split by ``group``, seeded): tune
there, and keep ``val.jsonl`` and ``pubmed`` for the final comparison. When the recipe has an
``EMACallback``, the final model scored is its EMA weights (what ``export`` ships and validation
measured).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from callbacks.ema import EMACallback  # noqa: E402
from detector.cli import build_cli  # noqa: E402
from detector.commands.evaluate import score_checkpoint  # noqa: E402
from detector.evaluation.baseline import train_baseline  # noqa: E402
from detector.evaluation.report import write_report  # noqa: E402
from detector.records import read_records  # noqa: E402
from detector.splits import stratified_group_split  # noqa: E402

DATA = (REPO / "../shared/data/fdgpt_family").resolve()
RECIPE = REPO / "configs/cpu_recipe.yaml"
HELDOUT = "pubmed"
COLUMNS = ("auroc", "f1", "tpr_at_1fpr", "ece")


def read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def settings(out: Path) -> dict[str, dict[str, Path]]:
    """``{setting: {"train", "val", "eval"}}`` paths; the split files are written to ``out``."""
    train, val = read_rows(DATA / "train.jsonl"), read_rows(DATA / "val.jsonl")
    splits = out / "splits"
    fit, held = stratified_group_split([r["label"] for r in train], [r["group"] for r in train], 0.1, 0)
    select = write_rows(splits / "train_select_val.jsonl", [train[i] for i in held])
    return {
        "select": {
            "train": write_rows(splits / "train_select_fit.jsonl", [train[i] for i in fit]),
            "val": select,
            "eval": select,
        },
        "in_domain": {"train": DATA / "train.jsonl", "val": DATA / "val.jsonl", "eval": DATA / "val.jsonl"},
        f"heldout_{HELDOUT}": {
            "train": write_rows(
                splits / "train_no_pubmed.jsonl", [r for r in train if r["source"] != HELDOUT]
            ),
            "val": write_rows(splits / "val_no_pubmed.jsonl", [r for r in val if r["source"] != HELDOUT]),
            "eval": write_rows(
                splits / "pubmed_all.jsonl", [r for r in train + val if r["source"] == HELDOUT]
            ),
        },
    }


def train_recipe(
    recipe: Path, paths: dict[str, Path], workdir: Path, extra: list[str]
) -> tuple[Path, float, float]:
    """Fit the config ``recipe`` in ``workdir``; return the final checkpoint, wall and CPU seconds.

    CPU seconds (all threads of this process) are the honest budget on a shared machine: 30 minutes
    on 2 idle cores is at most 60 CPU minutes; wall time there grows with the other jobs' load.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    args = [
        "--config",
        str(recipe),
        "--data.train_path",
        str(paths["train"]),
        "--data.val_path",
        str(paths["val"]),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    start, cpu_start = time.perf_counter(), time.process_time()
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ema = next((cb for cb in cli.trainer.callbacks if isinstance(cb, EMACallback)), None)
    if ema is not None and ema.num_updates:
        # Score what a bundle ships (``export`` takes the EMA by default) and what validation measured.
        cli.model.load_state_dict(ema.averaged_state_dict())
    checkpoint = workdir / "final.safetensors"
    cli.trainer.save_checkpoint(checkpoint)
    print(f"{workdir.name}: {cli.trainer.global_step} steps, {cli.trainer.current_epoch} epochs", flush=True)
    return checkpoint, seconds, cpu_seconds


def run_setting(name: str, paths: dict[str, Path], out: Path, args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    extra += ["--trainer.max_time", "null"] if args.no_time_cap else []
    extra += args.recipe_args
    systems: dict[str, Any] = {}
    seconds: dict[str, tuple[float, float]] = {}
    records = read_records(paths["eval"])
    for recipe in args.recipes:
        checkpoint, train_seconds, train_cpu = train_recipe(recipe, paths, out / name / recipe.stem, extra)
        systems[recipe.stem] = score_checkpoint(checkpoint, records.text)
        seconds[recipe.stem] = (train_seconds, train_cpu)
    start, cpu_start = time.perf_counter(), time.process_time()
    baseline = train_baseline(paths["train"])
    seconds["tfidf_baseline"] = (time.perf_counter() - start, time.process_time() - cpu_start)
    systems["tfidf_baseline"] = baseline.predict_proba(records.text)
    labels = [int(label) for label in records.label if label is not None]
    report = write_report(
        systems,
        labels,
        records.extra,
        out / name / "report",
        bootstrap=args.bootstrap,
        seed=0,
        data=str(paths["eval"]),
    )
    return {"overall": report["overall"], "train_seconds": seconds}


def table(results: dict[str, dict[str, Any]]) -> str:
    header = "| setting | system | train wall min | train CPU min | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|---" * (4 + len(COLUMNS)) + "|"]
    for setting, result in results.items():
        for system, entry in result["overall"].items():
            cells = []
            for metric in COLUMNS:
                ci = (entry.get("ci") or {}).get(metric)
                cells.append(f"{entry[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
            wall, cpu = (seconds / 60 for seconds in result["train_seconds"][system])
            lines.append(f"| {setting} | {system} | {wall:.1f} | {cpu:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_quality"))
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["in_domain", f"heldout_{HELDOUT}"],
        help="in_domain, heldout_pubmed, and/or select (a group-wise tenth of train.jsonl, for tuning)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        type=Path,
        default=[RECIPE],
        help="training configs to compare with the baseline, each a system named after its file "
        "(configs/cpu_recipe.yaml, configs/pretrained_cpu.yaml)",
    )
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); on 2 cores shared with other jobs, 1 is much faster",
    )
    parser.add_argument("--max-steps", type=int, default=0, help="cap the recipe's steps (smoke runs)")
    parser.add_argument(
        "--no-time-cap",
        action="store_true",
        help="drop the recipe's 30-minute wall-clock cap (a loaded machine then still runs every epoch)",
    )
    args, args.recipe_args = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    args.recipes = [recipe.resolve() for recipe in args.recipes]
    chosen = settings(out)
    results = {}
    for name, paths in chosen.items():
        if name in args.settings:
            results[name] = run_setting(name, paths, out, args)
            print(f"\n{name}: {json.dumps(results[name]['train_seconds'])}", flush=True)
            print(table({name: results[name]}), flush=True)
    print("\n" + table(results))
    (out / "table.md").write_text(table(results) + "\n")


if __name__ == "__main__":
    main()
