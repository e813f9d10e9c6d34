import io
import json
import os
import re

import pytest
from bundle_helpers import TEXTS

import detector.atomic as atomic
from detector.bundle.loading import load_detector
from detector.commands.score import main


def _rows(text):
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def expected(saved_bundle):
    return load_detector(saved_bundle).score(TEXTS[:5])


def test_scores_a_jsonl_file_to_a_jsonl_file_with_ids(tmp_path, saved_bundle, expected):
    source = tmp_path / "texts.jsonl"
    lines = [json.dumps({"id": i, "text": t, "extra": 1}) for i, t in enumerate(TEXTS[:5])]
    source.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    assert (
        main([str(saved_bundle), str(source), "--output", str(tmp_path / "out.jsonl"), "--batch-size", "2"])
        == 0
    )
    rows = _rows((tmp_path / "out.jsonl").read_text())
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(set(r) == {"id", "prob_machine", "label", "is_machine"} for r in rows)
    assert [r["prob_machine"] for r in rows] == pytest.approx([e["prob_machine"] for e in expected], abs=1e-6)
    assert [r["label"] for r in rows] == ["machine" if r["is_machine"] else "human" for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "texts.jsonl"]


def test_scores_stdin_to_stdout(saved_bundle, expected, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:5])))
    assert main([str(saved_bundle), "-"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert all("id" not in r for r in rows)
    assert [r["prob_machine"] for r in rows] == pytest.approx([e["prob_machine"] for e in expected], abs=1e-6)


def test_scores_csv_and_text_files(tmp_path, saved_bundle, expected, capsys):
    (tmp_path / "t.csv").write_text("id,text\n" + "".join(f'x{i},"{t}"\n' for i, t in enumerate(TEXTS[:5])))
    (tmp_path / "t.txt").write_text("".join(t + "\n" for t in TEXTS[:5]))
    for name in ("t.csv", "t.txt"):
        assert main([str(saved_bundle), str(tmp_path / name)]) == 0
        rows = _rows(capsys.readouterr().out)
        assert [r.get("id") for r in rows] == ([f"x{i}" for i in range(5)] if name == "t.csv" else [None] * 5)
        assert [r["prob_machine"] for r in rows] == pytest.approx(
            [e["prob_machine"] for e in expected], abs=1e-6
        )


def test_threshold_override_sets_the_labels(tmp_path, saved_bundle, capsys):
    (tmp_path / "t.txt").write_text("".join(t + "\n" for t in TEXTS[:5]))
    assert main([str(saved_bundle), str(tmp_path / "t.txt"), "--threshold", "0"]) == 0
    assert {r["label"] for r in _rows(capsys.readouterr().out)} == {"machine"}
    assert main([str(saved_bundle), str(tmp_path / "t.txt"), "--threshold", "1"]) == 0
    assert {r["label"] for r in _rows(capsys.readouterr().out)} == {"human"}


def test_onnx_backend_scores_like_torch(tmp_path, saved_onnx_bundle, capsys):
    (tmp_path / "t.txt").write_text("".join(t + "\n" for t in TEXTS[:5]))
    outputs = []
    for backend in ("torch", "onnx"):
        assert main([str(saved_onnx_bundle), str(tmp_path / "t.txt"), "--backend", backend]) == 0
        outputs.append([r["prob_machine"] for r in _rows(capsys.readouterr().out)])
    assert outputs[1] == pytest.approx(outputs[0], abs=1e-5)


def test_bad_line_fails_with_its_number_and_leaves_no_output(tmp_path, saved_bundle, capsys):
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert main([str(saved_bundle), str(tmp_path / "t.jsonl"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "line 2 has no string field 'text' (has ['body'])" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.jsonl", "plain words\n", "line 1 is not JSON"),
        ("t.csv", "body\nx\n", "no column 'text'"),
        ("t.dat", "x\n", "pass --format"),
    ],
)
def test_unreadable_input_is_explained(tmp_path, saved_bundle, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    assert main([str(saved_bundle), str(tmp_path / name)]) == 2
    assert message in capsys.readouterr().err


def test_bad_options_exit_with_usage(saved_bundle):
    with pytest.raises(SystemExit) as exit_info:
        main([str(saved_bundle), "-", "--threshold", "1.5"])
    assert exit_info.value.code == 2


def test_output_file_is_written_under_a_hidden_temp_name_then_renamed(tmp_path, saved_bundle, monkeypatch):
    real, temps = atomic.commit_file, []

    def spy(tmp, final):
        temps.append(tmp.name)
        real(tmp, final)

    monkeypatch.setattr(atomic, "commit_file", spy)
    (tmp_path / "t.txt").write_text("".join(t + "\n" for t in TEXTS[:3]))
    assert main([str(saved_bundle), str(tmp_path / "t.txt"), "-o", str(tmp_path / "out.jsonl")]) == 0
    [temp] = temps
    assert re.fullmatch(rf"\.out\.jsonl\.tmp-{os.getpid()}-[0-9a-f]{{8}}", temp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "t.txt"]
    assert len(_rows((tmp_path / "out.jsonl").read_text())) == 3
