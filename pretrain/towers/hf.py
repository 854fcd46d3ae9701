"""Hugging Face ``transformers`` towers: ``hf_vision``, ``hf_audio``, ``hf_text``.

Any local model directory works: ``AutoModel`` plus the directory's own image processor /
feature extractor / tokenizer, loaded with ``local_files_only=True`` while ``HF_HUB_OFFLINE=1``
(never a download) and checked strictly (missing / unexpected / mis-shaped keys -> exit 2 naming
the directory). The trunk output is a named pooling of ``last_hidden_state``: ``cls`` (first
token), ``mean``, ``masked_mean`` (attention-masked mean; text) or ``pooler`` (``pooler_output``).
Audio goes through the model's own feature extractor at its own sampling rate; a clip at another
rate (``data.audio.sample_rate``) is resampled first (polyphase, scipy).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from math import gcd
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from modalign.core.config_io import AT_LEAST_1, from_dict
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.towers.adapters import TRANSFORMER_TARGETS
from modalign.pretrain.towers.api import TowerConfig, TowerParts, external_weights
from modalign.pretrain.towers.cache import maybe_cached
from modalign.pretrain.towers.strings import StringTrunk, device_of
from modalign.pretrain.towers.text import hub_offline
from modalign.pretrain.towers.weights import local_path

POOLINGS = ("cls", "mean", "masked_mean", "pooler")

LAYER_INDEX = re.compile(r"\.(?:layer|layers|resblocks|blocks|h)\.(\d+)\.")


@dataclass(frozen=True)
class HFOptions:
    """``model.towers.<m>.options`` of the ``hf_*`` kinds (``arch`` is the model directory)."""

    pooling: str = ""  # cls | mean | masked_mean | pooler; "" = kind default
    max_length: Annotated[int, AT_LEAST_1] = 128  # hf_text: tokenizer truncation length


def hf_options(cfg: TowerConfig, default_pooling: str) -> HFOptions:
    opts = from_dict(HFOptions, dict(cfg.options or {}), f"model.towers({cfg.kind}).options")
    pooling = opts.pooling or default_pooling
    if pooling not in POOLINGS:
        raise ConfigError(
            f"model.towers({cfg.kind}).options.pooling={pooling!r}: valid {', '.join(POOLINGS)}"
        )
    return HFOptions(pooling, opts.max_length)


def indexed_layer_groups(module: nn.Module) -> list[list[nn.Parameter]]:
    """Parameter groups by block index (``...layer(s)/resblocks/blocks/h.<i>.``); rest first."""
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        m = LAYER_INDEX.search(f".{name}")
        groups.setdefault(int(m.group(1)) if m else -1, []).append(p)
    return [groups[k] for k in sorted(groups)]


def load_hf_model(path: str, key: str) -> nn.Module:
    """``AutoModel`` from a local directory, strictly (every key of the checkpoint used)."""
    from transformers import AutoModel

    root = local_path(path, key, "transformers model directory (save_pretrained)")
    with hub_offline():
        try:
            model, info = AutoModel.from_pretrained(
                str(root), local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{key}: cannot load a transformers model from {path!r}: {exc}"
            ) from None
    bad = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys")}
    bad["mismatched_keys"] = sorted(str(m[0]) for m in info.get("mismatched_keys") or [])
    if any(bad.values()):
        listed = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(v[:12])}" for k, v in bad.items() if v
        )
        raise ConfigError(
            f"{key}: weights in {path!r} do not fit the model's config ({listed}); save the "
            "model with save_pretrained from the same config"
        )
    return model.float()


def pool(out: Any, pooling: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Named pooling of a transformers output (see module docstring)."""
    if pooling == "pooler":
        return out.pooler_output
    hidden = out.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "masked_mean" and mask is not None:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden.mean(1)


def out_width(model: nn.Module) -> int:
    """Hidden size declared by the model's config."""
    config: Any = model.config  # a transformers PretrainedConfig
    return int(config.hidden_size)


class HFVisionTrunk(nn.Module):
    """pixel_values (B, C, H, W) -> pooled features."""

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        self.model, self.pooling = model, pooling

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pool(self.model(pixel_values=pixels), self.pooling)


def _size_of(processor: Any) -> int:
    size = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
    if isinstance(size, int):
        return size
    size = dict(size)
    return int(size.get("height") or size.get("shortest_edge") or 224)


