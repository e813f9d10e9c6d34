"""The bundle's ``README.md``: a Hugging Face model card with YAML front matter and working examples."""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

# Hub metric ids for our logged names; others keep their own name.
METRIC_TYPES = {
    "val_f1": "f1",
    "val_auroc": "roc_auc",
    "val_accuracy": "accuracy",
    "val_acc": "accuracy",
    "val_loss": "loss",
    "val_precision": "precision",
    "val_recall": "recall",
    "val_tpr_at_1fpr": "tpr_at_1fpr",
}


def _model_index(name: str, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    metrics = [
        {"type": METRIC_TYPES.get(key, key), "value": float(value), "name": key}
        for key, value in sorted(metadata.get("metrics", {}).items())
        if isinstance(value, int | float) and math.isfinite(value)
    ]
    dataset = {"type": "custom", "name": metadata.get("dataset") or "validation split of the training data"}
    task = {"type": "text-classification", "name": "Machine-generated text detection"}
    return [{"name": name, "results": [{"task": task, "dataset": dataset, "metrics": metrics}]}]


def front_matter(name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata: pipeline tag, library, labels and ``model-index`` with the metrics."""
    matter: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["machine-generated-text-detection", "deberta-v2", "safetensors"],
        "model-index": _model_index(name, metadata),
    }
    base = metadata.get("base_model")
    if base:
        matter["base_model"] = base
    return matter


def _examples(bundle: str, threshold: float, max_length: int) -> str:
    path = json.dumps(bundle)
    return f"""\
With `transformers` alone (no `detector` code):

```python
from transformers import pipeline

classify = pipeline("text-classification", model={path})
print(classify(["Some text to check."], top_k=None, truncation=True, max_length={max_length}))
```

```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({path})
model = AutoModelForSequenceClassification.from_pretrained({path}).eval()
batch = tokenizer(["Some text to check."], truncation=True, max_length={max_length}, return_tensors="pt")
with torch.inference_mode():
    prob_machine = model(**batch).logits.double().softmax(-1)[:, 1]
print(prob_machine > {threshold!r})  # True: machine, at the stored threshold
```

With the `detector` package (PyTorch, or `backend="onnx"` when `model.onnx` is present):

```python
from detector.bundle.loading import load_detector

detector = load_detector({path})
print(detector.score(["Some text to check."]))
```

From the shell, a JSONL file with a `text` field (and an optional `id`) to JSONL scores:

```bash
python -m detector score {bundle} texts.jsonl --output scores.jsonl
```
"""


def _int8_section(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    sizes = entry.get("size_bytes") or {}
    size = " / ".join(f"`{name}` {value / 1e6:.1f} MB" for name, value in sizes.items())
    return f"""## int8 model (`{entry["file"]}`)

A dynamically quantized copy of `model.onnx` for CPU scoring ({entry["quantization"]}), with its
own threshold: predict `machine` when its P(machine) > **{entry["decision_threshold"]!r}**, chosen on
{entry["threshold_source"]} (FPR {entry["threshold_val_fpr"]!r}, TPR {entry["threshold_val_tpr"]!r}).
Checked against the float model on the {entry["checked_on"]}: AUROC {entry["auroc_float"]:.4f} (float)
vs {entry["auroc_int8"]:.4f} (int8, limit: a drop of {entry["max_auroc_drop"]:g}); decisions changed
on {entry["decision_change"]:.2%} of texts, each model at its own threshold (limit
{entry["max_decision_change"]:.2%}; {entry["decision_change_at_float_threshold"]:.2%} at the float
threshold). Sizes: {size}.

```bash
python -m detector score BUNDLE texts.jsonl --backend onnx-int8
```

"""


def render_card(name: str, bundle: str, metadata: dict[str, Any]) -> str:
    """The full ``README.md`` text for bundle ``name`` at path ``bundle`` from its training metadata."""
    threshold = metadata["decision_threshold"]
    matter = yaml.safe_dump(front_matter(name, metadata), sort_keys=False)
    metrics = "\n".join(
        f"| `{k}` | {'n/a' if v is None else f'{v:.4f}'} |"
        for k, v in sorted(metadata.get("metrics", {}).items())
    )
    diff = metadata.get("onnx_max_abs_logit_diff")
    onnx_line = (
        f"- `model.onnx`: ONNX, max abs logit difference to PyTorch {diff:.2e}\n" if diff is not None else ""
    )
    int8 = metadata.get("int8")
    int8_line = f"- `{int8['file']}`: its int8 copy for CPU scoring (see above)\n" if int8 else ""
    return f"""---
{matter}---

# {name}

A binary classifier of text as human-written (`human`, label 0) or machine-generated (`machine`,
label 1): DeBERTa-v2 (`DebertaV2ForSequenceClassification`), version {metadata["version"]}, epoch
{metadata["epoch"]}, step {metadata["step"]}, {metadata["weights"]} weights.

## Decision threshold

Predict `machine` when P(machine) > **{threshold!r}**: chosen on the validation set for a
false-positive rate of at most {metadata["target_fpr"]!r} ({metadata["threshold_source"]}). The
plain argmax (the pipeline's top label) is the 0.5 threshold. Texts are truncated to
{metadata["max_length"]} tokens.

## Metrics (validation)

| metric | value |
|---|---|
{metrics}

{_int8_section(int8)}## Usage

{_examples(bundle, threshold, metadata["max_length"])}
## Files

- `model.safetensors`, `config.json`: the weights (no pickle) and the architecture
- `tokenizer.json`, `tokenizer_config.json`: the tokenizer
- `training_metadata.json`: version, date, epoch, step, metrics, checkpoint, seed, resolved config,
  package versions, git commit, training-data fingerprint, thresholds
{onnx_line}{int8_line}
TorchScript is not offered: it is deprecated by PyTorch, Lightning and transformers. Use ONNX
(above) or `torch.export`.
"""
