"""timm towers: image and audio (log-mel) trunks, local weight files, timm layer groups."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from modalign.core.errors import ConfigError
from modalign.data.audio import LogMel, SpecAugment
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.config import TowerConfig
from modalign.pretrain.tower_api import TowerParts

log = logging.getLogger(__name__)


def timm_trunk(cfg: TowerConfig, in_chans: int) -> nn.Module:
    """A timm model without classifier; every timm model supports grad checkpointing."""
    import timm

    try:
        trunk = timm.create_model(
            cfg.arch, pretrained=False, num_classes=0, in_chans=in_chans, drop_rate=cfg.drop_rate
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ConfigError(
            f"tower arch {cfg.arch!r}: {exc}; any name from timm.list_models() works"
        ) from None
    if cfg.weights:
        load_local_weights(trunk, cfg.weights)
    if cfg.grad_checkpointing:
        trunk.set_grad_checkpointing(True)
    return trunk


def timm_layer_groups(trunk: nn.Module) -> list[list[nn.Parameter]]:
    """timm's coarse layer groups (stem, stages..., head), in input-to-output order."""
    from timm.models import group_parameters

    names = group_parameters(trunk, trunk.group_matcher(coarse=True))
    params = dict(trunk.named_parameters())
    return [[params[n] for n in group] for group in names.values()]


def load_local_weights(module: nn.Module, path: str) -> None:
    """Load a local .safetensors or torch checkpoint without executing code (weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"tower weights {path!r} not found; give a local .safetensors or .pth file"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    module.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d tensors from %s (%d skipped: classifier or shape mismatch)",
        len(usable),
        p,
        len(skipped),
    )
    if not usable:
        raise ConfigError(f"tower weights {path!r}: no tensor matches the architecture")


def build_timm_image(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A timm image trunk; its input preset comes from timm's pretrained config."""
    trunk = timm_trunk(cfg, data_cfg.image.channels)
    dc = trunk.pretrained_cfg or {}
    preset = ImagePreset(
        input_size=cfg.input_size,
        mean=tuple(dc.get("mean", ImagePreset.mean)),
        std=tuple(dc.get("std", ImagePreset.std)),
        interpolation=dc.get("interpolation", "bicubic"),
        crop_pct=1.0 if cfg.input_size < 64 else float(dc.get("crop_pct", 0.875)),
    )
    return TowerParts(
        nn.Identity(),
        trunk,
        trunk.num_features,
        input_preset=preset,
        layer_groups=lambda: timm_layer_groups(trunk),
    )


class AudioFrontEnd(nn.Module):
    """Waveform -> standardised log-mel image, with SpecAugment while training."""

    def __init__(self, data_cfg: DataConfig) -> None:
        super().__init__()
        a = data_cfg.audio
        self.logmel = LogMel(a)
        self.augment = SpecAugment(a.freq_mask, a.time_mask) if a.spec_augment else nn.Identity()

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.logmel(wave)
        # Per-clip standardisation: loudness and recording gain differ wildly between corpora.
        mean = spec.mean(dim=(-2, -1), keepdim=True)
        std = spec.std(dim=(-2, -1), keepdim=True).clamp(min=1e-3)
        return self.augment((spec - mean) / std)


def build_timm_audio(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """Log-mel front end + a one-channel timm trunk."""
    trunk = timm_trunk(cfg, 1)
    return TowerParts(
        AudioFrontEnd(data_cfg),
        trunk,
        trunk.num_features,
        layer_groups=lambda: timm_layer_groups(trunk),
    )
