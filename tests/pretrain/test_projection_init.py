"""``model.towers.<m>.projection_init``: label-free starts of the projection head (issue 20)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.data.sources import open_eval_source
from modalign.pretrain import TowerConfig, load_bundle, pca_projection
from modalign.pretrain.config import ModelConfig
from modalign.pretrain.model import build_encoder
from modalign.pretrain.towers import TowerParts
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus


def _toy(width: int):
    def build(cfg: TowerConfig, data: DataConfig) -> TowerParts:
        torch.manual_seed(1)
        return TowerParts(nn.Identity(), nn.Sequential(nn.Linear(5, width), nn.ReLU()), width)

    return {"toy": build}


def _model(embed_dim: int, width: int = 6, **tower: object):
    cfg = ModelConfig(
        modalities=["a"], embed_dim=embed_dim, towers={"a": TowerConfig(kind="toy", **tower)}
    )
    return build_encoder(cfg, DataConfig(), _toy(width)).encoder


def test_identity_head_makes_the_shared_space_the_trunks_own() -> None:
    enc = _model(6, projection_init="identity")
    x = torch.randn(4, 5)
    expected = F.normalize(enc.trunks["a"](x), dim=-1)
    assert torch.allclose(enc.encode("a", x), expected, atol=1e-6)
    # the default keeps torch's random init
    assert not torch.allclose(_model(6).encode("a", x), expected, atol=1e-3)


def test_impossible_inits_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.towers\.a\.projection_init.*embed_dim=6"):
        _model(4, projection_init="identity")
    with pytest.raises(ConfigError, match="more than the a trunk's width"):
        _model(8, projection_init="pca")
    with pytest.raises(ConfigError, match="head=linear"):
        _model(4, projection_init="pca_whiten", head="mlp")
    with pytest.raises(ConfigError):  # not a known kind: the config loader says so
        load_config(None, ["model.towers.image.projection_init=orthogonal"])


def test_pca_projection_centres_decorrelates_and_whitens() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = (
        torch.randn(200, 8, generator=gen, dtype=torch.float64)
        @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
        + 3.0
    )
    w, b = pca_projection(feats, 3, whiten=True)
    z = feats @ w.T + b
    assert torch.allclose(z.mean(0), torch.zeros(3, dtype=z.dtype), atol=1e-9)
    assert torch.allclose(torch.cov(z.T), torch.eye(3, dtype=z.dtype), atol=1e-9)
    w0, b0 = pca_projection(feats, 3, whiten=False)
    var = torch.cov((feats @ w0.T + b0).T).diagonal()
    assert bool((var[:-1] >= var[1:]).all())  # top components first
    total = torch.cov(feats.T).trace()
    assert float(var.sum() / total) > 0.5
    # sign convention: the largest loading of each component is positive
    assert bool((w0.gather(1, w0.abs().argmax(1, keepdim=True)) > 0).all())


@pytest.mark.slow
def test_pretrain_fits_the_pca_head_on_training_items(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "data", n=24)
    sets = tiny_overrides(manifest, tmp_path / "run", steps=1, batch=8)
    sets += [
        "model.modalities=[image,audio]",
        "model.embed_dim=8",
        "model.towers.image.projection_init=pca_whiten",
        "model.towers.image.lock=all",  # frozen trunk: its outputs (BatchNorm stats) stay put
        "optim.lr=1e-12",  # one step that leaves the fitted head where it started
        "optim.weight_decay=0.0",
    ]
    pretrain(load_config(None, sets))
    model = load_bundle(tmp_path / "run")
    enc = model.encoder.eval()
    source = open_eval_source(str(manifest), {"image": model.modality_specs()["image"]})
    with torch.no_grad():
        trunk = torch.cat(
            [enc.trunks["image"](enc.preprocessors["image"](b.inputs["image"])) for b in
             source.batches(8)]
        ).double()  # fmt: skip
        head = enc.heads["image"]
        z = trunk @ head.weight.double().T + head.bias.double()
    assert z.shape == (24, 8)
    assert torch.allclose(z.mean(0), torch.zeros(8, dtype=z.dtype), atol=1e-3)
    assert torch.allclose(torch.cov(z.T), torch.eye(8, dtype=z.dtype), atol=1e-2)


def test_too_few_items_for_the_pca_is_a_clear_error(tmp_path: Path) -> None:
    from modalign.core.errors import UserInputError

    manifest = write_tiny_corpus(tmp_path / "data", n=8)
    sets = tiny_overrides(manifest, tmp_path / "run", steps=1, batch=8)
    sets += ["model.modalities=[image,audio]", "model.towers.image.projection_init=pca"]
    with pytest.raises(UserInputError, match=r"8 image items.*model\.embed_dim=16"):
        pretrain(load_config(None, sets))
