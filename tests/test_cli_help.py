"""`python -m detector fit --help` documents every argument of ours (docstrings with `Args:`)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import pytest
from lightning.pytorch.callbacks import Callback

import callbacks
from detector.__main__ import main

OUR_GROUPS = ("model", "data", "checkpoint", "prediction_writer", "summary")
SUBCLASS_HELP = {
    "trainer.strategy": ["detector.checkpoint.strategy.SafetensorsModelParallelStrategy"],
    "trainer.plugins": ["detector.checkpoint.plugin.SafetensorsCheckpointIO"],
}


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _descriptions(text: str, prefix: str) -> dict[str, str]:
    """``{option: its help text without the "(type: ..., default: ...)" tail}`` for options under prefix."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("  --"):
            option, _, rest = line.strip().partition("  ")
            name = option.split()[0]
            current = entries.setdefault(name, []) if name.startswith(f"--{prefix}.") else None
            if current is not None:
                current.append(rest)
        elif current is not None and line.startswith("          "):
            current.append(line)
        else:
            current = None
    tail = re.compile(r"\(type: .*\)$|\(default: .*\)$", re.S)
    return {name: tail.sub("", " ".join(parts).strip()).strip() for name, parts in entries.items()}


def _our_callbacks() -> list[str]:
    found = []
    for info in pkgutil.iter_modules(callbacks.__path__):
        module = importlib.import_module(f"callbacks.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Callback) and cls.__module__ == module.__name__:
                found.append(f"{cls.__module__}.{cls.__qualname__}")
    return sorted(found)


def test_every_argument_of_ours_in_fit_help_has_help_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help(["fit", "--help"], capsys)
    for group in OUR_GROUPS:
        described = _descriptions(text, group)
        assert described, f"no --{group}.* options in fit --help"
        assert [name for name, words in described.items() if not words] == [], group
    assert "AdamW peak learning rate" in _descriptions(text, "model")["--model.learning_rate"]


@pytest.mark.parametrize("class_path", _our_callbacks())
def test_every_callback_argument_has_help_text(class_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    described = _descriptions(
        _help(["fit", "--trainer.callbacks.help", class_path], capsys), "trainer.callbacks"
    )
    assert [name for name, words in described.items() if not words] == []


@pytest.mark.parametrize(("option", "class_path"), [(o, c) for o, cs in SUBCLASS_HELP.items() for c in cs])
def test_strategy_and_plugin_arguments_have_help_text(option, class_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    described = _descriptions(_help(["fit", f"--{option}.help", class_path], capsys), option)
    assert [name for name, words in described.items() if not words] == []


def test_the_callbacks_checked_are_all_of_ours():
    assert _our_callbacks() == [
        "callbacks.ema.EMACallback",
        "callbacks.inference_export.InferenceExportCallback",
        "callbacks.plain_progress.PlainProgress",
        "callbacks.prediction_writer.PredictionWriter",
        "callbacks.run_summary.RunSummary",
        "callbacks.safetensors_checkpoint.SafetensorsTopKCheckpoint",
    ]


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub)
        elif not isinstance(action, argparse._HelpAction):
            yield action


@pytest.mark.parametrize("verb", ["checkpoints", "export", "score", "evaluate"])
def test_every_argument_of_the_tool_verbs_has_help_text(verb):
    module = importlib.import_module(f"detector.commands.{verb}")
    parser = (getattr(module, "build_parser", None) or module._parser)()
    assert [a.dest for a in _actions(parser) if not a.help] == []
