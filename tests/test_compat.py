"""Private Lightning/PyTorch internals are touched in detector.checkpoint.compat only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPAT = Path("detector/checkpoint/compat.py")
# The state dict's own field (see the note in compat), not an internal reached for.
STATE_DICT_FIELDS = {"_metadata"}


def _private_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("torch", "lightning"):
            parts = [*node.module.split("."), *(alias.name for alias in node.names)]  # type: ignore[union-attr]
            if any(part.startswith("_") and not part.startswith("__") for part in parts):
                found.append(f"{path}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if (
                isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            ) or node.attr in STATE_DICT_FIELDS:
                continue
            found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_private_internals_are_used_only_in_the_compat_module():
    sources = sorted(
        p.relative_to(ROOT) for folder in ("detector", "callbacks") for p in (ROOT / folder).rglob("*.py")
    )
    outside = [use for path in sources if path != COMPAT for use in _private_uses(path)]
    assert outside == []
    assert len(_private_uses(COMPAT)) >= 8  # the scan sees them where they are


def test_every_compat_entry_says_why_and_for_which_version():
    import detector.checkpoint.compat as compat

    for name in compat.__all__:
        obj = getattr(compat, name)
        if callable(obj) and name != "PathLike":
            doc = obj.__doc__ or ""
            assert "torch" in doc or "Lightning" in doc, name
            assert any(v in doc for v in ("2.6", "2.13")), name
