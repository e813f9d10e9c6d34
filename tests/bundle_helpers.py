"""Tiny DeBERTa-v3-shaped classifier, local tokenizer and metadata shared by the bundle tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from detector.backbone import build_classifier
from detector.tokenizer import train_tokenizer

TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
TEXTS = [
    f"{subject} {verb} the {thing} near the {place} on day {i}."
    for i, (subject, verb, thing, place) in enumerate(
        zip(
            ["The cat", "A model", "My friend", "The report", "Our team", "This paper"] * 5,
            ["found", "wrote", "described", "moved", "studied"] * 6,
            ["results", "river", "budget", "dataset", "garden", "engine"] * 5,
            ["station", "office", "lake", "market", "school"] * 6,
            strict=True,
        )
    )
]


def tiny_tokenizer():
    return train_tokenizer(TEXTS, 200)


def tiny_model(tokenizer, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return build_classifier(None, len(tokenizer), arch=dict(TINY_ARCH, max_position_embeddings=64)).eval()


def shifted_weights(model: PreTrainedModel, shift: float = 0.05) -> dict[str, torch.Tensor]:
    """A state dict that differs from ``model``'s, standing in for EMA weights."""
    generator = torch.Generator().manual_seed(1)
    return {
        k: v + shift * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def metadata(**overrides: Any) -> dict[str, Any]:
    base = {
        "version": "1.0",
        "epoch": 3,
        "step": 120,
        "metrics": {"val_f1": 0.875, "val_loss": 0.3125, "val_auroc": 0.9375},
        "checkpoint": "outputs/checkpoints/checkpoint_step_120.safetensors",
        "seed": 7,
        "config": {"model": {"lr": 2e-5}, "data": {"batch_size": 8}},
        "data_fingerprint": "sha256:abc",
        "weights": "trained",
        "decision_threshold": 0.625,
        "target_fpr": 0.01,
        "threshold_source": "validation set, 200 human texts",
        "max_length": 48,
    }
    return {**base, **overrides}


def logits(model: PreTrainedModel, tokenizer, texts: list[str], max_length: int = 48) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
