import json
from pathlib import Path

import pytest
import torch
import yaml

from detector.__main__ import main
from detector.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(capsys, config):
    resolved = print_config(capsys, "fit", "--config", str(config))
    expected = yaml.safe_load(config.read_text())
    for section, values in expected.items():
        for key, value in (values or {}).items():
            if not isinstance(value, (dict, list)):
                assert resolved[section][key] == value, f"{config.name}: {section}.{key}"


def test_configs_compose_and_overrides_win(capsys):
    resolved = print_config(
        capsys,
        "fit",
        "--config",
        str(ROOT / "configs/default.yaml"),
        "--config",
        str(ROOT / "configs/real_data.yaml"),
        "--trainer.max_epochs",
        "2",
        "--model.learning_rate",
        "3e-5",
        "--data.batch_size",
        "32",
    )
    assert resolved["trainer"]["max_epochs"] == 2
    assert resolved["model"]["learning_rate"] == 3e-5
    assert resolved["data"]["batch_size"] == 32
    assert resolved["data"]["train_path"].endswith("fdgpt_family/train.jsonl")
    assert resolved["seed_everything"] == 0


def test_fit_fast_dev_run_in_process_with_override(tmp_path, monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--trainer.fast_dev_run",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--model.arch",
            TINY,
            "--model.learning_rate",
            "3e-5",
            "--data.batch_size",
            "4",
            "--data.train_path",
            str(demo_files["train"]),
            "--data.val_path",
            str(demo_files["val"]),
            "--data.tokenizer_vocab_size",
            "200",
        ],
    )
    assert cli.model.hparams.learning_rate == 3e-5
    assert cli.trainer.global_step == 2
    assert cli.model.hparams.vocab_size == len(cli.datamodule.tokenizer)
    assert {"val_f1", "val_auroc", "val_acc", "val_tpr_at_1fpr", "val_loss"} <= set(
        cli.trainer.callback_metrics
    )


def test_fit_writes_logs_and_resolved_config(tmp_path, monkeypatch, demo_files):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--trainer.max_steps",
            "3",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--model.arch",
            TINY,
            "--data.batch_size",
            "4",
            "--data.train_path",
            str(demo_files["train"]),
            "--data.val_path",
            str(demo_files["val"]),
            "--data.tokenizer_vocab_size",
            "200",
        ]
    )
    run = tmp_path / "outputs" / "logs" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 3
    assert json.loads(json.dumps(config["model"]["arch"]))["hidden_size"] == 32
    assert "train_loss_step" in (run / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_two_fresh_runs_with_the_same_seed_and_data_are_bitwise_identical(tmp_path, monkeypatch, demo_files):
    from detector.checkpoint.format import load_state
    from detector.demo import demo_rows
    from tests.conftest import write_jsonl

    # Rare characters: the tokenizer trainer appends them in a hash order that varies between runs.
    rare = [
        {"text": f"{c} costs $5 + 3 = 8 at 90\u00b0 ^ {c}", "label": i % 2} for i, c in enumerate("QZq\u2212")
    ]
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(40, seed=0) + rare)
    saved = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        main([
            "fit", "--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false",
            "--model.arch", TINY, "--data.batch_size", "8", "--data.train_path", str(train),
            "--data.val_path", str(demo_files["val"]), "--data.tokenizer_vocab_size", "200",
        ])  # fmt: skip
        saved.append(load_state(Path("outputs/checkpoints/checkpoint_latest.safetensors")))
    first, second = saved
    assert first["DetectorDataModule"]["tokenizer_files"] == second["DetectorDataModule"]["tokenizer_files"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][k], v) for k, v in second["state_dict"].items())
