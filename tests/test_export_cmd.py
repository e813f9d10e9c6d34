import re

import pytest
import torch
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


def test_checkpoint_without_tokenizer_files_is_refused_naming_it(tmp_path, tokenizer):
    module = DetectorModule(arch=TINY, vocab_size=len(tokenizer))
    path = tmp_path / "old.safetensors"
    checkpoint = {"epoch": 0, "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    save_state(checkpoint, path)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(path))} holds no tokenizer files"):
        main([str(path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
