"""A new modality ("depth") is added without touching trainer code: a ModalitySpec (decoder,
placeholder) plus a tower builder, passed to ``pretrain`` and to ``load_bundle``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.data.decode import BadItem
from modalign.data.modality import ModalitySpec
from modalign.pretrain import TowerConfig
from modalign.pretrain.bundle import load_bundle
from modalign.pretrain.towers import TowerParts
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

SIDE = 16


def load_depth(source: str, train: bool, rng: np.random.Generator) -> torch.Tensor:
    """A .npy depth map -> (1, 16, 16) float tensor; random flips while training."""
    try:
        depth = np.load(source, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise BadItem("unreadable_depth", str(exc)) from None
    if depth.shape != (SIDE, SIDE):
        raise BadItem("bad_depth_shape", f"expected {(SIDE, SIDE)}, got {depth.shape}")
    if train and rng.random() < 0.5:
        depth = depth[:, ::-1].copy()
    return torch.from_numpy(depth).unsqueeze(0)


DEPTH = ModalitySpec("depth", load_depth, torch.zeros(1, SIDE, SIDE), extensions=("npy",))


def depth_cnn(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return TowerParts(nn.Identity(), trunk, 16)


def _depth_corpus(root: Path) -> Path:
    """The tiny corpus plus a class-dependent depth map per row (every 5th row has none)."""
    manifest = write_tiny_corpus(root, n=24)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    (root / "depth").mkdir()
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        if i % 5 == 4:
            continue
        label = ["zero", "one", "two", "three"].index(row["label"])
        depth = rng.normal(size=(SIDE, SIDE)).astype(np.float32) * 0.1
        depth[:, label * 4 : label * 4 + 4] += 1.0
        np.save(root / "depth" / f"{i}.npy", depth)
        row["depth"] = f"depth/{i}.npy"
    out = root / "with_depth.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _depth_config(manifest: Path, out: Path, steps: int, *extra: str):
    """The tiny config with an image + depth model (depth tower from the custom builder)."""
    return load_config(
        None,
        [
            *tiny_overrides(manifest, out, steps=steps, batch=8),
            "model.modalities=[image,depth]",
            "model.towers.depth.kind=depth_cnn_local",
            *extra,
        ],
    )


def test_depth_modality_trains_and_its_bundle_encodes(tmp_path: Path) -> None:
    manifest = _depth_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    cfg = _depth_config(manifest, out, 3, "train.threads=1")
    result = pretrain(
        cfg, tower_builders={"depth_cnn_local": depth_cnn}, modalities={"depth": DEPTH}
    )
    assert result.steps == 3 and np.isfinite(result.final_loss)
    assert all("image__depth" in r["logit_scale"] or "depth__image" in r["logit_scale"]
               for r in result.history)  # fmt: skip

    model = load_bundle(
        out, tower_builders={"depth_cnn_local": depth_cnn}, modalities={"depth": DEPTH}
    )
    assert model.modalities == ["image", "depth"]
    files = sorted((tmp_path / "corpus" / "depth").glob("*.npy"))[:3]
    emb = model.encode(depth=[str(f) for f in files], image=[str(tmp_path / "corpus/img/0.png")])
    assert emb["depth"].shape == (3, 16) and emb["image"].shape == (1, 16)
    torch.testing.assert_close(emb["depth"].norm(dim=-1), torch.ones(3))


def test_bundle_with_custom_tower_needs_its_builder(tmp_path: Path) -> None:
    manifest = _depth_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    cfg = _depth_config(manifest, out, 1, "train.checkpoint_every=0")
    pretrain(cfg, tower_builders={"depth_cnn_local": depth_cnn}, modalities={"depth": DEPTH})
    with pytest.raises(ConfigError, match="tower_builders"):
        load_bundle(out)
