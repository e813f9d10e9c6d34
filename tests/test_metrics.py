import pytest
import torch

from detector.metrics import MacroF1, TPRAtFPR, classification_metrics, tpr_at_fpr


def test_tpr_at_fpr_on_hand_computed_example():
    # 100 humans scored 0.00..0.99, 4 machines. At FPR <= 1% at most one human may be flagged:
    # threshold 0.985 flags human 0.99 (FPR 1%) and machines 1.0, 0.995, 0.985: TPR 3/4.
    humans = torch.arange(100) / 100
    machines = torch.tensor([1.0, 0.995, 0.985, 0.5])
    scores = torch.cat([humans, machines])
    labels = torch.cat([torch.zeros(100), torch.ones(4)]).long()
    assert tpr_at_fpr(scores, labels, 0.01).item() == pytest.approx(0.75)
    # No human flagged: the threshold must sit above 0.99, catching 1.0 and 0.995 only.
    assert tpr_at_fpr(scores, labels, 0.0).item() == pytest.approx(0.5)
    # FPR <= 60% lets the threshold drop to 0.4, which catches the machine at 0.5 too.
    assert tpr_at_fpr(scores, labels, 0.6).item() == pytest.approx(1.0)


def test_tpr_at_fpr_is_zero_without_both_classes():
    assert tpr_at_fpr(torch.tensor([0.1, 0.9]), torch.tensor([1, 1])).item() == 0.0


def test_tpr_at_fpr_rejects_bad_rate():
    with pytest.raises(ValueError, match="max_fpr must be in"):
        TPRAtFPR(1.5)


def test_metric_collection_names_and_values():
    metrics = classification_metrics("val_")
    scores = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1, 0.2])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    metrics.update(scores[:3], labels[:3])
    metrics.update(scores[3:], labels[3:])
    values = {k: v.item() for k, v in metrics.compute().items()}
    assert set(values) == {"val_f1", "val_auroc", "val_acc", "val_tpr_at_1fpr"}
    # predictions at 0.5: 1,1,0,1,0,0 -> machine TP 2, FP 1, FN 1: F1 2/3; human TP 2, FP 1, FN 1: 2/3
    # macro-F1 2/3, accuracy 4/6
    assert values["val_f1"] == pytest.approx(2 / 3)
    assert values["val_acc"] == pytest.approx(4 / 6)
    # pairs (machine > human): 0.9,0.8 beat all 3 humans; 0.3 beats 0.1 and 0.2: 8/9
    assert values["val_auroc"] == pytest.approx(8 / 9)
    # no human may be flagged: threshold above 0.6 catches 0.9 and 0.8
    assert values["val_tpr_at_1fpr"] == pytest.approx(2 / 3)


def test_constant_machine_classifier_scores_below_a_real_one_on_machine_heavy_data():
    labels = torch.tensor([1] * 86 + [0] * 14)
    constant, real = MacroF1(), MacroF1()
    constant.update(torch.full((100,), 0.9), labels)
    # A real (imperfect) classifier: 80 of 86 machines and 10 of 14 humans right.
    scores = torch.cat(
        [torch.full((80,), 0.8), torch.full((6,), 0.2), torch.full((10,), 0.1), torch.full((4,), 0.7)]
    )
    real.update(scores, labels)
    # Constant: machine F1 2*86/(2*86+14) = 172/186, human F1 0 (no human hit): mean 86/186.
    assert constant.compute().item() == pytest.approx(86 / 186)
    machine_f1, human_f1 = 160 / (160 + 4 + 6), 20 / (20 + 6 + 4)
    assert real.compute().item() == pytest.approx((machine_f1 + human_f1) / 2)
    assert constant.compute() < 0.5 < real.compute()
