"""Periodic validation during pretraining: Recall@K per pair, without changing training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from modalign.config import load_config
from modalign.pretrain.trainer import pretrain

from conftest import tiny_overrides, write_tiny_corpus


def test_validation_logs_recall_and_leaves_training_unchanged(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=16)
    base = [
        *tiny_overrides(manifest, tmp_path / "plain", steps=4, batch=8),
        "data.audio.spec_augment=true",
    ]
    pretrain(load_config(None, base))
    with_val = [
        *tiny_overrides(manifest, tmp_path / "val", steps=4, batch=8),
        "data.audio.spec_augment=true",
        f"data.val={manifest}",
        "train.val_every=2",
    ]
    result = pretrain(load_config(None, with_val))
    records = [
        json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()
    ]
    vals = [r for r in records if "val" in r]
    assert [r["step"] for r in vals] == [2, 4]
    pairs = vals[-1]["val"]
    assert set(pairs) == {
        f"{a}->{b}"
        for a in ("audio", "image", "text")
        for b in ("audio", "image", "text")
        if a != b
    }
    for m in pairs.values():
        assert 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0
    assert any("val" in h for h in result.history)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "val" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation drew no training randomness
