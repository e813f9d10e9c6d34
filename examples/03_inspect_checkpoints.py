"""Choose and inspect checkpoints by hand: list, verify, pick by a metric, read weights and EMA.

Run from the repository root: ``python examples/03_inspect_checkpoints.py`` (trains with
``01_train.py`` first if its checkpoints are missing). The same on the command line::

    python -m detector checkpoints list outputs/checkpoints
    python -m detector checkpoints verify outputs/checkpoints/*.safetensors
    python -m detector checkpoints show outputs/checkpoints/checkpoint_latest.safetensors
"""

from __future__ import annotations

from common import ensure_trained

from detector.bundle.export import checkpoint_weights
from detector.checkpoint.format import load_state, read_header
from detector.commands.checkpoints import (
    describe_checkpoint,
    format_table,
    list_checkpoints,
    verify_checkpoints,
)
from detector.module import DetectorModule


def main() -> None:
    folder = ensure_trained()
    rows = list_checkpoints(folder)  # headers only: fast, whatever the file size
    print(format_table(rows))

    # Integrity: every byte checked against the checksum stored in the file.
    for path, problem in verify_checkpoints(sorted(folder.glob("*.safetensors"))):
        print(f"{'OK ' if problem is None else 'BAD'} {path.name} {problem or ''}")

    # Pick by hand, here the lowest val_loss among the files that recorded one.
    scored = [row for row in rows if "val_loss" in row["metrics"]]
    chosen = folder / min(scored, key=lambda row: row["metrics"]["val_loss"])["file"]
    header = read_header(chosen)
    print(
        f"\nchosen: {chosen.name} (epoch {header['state']['epoch']}, step {header['state']['global_step']})"
    )
    print("\n".join(describe_checkpoint(chosen, max_items=8).splitlines()[:25]))

    # The trained (raw) weights as a LightningModule, without any pickle.
    module = DetectorModule.load_from_checkpoint(chosen)
    print(f"\nloaded {type(module.model).__name__}, {sum(p.numel() for p in module.parameters())} parameters")

    # The whole state as a dict; the EMA weights live in the EMA callback's state.
    checkpoint = load_state(chosen)
    weights, source = checkpoint_weights(checkpoint, use_ema=True)
    print(f"top-level keys: {sorted(checkpoint)}")
    print(f"bundle weights would be the {source} weights ({len(weights)} tensors)")


if __name__ == "__main__":
    main()
