"""Manifests: relative paths, labels, and source-level errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.core.errors import DataError, UserInputError
from modalign.data.manifest import read_manifest

from helpers.data import write_manifest

MODS = ["image", "audio", "text"]


def error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_manifest(path, MODS)
    assert isinstance(info.value, UserInputError)  # exit status 2
    return str(info.value)


def test_jsonl_paths_relative_to_manifest_and_labels(tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "sub" / "m.jsonl",
        [
            {"id": "a", "image": "img/a.png", "text": "hi", "label": 3},
            {"id": "b", "audio": "/abs/b.wav"},
        ],
    )
    rows = read_manifest(path, MODS).rows
    assert rows[0].values["image"] == str((tmp_path / "sub" / "img" / "a.png").resolve())
    assert rows[0].label == "3" and rows[1].label is None
    assert rows[1].values == {"audio": "/abs/b.wav"}
    assert [r.line for r in rows] == [1, 2]


def test_csv_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("\ufeffid,image,text,label\na,x.png,hello,cat\nb,,hi,\n")
    rows = read_manifest(tmp_path / "m.csv", MODS).rows  # BOM from Excel is fine
    assert [r.id for r in rows] == ["a", "b"] and rows[1].values == {"text": "hi"}
    assert rows[0].label == "cat" and rows[1].label is None
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["p"], "text": ["t"], "label": [7]})
    pq.write_table(table, tmp_path / "m.parquet")
    row = read_manifest(tmp_path / "m.parquet", MODS).rows[0]
    assert (row.id, row.label, row.values) == ("p", "7", {"text": "t"})


def test_row_without_modality_is_skipped_and_counted(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "label": 1}])
    manifest = read_manifest(path, MODS)
    assert len(manifest.rows) == 1 and manifest.skipped == {"no_modality": 1}
    assert f"{path}:2" in manifest.skipped_examples[0]


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "broken\n')
    assert f"{path}:3" in error(path)
    path.write_text('["not", "an", "object"]\n')
    assert f"{path}:1" in error(path)
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1 byte
    assert f"{path}:2" in error(path) and "UTF-8" in error(path)


def test_csv_short_row_long_row_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,image,text\na,x.png,hi\nb,y.png\n")
    msg = error(path)
    assert f"{path}:3" in msg and "2 fields" in msg and "3" in msg
    path.write_text("id,image,text\na,x.png,hi,extra\n")
    assert f"{path}:2" in error(path) and "4 fields" in error(path)
    path.write_text("id,caption\na,hi\n")  # no modality column at all
    assert f"{path}:1" in error(path) and "caption" in error(path)


def test_unusable_manifests_fail_at_once(tmp_path: Path) -> None:
    empty = write_manifest(tmp_path / "e.jsonl", [{"id": "a"}, {"id": "b", "label": "x"}])
    assert "no usable rows" in error(empty)
    assert "not found" in error(tmp_path / "missing.jsonl")
    (tmp_path / "m.txt").write_text("x")
    assert "unknown manifest type" in error(tmp_path / "m.txt")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    assert "bad.parquet" in error(tmp_path / "bad.parquet")
