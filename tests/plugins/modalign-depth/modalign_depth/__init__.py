"""modalign plugin: a ``depth`` modality (``.npy`` depth maps) and a ``depth_cnn`` tower.

Registered through entry points (see ``pyproject.toml``); modalign calls the hooks below with
its registries the first time it looks for a name it does not know.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__version__ = "0.1.0"


@dataclass(frozen=True)
class DepthOptions:
    """``data.modalities.depth`` options."""

    side: int = 16  # maps must be side x side
    flip: bool = True  # random horizontal flips while training
    max_depth: float = 10.0  # values are clipped to [0, max_depth] and scaled to [0, 1]


def _read(source: Any) -> np.ndarray:
    from modalign.data.decode import BadItem

    try:
        if isinstance(source, bytes):
            return np.load(io.BytesIO(source), allow_pickle=False)
        return np.load(str(source), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BadItem("unreadable_depth", f"{type(exc).__name__}: {exc}") from None


def depth_factory(data_cfg: Any, options: DepthOptions, preset: Any = None) -> Any:
    """The ``depth`` ModalitySpec for a data config."""
    from modalign.data.decode import BadItem
    from modalign.data.modality import ModalitySpec, StatKind

    side = options.side

    def decode(source: Any) -> np.ndarray:
        depth = _read(source)
        if depth.shape != (side, side):
            raise BadItem("bad_depth_shape", f"expected {(side, side)}, got {depth.shape}")
        if not np.isfinite(depth).all():
            raise BadItem("non_finite_depth")
        return depth.astype(np.float32)

    def load(source: Any, train: bool, rng: np.random.Generator) -> torch.Tensor:
        depth = np.clip(decode(source), 0.0, options.max_depth) / options.max_depth
        if train and options.flip and rng.random() < 0.5:
            depth = depth[:, ::-1].copy()
        return torch.from_numpy(np.ascontiguousarray(depth)).unsqueeze(0)

    def describe(raw: np.ndarray) -> dict[str, Any]:
        return {"depth_range": float(raw.max() - raw.min())}

    def perturb(values: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(values.shape, generator=gen).to(values.device) * level
        return (values + noise).clamp(0.0, 1.0)

    return ModalitySpec(
        "depth",
        load,
        torch.zeros(1, side, side),
        extensions=("npy",),
        decode=decode,
        describe=describe,
        stats=(StatKind("depth_range", "summary"),),
        perturb_fn=perturb,
        options=options,
    )


def build_depth_cnn(cfg: Any, data_cfg: Any) -> Any:
    """A small conv net over (1, side, side) depth maps -> 32 features."""
    from torch import nn

    from modalign.pretrain.towers import TowerParts

    trunk = nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return TowerParts(nn.Identity(), trunk, 32, compilable=True)


def register_modalities(registry: Any) -> None:
    """Entry point ``modalign.modalities``: adds ``depth``."""
    registry.add("depth", depth_factory, DepthOptions)


def register_towers(registry: Any) -> None:
    """Entry point ``modalign.towers``: adds ``depth_cnn``."""
    registry.add("depth_cnn", build_depth_cnn)
