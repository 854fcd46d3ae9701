"""timm towers: image and audio (log-mel) trunks, pretrained weights through timm's machinery.

A ``weights:`` file is read locally (:func:`~modalign.pretrain.towers.weights.read_state_dict`) and
handed to timm as ``pretrained_cfg_overlay={"state_dict": ...}`` with ``pretrained=True``, so
timm's own checkpoint filter (key remapping, position-embedding resampling for another
``img_size``) and input-conv channel adaptation (``in_chans=1`` sums the RGB kernels) apply, and
timm loads strictly: a missing, extra or mis-shaped key is exit 2 naming the file. timm's
pretrained config (mean, std, input size, interpolation, crop) becomes the tower's input preset
unless the config or the kind's options say otherwise. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, cast

import torch
from torch import nn

from modalign.core.config_io import POSITIVE, Range
from modalign.core.errors import ConfigError
from modalign.data.audio import LogMel, SpecAugment
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.towers.api import TowerConfig, TowerParts, external_weights
from modalign.pretrain.towers.cache import CachedTrunk, maybe_cached
from modalign.pretrain.towers.weights import check_keys, load_strict, read_state_dict

log = logging.getLogger(__name__)


class _TimmModel(Protocol):
    """What modalign uses of a timm model beyond ``nn.Module`` (timm types models as that)."""

    pretrained_cfg: dict[str, Any] | None
    num_features: int

    def reset_classifier(self, num_classes: int) -> None: ...
    def set_grad_checkpointing(self, enable: bool = True) -> None: ...
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]: ...


def _timm(model: nn.Module) -> _TimmModel:
    """``model`` (made by ``timm.create_model``) seen through its timm attributes."""
    return cast(_TimmModel, model)


@dataclass(frozen=True)
class TimmOptions:
    """``model.towers.<m>.options`` of ``timm_image`` / ``timm_audio``.

    img_size:      passed to timm as ``img_size=`` (ViT-style models; timm then resamples the
                   checkpoint's position embeddings); 0 = not passed.
    mean/std/interpolation/crop_pct: override timm's pretrained config ([] / "" / 0 = timm's).
    model_kwargs:  extra keyword arguments for ``timm.create_model``.
    channels_last: run the trunk in channels-last (NHWC) memory format: weights converted once,
                   inputs on entry. Convolutions run faster (oneDNN on CPU, cuDNN on CUDA);
                   measured on a 2-core CPU, fp32: the demo/avmnist ``test_resnet`` trunks
                   train 1.4-1.5x faster per step, resnet18 at 64 px breaks even. Same
                   state-dict keys and values; false keeps PyTorch's default layout.
    """

    img_size: Annotated[int, Range(ge=0, note="0 = not passed")] = 0
    mean: list[Annotated[float, Range()]] = field(default_factory=list)
    std: list[Annotated[float, POSITIVE]] = field(default_factory=list)
    interpolation: str = ""
    crop_pct: Annotated[float, Range(ge=0, le=1, note="0 = timm's")] = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = True


def _options(cfg: TowerConfig) -> TimmOptions:
    from modalign.core.config_io import from_dict

    return from_dict(TimmOptions, dict(cfg.options or {}), "model.towers.options")


def _create(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    if arch.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ConfigError(
            f"model.towers.arch={arch!r}: modalign never downloads weights; give a timm "
            "architecture name (timm.list_models()) and the weights file in weights"
        )
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as exc:  # timm: "Unknown model (...)"; strict load errors handled above
        raise ConfigError(
            f"tower arch {arch!r}: {exc}; any name from timm.list_models() works"
        ) from None


def _pretrained_kwargs(arch: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """timm arguments that make its pretrained path load ``state`` strictly (no download).

    The overlay states the file's own input channels (so timm adapts them to ``in_chans``) and
    classifier width (a headless file -> ``num_classes=0``; with a head it loads, then goes).
    """
    import timm

    probe = timm.create_model(arch, pretrained=False)
    dc = dict(_timm(probe).pretrained_cfg or {})
    overlay: dict[str, Any] = {"state_dict": state, "file": None, "url": "", "hf_hub_id": None}
    conv = f"{dc.get('first_conv', '')}.weight"
    size = tuple(dc.get("input_size") or (3, 224, 224))
    if conv in state and state[conv].dim() == 4:
        overlay["input_size"] = (int(state[conv].shape[1]), *size[1:])
    heads = dc.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    head = next((f"{h}.weight" for h in heads if f"{h}.weight" in state), None)
    overlay["num_classes"] = int(state[head].shape[0]) if head else 0
    overlay["label_offset"] = 0
    return {
        "pretrained": True,
        "pretrained_cfg_overlay": overlay,
        "num_classes": overlay["num_classes"],
    }


def timm_trunk(cfg: TowerConfig, in_chans: int, key: str = "model.towers.weights") -> nn.Module:
    """A timm model without classifier, from scratch or from ``cfg.weights`` (strict)."""
    opts = _options(cfg)
    kwargs: dict[str, Any] = {"in_chans": in_chans, "drop_rate": cfg.drop_rate}
    kwargs.update(opts.model_kwargs)
    if opts.img_size:
        kwargs["img_size"] = opts.img_size
    if not cfg.weights:
        trunk = _create(cfg.arch, pretrained=False, num_classes=0, **kwargs)
    else:
        state = read_state_dict(cfg.weights, key)
        pk = _pretrained_kwargs(cfg.arch, state)
        try:
            trunk = _create(cfg.arch, **pk, **kwargs)
        except ConfigError as exc:  # timm's strict load: missing / unexpected / size mismatch
            # Name the keys against the trunk as built (same arch, head, channels).
            own = _create(cfg.arch, pretrained=False, num_classes=pk["num_classes"], **kwargs)
            check_keys(own.state_dict(), state, cfg.weights, key)
            raise ConfigError(f"{key}: weights file {cfg.weights!r}: {exc}") from None
        if pk["num_classes"]:
            _timm(trunk).reset_classifier(0)
        log.info("loaded %s through timm's pretrained path (%s)", cfg.weights, cfg.arch)
    if cfg.grad_checkpointing:
        _timm(trunk).set_grad_checkpointing(True)
    if opts.channels_last:
        use_channels_last(trunk)
    return trunk


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x, *rest = args
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, *rest)


def use_channels_last(trunk: nn.Module) -> nn.Module:
    """Convert ``trunk``'s 4-D weights to channels-last and its 4-D inputs on every call."""
    trunk.to(memory_format=torch.channels_last)
    trunk.register_forward_pre_hook(_channels_last_input)
    return trunk


