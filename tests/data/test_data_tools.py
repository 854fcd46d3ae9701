"""Library functions behind ``modalign data inspect|pack|avmnist``."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from modalign.core.artifact import LOCK_FILE
from modalign.core.errors import DataError
from modalign.data.corpora.avmnist import build_avmnist, read_idx
from modalign.data.inspect import inspect_source
from modalign.data.manifest import read_manifest
from modalign.data.pack import pack_shards

from helpers.corpus import SHARED_DATA, write_tiny_corpus
from helpers.data import jpeg_bytes, png_bomb, png_bytes, wav_bytes, write_manifest

CONTRACT = {"items", "ok", "bad", "bad_by_reason", "modalities"}


def broken_corpus(root: Path) -> Path:
    """One row per kind of bad input, plus good rows; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "good.png": png_bytes(),
        "good.wav": wav_bytes(),
        "empty.png": b"",
        "trunc.jpg": jpeg_bytes(64)[:300],
        "bomb.png": png_bomb(),
        "badheader.wav": b"JUNK" + wav_bytes()[4:],  # no RIFF/RIFX: unreadable, not truncated
        "silent.wav": wav_bytes(np.zeros(4000)),
        "nan.wav": wav_bytes(np.full(4000, np.nan), subtype="FLOAT"),
        "fast.wav": wav_bytes(sr=44100),
        "clip.xyz": b"???",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    rows = [
        {"id": "good", "image": "good.png", "audio": "good.wav", "text": "fine", "label": "a"},
        {"id": "missing", "image": "gone.png", "text": "x"},
        {"id": "empty", "image": "empty.png"},
        {"id": "trunc", "image": "trunc.jpg"},
        {"id": "bomb", "image": "bomb.png"},
        {"id": "header", "audio": "badheader.wav"},
        {"id": "silent", "audio": "silent.wav"},
        {"id": "nan", "audio": "nan.wav"},
        {"id": "rate", "audio": "fast.wav", "label": "b"},
        {"id": "ext", "audio": "clip.xyz"},
        {"id": "nothing", "label": "c"},
    ]
    return write_manifest(root / "m.jsonl", rows)


EXPECTED_REASONS = {
    "missing_file": 1,
    "empty_file": 1,
    "corrupt_image": 1,
    "image_too_large": 1,
    "unreadable_audio": 1,
    "silent_audio": 1,
    "nan_audio": 1,
    "unknown_extension": 1,
    "no_modality": 1,
}


def test_inspect_counts_every_bad_input_by_reason(tmp_path: Path) -> None:
    report = inspect_source(broken_corpus(tmp_path / "c"))
    json.dumps(report)  # the CLI prints it as is
    assert set(report) >= CONTRACT
    assert report["items"] == 11 and report["ok"] == 2 and report["bad"] == 9
    assert report["bad_by_reason"] == EXPECTED_REASONS
    assert report["modalities"] == {"image": 1, "audio": 2, "text": 2}
    assert report["audio_sample_rates"] == {"8000": 1, "44100": 1}
    bomb = next(e for e in report["examples"] if e["reason"] == "image_too_large")
    assert "bomb.png" in bomb["detail"] and bomb["item"].endswith("m.jsonl:5")


def test_pack_then_inspect_shards(tmp_path: Path) -> None:
    manifest = broken_corpus(tmp_path / "c")
    out = tmp_path / "shards"
    pack_shards(manifest, out, shard_size=1)  # an earlier pack: the folder is a shard folder
    (out / "shard-000007.tar").write_bytes(b"stale")  # from an earlier, larger pack
    result = pack_shards(manifest, out, shard_size=1)
    # rows "good" and "rate" keep everything; "missing" keeps its text
    assert result["written"] == 3 and result["shards"] == 3 and result["items"] == 11
    assert result["bad"] == 8 and result["bad_by_reason"] == EXPECTED_REASONS
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert result["removed_stale"] == ["shard-000007.tar"]
    report = inspect_source(result["pattern"])
    assert (report["items"], report["ok"], report["bad"]) == (3, 3, 0)
    assert report["modalities"] == {"image": 1, "audio": 2, "text": 2}
    assert report["labels"] == {"a": 1, "b": 1}
    assert json.loads((out / "index.json").read_text())["counts"] == [1, 1, 1]


