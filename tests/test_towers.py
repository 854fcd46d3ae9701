"""Towers: local weights files (safetensors / torch checkpoints), locking and LiT partial unlock."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig, ImageConfig
from modalign.pretrain.config import TowerConfig
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
