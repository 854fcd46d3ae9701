"""``open_clip`` tower: the image or text half of a local open_clip checkpoint.

``arch`` names the open_clip model: a built-in config name (``ViT-B-32``), a model config JSON
(``{"embed_dim", "vision_cfg", "text_cfg"}``; registered under its file stem) or
``local-dir:DIR`` (``open_clip_config.json`` + weights). ``weights`` is the local checkpoint;
``options.part`` picks ``image`` or ``text``. The model is built with
``open_clip.create_model_and_transforms`` and loaded strictly; the image half takes open_clip's
preprocessing (size, mean, std, interpolation) as its input preset, the text half its own
tokenizer. Two towers on the same checkpoint (``part: image`` + ``part: text``, both
``lock: all``) are a frozen image-text anchor pair (the ImageBind recipe). ``hf-hub:`` names are
refused: nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.core.config_io import from_dict
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.towers.api import ExternalWeights, TowerConfig, TowerParts, external_weights
from modalign.pretrain.towers.cache import maybe_cached
from modalign.pretrain.towers.hf import indexed_layer_groups
from modalign.pretrain.towers.strings import StringTrunk, device_of
from modalign.pretrain.towers.text import hub_offline
from modalign.pretrain.towers.weights import check_keys, local_path, read_state_dict

PARTS = ("image", "text")
# Default adapter targets: each residual block's attention (peft's MultiheadAttention LoRA) and
# MLP projections, in the image or the text transformer.
OPEN_CLIP_ADAPTER_TARGETS = r".*resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"


@dataclass(frozen=True)
class OpenClipOptions:
    """``model.towers.<m>.options`` of ``open_clip``."""

    part: str = "image"  # image | text


def model_name(arch: str, key: str) -> str:
    """The open_clip model name for ``arch``; a config JSON path is registered first."""
    if arch.startswith(("hf-hub:", "hf_hub:")):
        raise ConfigError(
            f"{key}={arch!r}: modalign never downloads; give a built-in open_clip model name, a "
            "model config .json or local-dir:DIR, and the checkpoint in weights"
        )
    if arch.startswith("local-dir:"):
        local_path(arch.removeprefix("local-dir:"), key, "open_clip model directory")
        return arch
    if arch.endswith(".json"):
        import open_clip

        open_clip.add_model_config(str(local_path(arch, key, "open_clip model config .json")))
        return Path(arch).stem
    return arch


def load_open_clip(cfg: TowerConfig) -> tuple[Any, Any, str]:
    """(model, eval preprocess, model name) with the checkpoint loaded strictly.

    The model is an ``open_clip.CLIP`` (an ``nn.Module``; open_clip ships no type information).
    """
    import open_clip

    key = f"model.towers({cfg.kind})"
    name = model_name(cfg.arch, f"{key}.arch")
    if cfg.lock == "all" and not cfg.weights:
        raise ConfigError(
            f"{key}.weights: a frozen (lock: all) open_clip tower needs its local checkpoint; "
            "--set model.towers.<modality>.weights=PATH (a random frozen tower is useless)"
        )
    if cfg.weights:
        local_path(cfg.weights, f"{key}.weights", "open_clip checkpoint file")
    with hub_offline():
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=cfg.weights or None, weights_only=True
            )
        except RuntimeError as exc:  # open_clip loads strictly: name the keys
            if cfg.weights:
                bare = open_clip.create_model(name, pretrained=None)
                check_keys(bare.state_dict(), read_state_dict(cfg.weights), cfg.weights, key)
            raise ConfigError(f"{key}: cannot build open_clip model {cfg.arch!r}: {exc}") from None
    return model.float().eval(), preprocess, name


def open_clip_preset(model: nn.Module, size_override: int) -> ImagePreset:
    """open_clip's own preprocessing config as an :class:`ImagePreset`."""
    import open_clip

    pc = open_clip.get_model_preprocess_cfg(model)
    size = pc.get("size", 224)
    size = int(size if isinstance(size, int) else size[-1])
    return ImagePreset(
        input_size=size_override or size,
        mean=tuple(pc.get("mean", ImagePreset.mean)),
        std=tuple(pc.get("std", ImagePreset.std)),
        interpolation=str(pc.get("interpolation", "bicubic")),
        crop_pct=1.0,
    )


class OpenClipImageTrunk(nn.Module):
    """images (B, 3, H, W) -> ``visual(x)`` (= ``encode_image`` before normalisation)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class OpenClipTextTrunk(StringTrunk):
    """list[str] -> open_clip tokenizer -> ``encode_text`` (cached per string while frozen)."""

    def __init__(self, model: Any, tokenizer: Any, cache_items: int) -> None:  # open_clip.CLIP
        super().__init__(cache_items)
        model.visual = None  # the text half only: image weights are not part of this tower
        self.clip, self.tokenizer = model, tokenizer

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(device_of(self.clip))
        return self.clip.encode_text(tokens)


def _external(cfg: TowerConfig) -> ExternalWeights | None:
    if not cfg.weights:
        return None
    ext = external_weights(cfg.weights, "")
    return ExternalWeights("open_clip_torch", _version(), ext.path, ext.files)


def _version() -> str:
    import open_clip

    return str(open_clip.__version__)


def build_open_clip(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """The ``options.part`` half of a local open_clip model."""
    opts = from_dict(OpenClipOptions, dict(cfg.options or {}), "model.towers(open_clip).options")
    if opts.part not in PARTS:
        raise ConfigError(f"model.towers(open_clip).options.part={opts.part!r}: image or text")
    model, _, name = load_open_clip(cfg)
    if opts.part == "image":
        trunk: nn.Module = OpenClipImageTrunk(model.visual)
        preset = open_clip_preset(model, cfg.input_size)
        with torch.no_grad():
            side = preset.input_size
            width = int(trunk(torch.zeros(1, 3, side, side)).shape[-1])
        wrapped = maybe_cached(trunk, cfg)
    else:
        import open_clip

        with hub_offline():
            tokenizer = open_clip.get_tokenizer(name)
        trunk = wrapped = OpenClipTextTrunk(model, tokenizer, cfg.cache_items)
        preset = None
        with torch.no_grad():
            width = int(trunk.embed([""]).shape[-1])
    return TowerParts(
        nn.Identity(),
        wrapped,
        width,
        input_preset=preset,
        external=_external(cfg),
        compilable=False,
        cache_outputs=cfg.lock == "all",
        layer_groups=lambda: indexed_layer_groups(trunk),
        adapter_targets=OPEN_CLIP_ADAPTER_TARGETS,
    )