def build_hf_vision(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A transformers vision model (ViT, DINOv2, CLIP vision...) with its processor's preset."""
    from transformers import AutoImageProcessor

    key = f"model.towers({cfg.kind}).arch"
    opts = hf_options(cfg, "cls")
    model = load_hf_model(cfg.arch, key)
    with hub_offline():
        proc = AutoImageProcessor.from_pretrained(cfg.arch, local_files_only=True)
    preset = ImagePreset(
        input_size=cfg.input_size or _size_of(proc),
        mean=tuple(proc.image_mean),
        std=tuple(proc.image_std),
        interpolation="bicubic" if int(getattr(proc, "resample", 3)) == 3 else "bilinear",
        crop_pct=1.0,
    )
    trunk = HFVisionTrunk(model, opts.pooling)
    return TowerParts(
        nn.Identity(),
        maybe_cached(trunk, cfg),
        out_width(model),
        input_preset=preset,
        external=external_weights(cfg.arch),
        compilable=False,
        cache_outputs=cfg.lock == "all",
        layer_groups=lambda: indexed_layer_groups(model),
        adapter_targets=TRANSFORMER_TARGETS,
    )


def resample(wave: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Polyphase resampling of the last axis from ``src`` Hz to ``dst`` Hz."""
    if src == dst:
        return wave
    from scipy.signal import resample_poly

    g = gcd(src, dst)
    return resample_poly(wave, dst // g, src // g, axis=-1).astype(np.float32)


class HFAudioTrunk(nn.Module):
    """waveform (B, T) at ``source_rate`` -> the model's feature extractor -> pooled features."""

    def __init__(self, model: nn.Module, extractor: Any, source_rate: int, pooling: str) -> None:
        super().__init__()
        self.model, self.extractor, self.pooling = model, extractor, pooling
        self.source_rate = source_rate
        self.rate = int(extractor.sampling_rate)

    def features(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        clips = resample(wave.detach().float().cpu().numpy(), self.source_rate, self.rate)
        feats = self.extractor(
            list(clips), sampling_rate=self.rate, return_tensors="pt", padding=True
        )
        dev = device_of(self.model)
        return {k: v.to(dev) for k, v in feats.items() if isinstance(v, torch.Tensor)}

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.from_features(self.features(wave))

    def from_features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The feature extractor's tensors -> pooled features (the tensor half of forward)."""
        feats = dict(feats)
        mask = feats.pop("attention_mask", None)
        out = self.model(**feats)
        frames = out.last_hidden_state.shape[1]
        use = mask if mask is not None and mask.shape[-1] == frames else None
        return pool(out, self.pooling, use)


def build_hf_audio(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A transformers audio model (wav2vec2, HuBERT, AST, ...) with its own feature extractor."""
    from transformers import AutoFeatureExtractor

    opts = hf_options(cfg, "mean")
    model = load_hf_model(cfg.arch, f"model.towers({cfg.kind}).arch")
    with hub_offline():
        fe = AutoFeatureExtractor.from_pretrained(cfg.arch, local_files_only=True)
    trunk = HFAudioTrunk(model, fe, data_cfg.audio.sample_rate, opts.pooling)
    return TowerParts(
        nn.Identity(),
        maybe_cached(trunk, cfg),
        out_width(model),
        external=external_weights(cfg.arch),
        compilable=False,
        cache_outputs=cfg.lock == "all",
        layer_groups=lambda: indexed_layer_groups(model),
        adapter_targets=TRANSFORMER_TARGETS,
    )


class HFTextTrunk(StringTrunk):
    """list[str] -> tokenizer -> AutoModel -> pooled features (cached per string while frozen)."""

    def __init__(self, model: nn.Module, tokenizer: Any, opts: HFOptions, cache: int) -> None:
        super().__init__(cache)
        self.model, self.tokenizer, self.opts = model, tokenizer, opts

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.opts.max_length,
            return_tensors="pt",
        )
        tok = {k: v.to(device_of(self.model)) for k, v in tok.items()}
        return pool(self.model(**tok), self.opts.pooling, tok.get("attention_mask"))


def build_hf_text(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """Any transformers text model with a pooling (default: attention-masked mean)."""
    from transformers import AutoTokenizer

    opts = hf_options(cfg, "masked_mean")
    model = load_hf_model(cfg.arch, f"model.towers({cfg.kind}).arch")
    with hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(cfg.arch, local_files_only=True)
    trunk = HFTextTrunk(model, tokenizer, opts, cfg.cache_items)
    return TowerParts(
        nn.Identity(),
        trunk,
        out_width(model),
        external=external_weights(cfg.arch),
        compilable=False,
        cache_outputs=cfg.lock == "all",
        layer_groups=lambda: indexed_layer_groups(model),
        adapter_targets=TRANSFORMER_TARGETS,
    )
