"""Detect machine-written text with a fine-tuned DeBERTa classifier."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# Modules that users name in YAML (class paths) from before the subsystem packages: still importable.
MOVED_MODULES = {
    "detector.checkpoint_io": "detector.checkpoint.plugin",
    "detector.model_parallel": "detector.checkpoint.strategy",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module that now holds its classes, with a warning naming it."""

    def find_spec(
        self, name: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED_MODULES[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; update the class path", FutureWarning, stacklevel=2)
        # The import system returns what sys.modules holds after exec_module: the module itself.
        sys.modules[module.__name__] = importlib.import_module(new)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
