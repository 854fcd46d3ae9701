"""The README's main job: `modalign demo` end to end, as a user runs it (slow: ~2-3 min)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modalign.data.corpora.demo import build_demo_corpus


def test_build_demo_corpus_small(tmp_path: Path) -> None:
    corpus = build_demo_corpus(tmp_path / "c", limit=40, workers=1)
    train = [json.loads(line) for line in corpus.train.read_text().splitlines()]
    test = [json.loads(line) for line in corpus.test.read_text().splitlines()]
    assert len(train) + len(test) == 40 and test
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    for row in train + test:
        assert (corpus.root / row["image"]).is_file() and (corpus.root / row["audio"]).is_file()
        assert row["label"] in row["text"]
    # voice/rate/pitch vary per item: two clips of the same word differ
    sevens = [r for r in train + test if r["label"] == "seven"][:2]
    if len(sevens) == 2:
        a, b = ((corpus.root / r["audio"]).read_bytes() for r in sevens)
        assert a != b
    again = build_demo_corpus(tmp_path / "d", limit=40, workers=2)  # same corpus, any worker count
    assert again.train.read_text() == corpus.train.read_text()
    assert (tmp_path / "d" / train[0]["audio"]).read_bytes() == (
        corpus.root / train[0]["audio"]
    ).read_bytes()


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.distributed  # `modalign demo` in a subprocess
def test_demo_end_to_end(tmp_path: Path) -> None:
    exe = shutil.which("modalign") or f"{sys.executable} -m modalign"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*exe.split(), "demo", "--out", str(tmp_path / "demo"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout[-2000:]
    report = json.loads(lines[0])
    pairs = report["retrieval"]["pairs"]
    assert pairs["audio->image"]["recall@1"] >= 0.9
    assert pairs["image->audio"]["recall@1"] >= 0.9
    fused = report["classify"]["fused"]
    assert fused["by_subset"]["audio+image"] >= 0.9
    assert set(report["classify"]["labels_only"]["by_subset"]) == {"audio+image", "audio", "image"}
    assert report["wall_s"] > 0
    assert report["serve_command"].startswith("modalign serve --index ")
    assert "modalign serve --index" in (Path(report["out"]) / "report.md").read_text()
    # the value of pretraining: labels only from scratch < pretrained + pseudo-labels (same k)
    rows = report["value"]["rows"]
    (scratch,) = [r for r in rows if "scratch" in r["setting"]]
    (pseudo,) = [r for r in rows if "pseudo" in r["setting"] and r["shots"] == scratch["shots"]]
    assert scratch["accuracy"]["ci_high"] < pseudo["accuracy"]["value"]
    assert {r["shots"] for r in rows} >= {1, scratch["shots"]}
    assert min(r["accuracy"]["value"] for r in rows) < 1.0  # no longer 1.000 across the board
    assert set(report["value"]["missing_modality"]) == {"audio+image", "audio", "image"}
    for r in rows:
        assert r["accuracy"]["ci_low"] <= r["accuracy"]["value"] <= r["accuracy"]["ci_high"]
    out = tmp_path / "demo"
    md = (out / "report.md").read_text()
    assert md.startswith("# modalign demo report") and "towers from scratch" in md
    assert (out / "benchmark" / "report.json").is_file()
    assert (out / "loss.png").stat().st_size > 5000
    for name in ("model/model.safetensors", "classifier/head.safetensors", "index/index.json"):
        assert (out / name).is_file(), name
