import json

import pandas as pd
import pytest

from detector.records import DataError, parse_label, read_records


def test_reads_jsonl_csv_and_parquet_alike(tmp_path):
    rows = [
        {"text": "a human wrote this", "label": "human", "source": "xsum", "generator": "human"},
        {"text": "a model wrote this", "label": 1, "source": "xsum", "generator": "gpt-4"},
        {"text": "another, with a comma", "label": "0", "source": "squad", "generator": "human"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).astype(str).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).astype(str).to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        records = read_records(tmp_path / name)
        assert records.text == [r["text"] for r in rows]
        assert records.label == [0, 1, 0]
        assert records.extra == {
            "source": ["xsum", "xsum", "squad"],
            "generator": ["human", "gpt-4", "human"],
        }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"label": 1}', r"d.jsonl:2: missing column 'text'"),
        ('{"text": "x"}', r"d.jsonl:2: missing column 'label'"),
        ('{"text": "x", "label": 2}', r"d.jsonl:2: label must be 0/1 or human/machine, got 2"),
        ('{"text": "x", "label": "robot"}', r"d.jsonl:2: label must be 0/1 or human/machine, got 'robot'"),
        ('{"text": "   ", "label": 1}', r"d.jsonl:2: empty text"),
        ('{"text": "x", "label": 1', r"d.jsonl:2: invalid JSON"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": 0}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_records(path)


def test_bad_csv_row_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nfine,0\n"two\nlines",1\nbad,7\n')
    with pytest.raises(DataError, match=r"d.csv:5: label must be 0/1"):
        read_records(path)


def test_bad_parquet_row_names_its_row(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["ok", ""], "label": [0, 1]}).to_parquet(path)
    with pytest.raises(DataError, match=r"d.parquet: row 2: empty text"):
        read_records(path)


def test_unlabelled_rows_allowed_for_prediction_only(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "score me"}\n{"text": "me too", "label": "machine"}\n')
    assert read_records(path, require_label=False).label == [None, 1]
    with pytest.raises(DataError, match="missing column 'label'"):
        read_records(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_records(tmp_path / "d.txt")


def test_parse_label_rejects_bools():
    with pytest.raises(DataError):
        parse_label(True, "here")
    assert parse_label(" Machine ", "here") == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_bytes_name_file_and_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    head = b'{"text": "fine", "label": 0}\n' if suffix == ".jsonl" else b"text,label\nfine,0\n"
    bad = b'{"text": "caf\xe9", "label": 1}\n' if suffix == ".jsonl" else b"caf\xe9,1\n"
    path.write_bytes(head + bad)
    line = 2 if suffix == ".jsonl" else 3
    with pytest.raises(DataError, match=rf"d{suffix}:{line}: not UTF-8 text \(byte e9 at offset"):
        read_records(path)


def test_csv_row_with_an_extra_field_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,0\nhello, world,1\n")
    with pytest.raises(DataError, match=r"d.csv:3: 1 more field\(s\) than the header's 2 columns"):
        read_records(path)
