import json
import os
import re
import shutil

import numpy as np
import pytest

from detector.__main__ import main as detector_main
from detector.bundle.loading import load_detector
from detector.checkpoint.format import load_state, read_header, save_state
from detector.cli import build_cli
from detector.commands.evaluate import main, score_checkpoint
from detector.demo import demo_rows
from detector.evaluation.report import REPORT_FILES
from detector.tokenizer import checkpoint_tokenizer

TINY = '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}'


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def fit_and_test(workdir, files, *args):
    """Fit 3 steps in ``workdir``, save ``x.safetensors``; return it, the test metrics and the tokenizer."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        cli = build_cli(
            [
                *("--trainer.max_steps", "3", "--trainer.enable_progress_bar", "false"),
                *("--trainer.logger", "false"),
                *("--data.batch_size", "4", "--data.eval_batch_size", "7"),
                *("--data.train_path", str(files["train"]), "--data.val_path", str(files["val"])),
                *("--data.test_path", str(files["test"]), *args),
            ],
            run=False,
        )
        cli.trainer.fit(cli.model, cli.datamodule)
        checkpoint = workdir / "x.safetensors"
        cli.trainer.save_checkpoint(checkpoint)
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    finally:
        os.chdir(cwd)
    return {
        "dir": workdir,
        "checkpoint": checkpoint,
        "test_metrics": metrics,
        "files": files,
        "tokenizer": cli.datamodule.tokenizer,
    }


def demo_files(folder):
    return {
        s: write_jsonl(folder / f"{s}.jsonl", demo_rows(n, seed=i))
        for i, (s, n) in enumerate([("train", 96), ("val", 32), ("test", 40)])
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step tiny checkpoint, the folder it was trained in, and Lightning's test metrics on test.jsonl."""
    workdir = tmp_path_factory.mktemp("run")
    return fit_and_test(
        workdir, demo_files(workdir), "--model.arch", TINY, "--data.tokenizer_vocab_size", "200"
    )


def stored_tokenizer(checkpoint):
    return checkpoint_tokenizer(read_header(checkpoint)["state"], checkpoint)


def report_matches_test_metrics(run, out):
    code = main(
        [
            "--data",
            str(run["files"]["test"]),
            "--checkpoint",
            str(run["checkpoint"]),
            "--out",
            str(out),
            "--bootstrap",
            "0",
        ]
    )
    assert code == 0
    overall = json.loads((out / "metrics.json").read_text())["overall"]["detector"]
    for name in ("auroc", "f1", "acc", "tpr_at_1fpr"):
        assert overall[name] == pytest.approx(run["test_metrics"][f"test_{name}"], abs=1e-6), name
    assert overall["n"] == 40


def test_checkpoint_report_equals_lightning_test_metrics(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained["dir"])
    report_matches_test_metrics(trained, tmp_path / "report")


@pytest.mark.slow
def test_checkpoint_of_a_pretrained_backbone_folder_uses_its_tokenizer(saved_bundle, tmp_path, monkeypatch):
    # A local Hugging Face folder stands in for a hub id such as microsoft/deberta-v3-base (GPU config).
    run = fit_and_test(tmp_path, demo_files(tmp_path), "--model.pretrained", str(saved_bundle))
    monkeypatch.chdir(tmp_path)
    assert stored_tokenizer(run["checkpoint"]).get_vocab() == run["tokenizer"].get_vocab()
    assert not (tmp_path / "outputs" / "tokenizer").exists()  # no tokenizer was trained
    report_matches_test_metrics(run, tmp_path / "report")


def test_stored_tokenizer_is_the_training_tokenizer(trained):
    assert stored_tokenizer(trained["checkpoint"]).get_vocab() == trained["tokenizer"].get_vocab()


def test_evaluates_a_checkpoint_after_the_runs_tokenizer_folder_is_deleted(trained, tmp_path, monkeypatch):
    # A fresh machine: the run folder is copied without its tokenizer and evaluated from there.
    run_copy = tmp_path / "run"
    shutil.copytree(trained["dir"], run_copy)
    assert (run_copy / "outputs" / "tokenizer").is_dir()
    shutil.rmtree(run_copy / "outputs" / "tokenizer")
    monkeypatch.chdir(run_copy)
    copied = {
        **trained,
        "checkpoint": run_copy / "x.safetensors",
        "files": {split: run_copy / path.name for split, path in trained["files"].items()},
    }
    report_matches_test_metrics(copied, tmp_path / "report")
    assert not (run_copy / "outputs" / "tokenizer").exists()  # nothing was retrained or rewritten


def test_checkpoint_without_tokenizer_files_is_a_clear_error(trained, tmp_path, capsys):
    state = load_state(trained["checkpoint"])
    del state["DetectorDataModule"]
    checkpoint = tmp_path / "old.safetensors"
    save_state(state, checkpoint)
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(checkpoint))} holds no tokenizer files"):
        stored_tokenizer(checkpoint)
    code = main(
        [
            "--data",
            str(trained["files"]["test"]),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"detector evaluate: error: checkpoint {checkpoint} holds no tokenizer files" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_verb_reports_checkpoint_and_baseline_side_by_side(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained["dir"])
    out = tmp_path / "report"
    detector_main(
        [
            "evaluate",
            "--data",
            str(trained["files"]["test"]),
            "--checkpoint",
            str(trained["checkpoint"]),
            "--baseline-train",
            str(trained["files"]["train"]),
            "--out",
            str(out),
            "--bootstrap",
            "30",
            "--seed",
            "3",
        ]
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["overall"]) == ["detector", "tfidf_baseline"]
    assert report["settings"]["seed"] == 3 and report["settings"]["bootstrap"] == 30
    assert list(report["by_source"]) == ["demo"] and list(report["by_generator"]) == ["template-llm"]
    assert report["overall"]["tfidf_baseline"]["ci"]["auroc"] is not None


def test_bundle_scores_are_the_detectors(saved_bundle, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", demo_rows(24, seed=5))
    code = main(
        ["--data", str(data), "--bundle", str(saved_bundle), "--out", str(tmp_path / "r"), "--bootstrap", "0"]
    )
    assert code == 0
    rows = demo_rows(24, seed=5)
    probs = [r["prob_machine"] for r in load_detector(saved_bundle).score([str(r["text"]) for r in rows])]
    labels = np.array([r["label"] for r in rows])
    from detector.evaluation.metrics import point_metrics

    expected = point_metrics(np.array(probs), labels)
    overall = json.loads((tmp_path / "r" / "metrics.json").read_text())["overall"]["detector"]
    assert overall["auroc"] == pytest.approx(expected["auroc"]) and overall["ece"] == pytest.approx(
        expected["ece"]
    )


def test_score_checkpoint_batch_size_does_not_change_scores(trained, monkeypatch):
    monkeypatch.chdir(trained["dir"])
    texts = [str(r["text"]) for r in demo_rows(10, seed=9)]
    one = score_checkpoint(trained["checkpoint"], texts, batch_size=1)
    all_at_once = score_checkpoint(trained["checkpoint"], texts, batch_size=10)
    assert one.shape == (10,) and np.allclose(one, all_at_once, atol=1e-6)


def test_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data", "x.jsonl", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--checkpoint or --bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", "x.jsonl", "--out", str(tmp_path), "--checkpoint", "a", "--bundle", "b"])
    assert (
        main(
            ["--data", str(tmp_path / "missing.jsonl"), "--baseline-train", "t.jsonl", "--out", str(tmp_path)]
        )
        == 2
    )
    assert "no such data file" in capsys.readouterr().err
