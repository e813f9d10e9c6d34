"""The layout holds: the checkpoint library imports nothing of the application; old class paths load."""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

import pytest

CHECKPOINT = Path(__file__).resolve().parents[1] / "detector" / "checkpoint"
# NumPy arrays are part of a state (its RNG); typing_extensions and fsspec (object stores): with Lightning.
ALLOWED_THIRD_PARTY = {"torch", "numpy", "lightning", "safetensors", "typing_extensions", "xxhash", "fsspec"}
ALLOWED_OWN = {"detector.atomic", "detector.checkpoint"}


def imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
    return modules


def is_allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY:
        return True
    return any(module == own or module.startswith(own + ".") for own in ALLOWED_OWN)


def test_checkpoint_package_imports_only_torch_lightning_safetensors_and_atomic():
    files = sorted(CHECKPOINT.glob("*.py"))
    assert len(files) > 10
    offending = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if not is_allowed(module)
    }
    assert offending == set()


def test_import_rule_catches_an_application_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from detector.loader import apply_pending_loader_states\nimport pandas\nimport os\n")
    assert [m for m in imported_modules(bad) if not is_allowed(m)] == ["detector.loader", "pandas"]


@pytest.mark.parametrize(
    ("old", "new", "name"),
    [
        ("detector.checkpoint_io", "detector.checkpoint.plugin", "SafetensorsCheckpointIO"),
        ("detector.model_parallel", "detector.checkpoint.strategy", "SafetensorsModelParallelStrategy"),
    ],
)
def test_old_class_paths_still_load_with_a_warning_naming_the_new_module(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = __import__(old, fromlist=[name])
    assert getattr(module, name).__module__ == new
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        f"{old} moved to {new}; update the class path"
    ]