def test_pack_round_trip_keeps_ids_labels_and_bytes(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=10)
    result = pack_shards(manifest, tmp_path / "s", shard_size=4)
    assert result["pattern"].endswith("shard-{000000..000002}.tar") and result["written"] == 10
    from modalign.data.shards import expand_shards, iter_shard

    raw = [r for url in expand_shards(result["pattern"]) for r in iter_shard(url)]
    rows = read_manifest(manifest, ["image", "audio", "text"]).rows
    assert [json.loads(r["json"])["id"] for r in raw] == [r.id for r in rows]
    assert raw[3]["png"] == Path(rows[3].values["image"]).read_bytes()
    assert raw[3]["txt"].decode() == rows[3].values["text"]
    assert not list((tmp_path / "s").glob(".*tmp*"))  # no temp file left behind
    with pytest.raises(DataError):
        pack_shards(manifest, tmp_path / "s", shard_size=0)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_sources(root: Path) -> tuple[Path, Path]:
    mnist, fsdd = root / "mnist", root / "fsdd" / "recordings"
    mnist.mkdir(parents=True)
    fsdd.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 30)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 255, (n, 28, 28)) // 2 + (labels[:, None, None] * 12)
        write_idx(mnist / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(mnist / f"{split}-labels-idx1-ubyte.gz", labels)
    for digit in range(10):
        for take in (0, 3, 5, 9):
            (fsdd / f"{digit}_alice_{take}.wav").write_bytes(wav_bytes())
    (fsdd / "README.txt").write_text("not a recording")
    return mnist, root / "fsdd"


def test_avmnist_pairs_by_digit_without_leaking_splits(tmp_path: Path) -> None:
    mnist, fsdd = fake_sources(tmp_path)
    result = build_avmnist(mnist, fsdd, tmp_path / "out", seed=1, images_per_recording=2)
    assert result["items"] == {"train": 40, "test": 40}
    train = [json.loads(x) for x in Path(result["train"]).read_text().splitlines()]
    test = [json.loads(x) for x in Path(result["test"]).read_text().splitlines()]
    labels = {
        "train": read_idx(mnist / "train-labels-idx1-ubyte.gz"),
        "test": read_idx(mnist / "t10k-labels-idx1-ubyte.gz"),
    }
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for split, rows in (("train", train), ("test", test)):
        for row in rows:
            assert row["label"] == words[row["digit"]] and row["label"] in row["text"]
            assert row["image"].startswith(f"images/{split}-")
            index = int(row["image"].split("-")[1].split(".")[0])
            assert labels[split][index] == row["digit"]  # image shows the spoken digit
            assert (row["take"] < 5) == (split == "test")
            assert (tmp_path / "out" / row["audio"]).is_file()
    assert len({r["text"] for r in train}) > 5  # captions vary
    report = inspect_source(result["test"])
    assert report["ok"] == 40 and report["modalities"] == {"image": 40, "audio": 40, "text": 40}
    with pytest.raises(DataError, match="MNIST file not found"):
        build_avmnist(tmp_path, fsdd, tmp_path / "o2")


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"needs real data at {SHARED_DATA}")
def test_avmnist_from_real_data(tmp_path: Path) -> None:
    result = build_avmnist(SHARED_DATA / "mnist", SHARED_DATA / "fsdd", tmp_path, seed=0)
    assert result["items"] == {"train": 2700, "test": 300} and result["wall_s"] < 30
    report = inspect_source(result["test"])
    assert report["ok"] == 300 and report["audio_sample_rates"] == {"8000": 300}
    assert len(report["labels"]) == 10


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"needs real data at {SHARED_DATA}")
def test_inspect_real_cifar_shard() -> None:
    report = inspect_source(SHARED_DATA / "cifar10" / "test-000001.tar")
    assert (report["items"], report["ok"], report["bad"]) == (5000, 5000, 0)
    assert report["image_size"] == {"min": [32, 32], "max": [32, 32]}
    assert sorted(report["labels"]) == [str(i) for i in range(10)]
