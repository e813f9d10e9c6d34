import torch
from state_helpers import write_tiny_checkpoint
from transformers import AutoModelForSequenceClassification

from detector.checkpoint.format import save_state
from detector.commands.export import main
from detector.module import DetectorModule
from detector.tokenizer import tokenizer_files

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def test_export_accepts_the_hparams_lightning_cli_saves(tmp_path, tokenizer):
    module = DetectorModule(arch=TINY, vocab_size=len(tokenizer))
    hparams = {
        **dict(module.hparams),
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
        "_class_path": "detector.module.DetectorModule",
    }
    checkpoint = {
        "epoch": 2,
        "global_step": 30,
        "state_dict": module.state_dict(),
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": {"max_length": 32},
        "DetectorDataModule": {"tokenizer_files": tokenizer_files(tokenizer)},
    }
    path = tmp_path / "checkpoint_epoch_2.safetensors"
    save_state(checkpoint, path)
    assert main([str(path), "--out", str(tmp_path / "out"), "--version", "1.2"]) == 0
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model_v1.2_epoch2")
    expected = {k.removeprefix("model."): v for k, v in module.state_dict().items()}
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_checkpoint_without_tokenizer_files_is_refused_naming_it(tmp_path, tokenizer, capsys):
    module = DetectorModule(arch=TINY, vocab_size=len(tokenizer))
    path = tmp_path / "old.safetensors"
    checkpoint = {"epoch": 0, "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    save_state(checkpoint, path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"detector export: error: checkpoint {path} holds no tokenizer files")
    assert error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_recorded_validation_rates_equal_what_score_yields_on_the_same_file(tmp_path, tokenizer):
    import json

    from conftest import write_jsonl

    from detector.commands.score import main as score_main
    from detector.demo import demo_rows

    write_tiny_checkpoint(tmp_path / "c.safetensors", tokenizer, TINY)
    val = write_jsonl(tmp_path / "val.jsonl", demo_rows(70, seed=7))
    args = [str(tmp_path / "c.safetensors"), "--out", str(tmp_path / "out"), "--val-data", str(val)]
    assert main([*args, "--target-fpr", "0.2"]) == 0
    bundle = tmp_path / "out" / "model_v1.0_epoch1"
    recorded = json.loads((bundle / "training_metadata.json").read_text())
    assert score_main([str(bundle), str(val), "--output", str(tmp_path / "scores.jsonl")]) == 0

    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    labels = [json.loads(line)["label"] for line in val.read_text().splitlines()]
    threshold = recorded["decision_threshold"]
    human = [row for row, label in zip(scores, labels, strict=True) if label == 0]
    machine = [row for row, label in zip(scores, labels, strict=True) if label == 1]
    assert human and machine
    # The threshold is one of the human scores, to the bit, as `score` computes them.
    assert threshold in [row["prob_machine"] for row in human]
    assert all(row["is_machine"] == (row["prob_machine"] > threshold) for row in scores)
    fpr = sum(row["is_machine"] for row in human) / len(human)
    tpr = sum(row["is_machine"] for row in machine) / len(machine)
    assert (recorded["threshold_val_fpr"], recorded["threshold_val_tpr"]) == (fpr, tpr)
    assert fpr <= 0.2
