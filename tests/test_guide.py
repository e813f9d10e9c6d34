"""Every block of docs/model_saving_guide.md marked runnable runs as written, in order, in one folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "model_saving_guide.md"
BLOCK = re.compile(r"^```(bash|python) runnable\n(.*?)^```$", re.DOTALL | re.MULTILINE)
pytestmark = pytest.mark.slow


def runnable_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of each fenced block marked ``bash runnable`` or ``python runnable``."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


BLOCKS = runnable_blocks(GUIDE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guide")
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def test_extraction_finds_only_marked_blocks():
    text = "```bash runnable\necho a\n```\n```bash\necho b\n```\n```python runnable\nprint(1)\n```\n"
    assert runnable_blocks(text) == [("bash", "echo a\n"), ("python", "print(1)\n")]
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize(("index", "block"), list(enumerate(BLOCKS)), ids=lambda v: str(v)[:20])
def test_runnable_block_runs(workdir, index, block):
    language, code = block
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"block {index} failed:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    if "corrupt.safetensors" in code:
        assert "FAILED corrupt.safetensors: checksum mismatch" in done.stdout
        assert "verify failed with exit status 1" in done.stdout


def test_the_guide_produced_what_it_describes(workdir):
    checkpoints = workdir / "outputs" / "checkpoints"
    assert (checkpoints / "checkpoint_best_val_f1.safetensors").is_file()
    summary = json.loads((workdir / "outputs" / "summary.json").read_text())
    assert summary["global_step"] == 18  # resumed to epoch 3: 6 steps an epoch
    assert {Path(p).name for p in summary["bundles"]} >= {"model_v1.0_final"}
    inference = workdir / "outputs" / "models" / "inference"
    assert (inference / "model_v1.0_final_step12").is_dir()  # the first run's final bundle, kept
    scores = [json.loads(line) for line in (workdir / "scores.jsonl").read_text().splitlines()]
    assert [row["id"] for row in scores] == [1]
    assert set(scores[0]) == {"id", "prob_machine", "label", "is_machine"}
