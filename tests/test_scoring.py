"""detector.scoring: the one P(machine), label table and decision rule, used by every scoring path."""

from __future__ import annotations

import torch

from detector.backbone import architecture_config
from detector.bundle.card import render_card
from detector.module import DetectorModule
from detector.records import parse_label
from detector.scoring import DEFAULT_THRESHOLD, ID2LABEL, LABEL2ID, decision, prob_machine

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def test_prob_machine_is_the_float64_softmax_machine_column_from_tensors_and_arrays():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2000.0, -2000.0], [-2000.0, 2000.0]], dtype=torch.float32)
    got = prob_machine(logits)
    assert got.dtype == torch.float64
    assert torch.equal(got, logits.double().softmax(-1)[:, 1])  # the card's expression, to the bit
    assert got[2:].tolist() == [0.0, 1.0]  # no overflow
    assert torch.equal(prob_machine(logits.numpy()), got)


def test_decision_is_machine_only_strictly_above_the_threshold():
    assert decision(0.5, DEFAULT_THRESHOLD) == {"prob_machine": 0.5, "label": "human", "is_machine": False}
    assert decision(0.75, 0.5)["label"] == "machine"
    assert DEFAULT_THRESHOLD == 0.5


def test_one_label_table_for_models_data_and_bundles():
    assert ID2LABEL == {0: "human", 1: "machine"} and LABEL2ID == {"human": 0, "machine": 1}
    config = architecture_config(vocab_size=50)
    assert config.id2label == ID2LABEL and config.label2id == LABEL2ID
    assert [parse_label(name, "here") for name in ("Human", "machine")] == [0, 1]


def test_the_module_scores_with_prob_machine(tokenizer):
    torch.manual_seed(0)
    module = DetectorModule(arch=TINY, vocab_size=len(tokenizer)).eval()
    batch = tokenizer(
        ["one text here", "another, longer text for the module"], padding=True, return_tensors="pt"
    )
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "index": torch.arange(2),
    }
    with torch.no_grad():
        out = module.predict_step(inputs, 0)
        expected = prob_machine(module(batch["input_ids"], batch["attention_mask"]))
    assert torch.equal(out["prob_machine"], expected)


def test_the_model_card_example_spells_the_same_expression():
    metadata = {
        "decision_threshold": 0.4, "version": "1.0", "epoch": 0, "step": 1, "weights": "ema",
        "target_fpr": 0.01, "threshold_source": "test", "max_length": 32, "metrics": {},
    }  # fmt: skip
    assert "logits.double().softmax(-1)[:, 1]" in render_card("b", "path/b", metadata)
