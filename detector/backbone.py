"""Build the DeBERTa sequence classifier: from pretrained weights, or from an architecture config offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    PreTrainedModel,
)

from detector.scoring import ID2LABEL, LABEL2ID, LABELS

# A small DeBERTa-v3-shaped architecture: v3's relative attention path (p2c|c2p, no absolute
# position embeddings) at a size that trains in minutes on two CPU cores.
SMALL_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "relative_attention": True,
    "position_buckets": 64,
    "max_relative_positions": -1,
    "pos_att_type": "p2c|c2p",
    "position_biased_input": False,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
}


def architecture_config(vocab_size: int, pad_token_id: int = 0, **overrides: Any) -> DebertaV2Config:
    """A DeBERTa-v3-shaped config with the human/machine labels, from ``SMALL_ARCH`` plus ``overrides``."""
    arch = {**SMALL_ARCH, **overrides}
    if isinstance(arch.get("pos_att_type"), str):
        arch["pos_att_type"] = arch["pos_att_type"].split("|")
    return DebertaV2Config(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        num_labels=len(LABELS),
        id2label=ID2LABEL,
        label2id=LABEL2ID,
        **arch,
    )


def build_classifier(
    pretrained: str | None, vocab_size: int, pad_token_id: int = 0, arch: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Load ``pretrained`` (hub id or local HF folder) with a fresh 2-label head, or build from ``arch``."""
    if pretrained:
        config = AutoConfig.from_pretrained(
            pretrained, num_labels=len(LABELS), id2label=ID2LABEL, label2id=LABEL2ID
        )
        return AutoModelForSequenceClassification.from_pretrained(pretrained, config=config)
    return DebertaV2ForSequenceClassification(architecture_config(vocab_size, pad_token_id, **(arch or {})))


def has_own_tokenizer(pretrained: str | None) -> bool:
    """Whether a tokenizer ships with the backbone (a hub id, or a local folder holding tokenizer files)."""
    if not pretrained:
        return False
    path = Path(pretrained)
    if path.exists():
        return any(
            (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "spm.model")
        )
    return True
