"""Load a bundle for deployment: plain transformers, the detector API, and ONNX Runtime.

Run from the repository root: ``python examples/05_load_bundle.py`` (exports with
``04_export_bundle.py`` first if the bundle is missing). A bundle needs no ``detector`` code: the
first two blocks use transformers only. Scoring a file on the command line::

    python -m detector score outputs/models/inference/model_v1.0_final texts.jsonl -o scores.jsonl
"""

from __future__ import annotations

import runpy

import numpy as np
import torch
from common import HERE, WORK
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from detector.bundle.loading import load_detector

BUNDLE = WORK / "export" / "model_v1.1_best"
TEXTS = [
    "It is important to note that this approach offers several key benefits for stakeholders.",
    "lol we got there late and the pizza place was closed, so tacos again",
]


def main() -> None:
    if not (BUNDLE / "model.onnx").is_file():
        runpy.run_path(str(HERE / "04_export_bundle.py"), run_name="__main__")

    # 1. transformers only: the pipeline (labels human/machine come from config.json).
    classify = pipeline("text-classification", model=str(BUNDLE), top_k=None)
    print("pipeline:", classify(TEXTS[0]))

    # 2. transformers only: the model and tokenizer, for batch scoring under your own control.
    tokenizer = AutoTokenizer.from_pretrained(BUNDLE)
    model = AutoModelForSequenceClassification.from_pretrained(BUNDLE).eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits
    p_torch = logits.double().softmax(-1)[:, model.config.label2id["machine"]].numpy()
    print("P(machine), transformers:", p_torch)

    # 3. the detector API: P(machine) and a decision at the threshold stored in the bundle.
    detector = load_detector(BUNDLE)
    results = detector.score(TEXTS)
    print(f"detector (threshold {detector.threshold:.4f}):", results)

    # 4. the same with ONNX Runtime (model.onnx, written by `export --onnx`); no PyTorch needed at run time.
    onnx_results = load_detector(BUNDLE, backend="onnx").score(TEXTS)
    p_onnx = np.array([r["prob_machine"] for r in onnx_results])
    print("P(machine), ONNX Runtime:", p_onnx)
    np.testing.assert_allclose(p_onnx, [r["prob_machine"] for r in results], atol=1e-4)


if __name__ == "__main__":
    main()