def timm_layer_groups(trunk: nn.Module) -> list[list[nn.Parameter]]:
    """timm's coarse layer groups (stem, stages..., head), in input-to-output order."""
    from timm.models import group_parameters

    names = group_parameters(trunk, _timm(trunk).group_matcher(coarse=True))
    params = dict(trunk.named_parameters())
    return [[params[n] for n in group] for group in names.values()]


def load_local_weights(module: nn.Module, path: str) -> None:
    """Load a local .safetensors / torch checkpoint strictly (exit 2 listing what does not fit)."""
    load_strict(module, path, "model.towers.weights")


def adapter_layers(trunk: nn.Module) -> list[str]:
    """Default adapter targets of a timm trunk: its linear layers and its full (not
    depthwise) convolutions (stem, pointwise / 3x3 convs, attention and MLP projections)."""
    return [
        name
        for name, mod in trunk.named_modules()
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)
    ]


def timm_preset(trunk: nn.Module, cfg: TowerConfig) -> ImagePreset:
    """timm's pretrained data config as the tower's input preset (config/options override)."""
    opts = _options(cfg)
    dc = dict(_timm(trunk).pretrained_cfg or {})
    size = cfg.input_size or int((dc.get("input_size") or (3, 224, 224))[-1])
    crop = opts.crop_pct or (1.0 if size < 64 else float(dc.get("crop_pct", 0.875)))
    return ImagePreset(
        input_size=size,
        mean=tuple(opts.mean or dc.get("mean", ImagePreset.mean)),
        std=tuple(opts.std or dc.get("std", ImagePreset.std)),
        interpolation=opts.interpolation or dc.get("interpolation", "bicubic"),
        crop_pct=crop,
    )


def image_channels(cfg: TowerConfig, data_cfg: DataConfig, name: str = "image") -> int:
    """The tower's ``in_chans`` (0 = ``data.image.channels``); a conflict is exit 2."""
    chans = cfg.in_chans or data_cfg.image.channels
    if chans != data_cfg.image.channels:
        raise ConfigError(
            f"model.towers.{name}.in_chans={cfg.in_chans} but data.image.channels="
            f"{data_cfg.image.channels}: set them equal (timm adapts RGB weights to 1 channel)"
        )
    return chans


def build_timm_image(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A timm image trunk; its input preset comes from timm's pretrained config."""
    trunk = timm_trunk(cfg, image_channels(cfg, data_cfg))
    wrapped = maybe_cached(trunk, cfg)
    return TowerParts(
        nn.Identity(),
        wrapped,
        _timm(trunk).num_features,
        input_preset=timm_preset(trunk, cfg),
        external=external_weights(cfg.weights) if cfg.weights else None,
        cache_outputs=cfg.lock == "all",
        compilable=not isinstance(wrapped, CachedTrunk),  # cache lookups are not compiled
        layer_groups=lambda: timm_layer_groups(trunk),
        adapter_targets=adapter_layers(trunk),
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
    """Log-mel front end + a one-channel timm trunk (RGB weights: timm sums the kernels)."""
    trunk = timm_trunk(cfg, 1)
    wrapped = maybe_cached(trunk, cfg)
    return TowerParts(
        AudioFrontEnd(data_cfg),
        wrapped,  # hits only without SpecAugment (data.audio.spec_augment)
        _timm(trunk).num_features,
        external=external_weights(cfg.weights) if cfg.weights else None,
        cache_outputs=cfg.lock == "all",
        compilable=not isinstance(wrapped, CachedTrunk),  # cache lookups are not compiled
        layer_groups=lambda: timm_layer_groups(trunk),
        adapter_targets=adapter_layers(trunk),
    )
