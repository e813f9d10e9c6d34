"""Shared settings of the examples: where they write, a small demo corpus, a tiny model."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the examples never touch the network

from detector.demo import write_demo_corpus

HERE = Path(__file__).resolve().parent
# Everything the examples write goes under this folder (relative to where you run them).
WORK = Path(os.environ.get("DETECTOR_EXAMPLES_DIR", "outputs/examples"))
# A tiny DeBERTa-v3-shaped network, so each example runs in seconds on a CPU. Drop it for real runs.
TINY_ARCH = json.dumps(
    {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
)


def demo_data() -> dict[str, Path]:
    """Small train/val/test JSONL files of the synthetic demo corpus (``text``, ``label``)."""
    return write_demo_corpus(WORK / "data", seed=0, sizes={"train": 96, "val": 32, "test": 32})


def data_args(data: dict[str, Path]) -> list[str]:
    """The data and model flags every training example uses."""
    args = [
        "--model.arch", TINY_ARCH, "--model.learning_rate", "3e-3", "--data.max_length", "64",
        "--data.batch_size", "16", "--data.train_path", str(data["train"]),
        "--data.val_path", str(data["val"]),
        "--data.tokenizer_vocab_size", "200", "--data.tokenizer_root", str(WORK / "tokenizer"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    return args


def ensure_trained() -> Path:
    """The checkpoint folder of ``01_train.py``'s run, running it first when it is missing."""
    folder = WORK / "train" / "checkpoints"
    if not (folder / "checkpoint_latest.safetensors").is_file():
        runpy.run_path(str(HERE / "01_train.py"), run_name="__main__")
    return folder
