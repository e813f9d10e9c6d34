import torch
from lightning.pytorch import Trainer

from detector.backbone import architecture_config
from detector.module import DetectorModule, _first_occurrences
from tests.conftest import TINY_ARCH


def tiny_module(**kwargs) -> DetectorModule:
    return DetectorModule(arch=TINY_ARCH, vocab_size=200, **kwargs)


def test_backbone_is_deberta_v3_shaped_with_labels():
    model = tiny_module().model
    config = model.config
    assert config.id2label == {0: "human", 1: "machine"}
    assert config.label2id == {"human": 0, "machine": 1}
    assert config.relative_attention and not config.position_biased_input
    assert config.pos_att_type == ["p2c", "c2p"]
    assert architecture_config(10).hidden_size == 128


def test_loss_goes_down_on_a_fixed_batch(tokenizer, texts):
    torch.manual_seed(0)
    module = tiny_module(learning_rate=3e-3)
    module.eval()  # no dropout: the loss must fall because of the updates alone
    batch = tokenizer(texts[:8], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = module._loss(module(batch["input_ids"], batch["attention_mask"]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_optimizer_skips_decay_on_biases_and_layernorm_and_warms_up_then_decays():
    module = tiny_module(learning_rate=1e-3, weight_decay=0.1, warmup_ratio=0.25)
    trainer = Trainer(max_steps=8, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    config = module.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any("LayerNorm.weight" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    assert lrs == [0.0, 5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6]


def test_padded_validation_rows_are_counted_once_in_row_order():
    # Two ranks' shares of 5 rows, padded by wrapping around: rank 0 [0, 2, 4], rank 1 [1, 3, 0].
    rows, first = _first_occurrences(torch.tensor([0, 2, 4, 1, 3, 0]))
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert first.tolist() == [0, 3, 1, 4, 2]
