"""Modalities, registered by name: how to load one value and how to batch many.

A :class:`ModalitySpec` is everything the data layer needs to handle a modality; the default
set is built by :func:`default_modalities`. Adding a modality (depth maps, tabular vectors...)
means passing one more spec: loaders, collation and presence masks handle it by name.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modalign.data.config import DataConfig
from modalign.data.decode import Source, decode_audio, decode_image, decode_text


@dataclass(frozen=True)
class ImagePreset:
    """Input geometry and normalisation of an image tower (from timm's data config)."""

    input_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


@dataclass(frozen=True)
class ModalitySpec:
    """How one modality is read and batched.

    ``load(source, train, rng)`` turns a path/bytes (or inline value) into a tensor or string,
    raising :class:`~modalign.data.decode.BadItem` when the item is unusable. ``placeholder`` is
    what an absent row holds in a batch (its ``present`` bit is False).
    """

    name: str
    load: Callable[[Any, bool, np.random.Generator], Any]
    placeholder: Any
    inline: bool = False  # value lives in the manifest cell (text), not in a file
    extensions: tuple[str, ...] = ()  # WebDataset member extensions that carry this modality

    def collate(self, values: Sequence[Any]) -> Any:
        if isinstance(self.placeholder, torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in values])
        return list(values)


def image_transform(preset: ImagePreset, cfg: DataConfig, train: bool) -> Callable:
    """timm's train/eval transform for the tower's input size, adapted to 1 or 3 channels."""
    from timm.data import create_transform

    channels = cfg.image.channels
    mean, std = _fit_channels(preset.mean, channels), _fit_channels(preset.std, channels)
    return create_transform(
        input_size=(channels, preset.input_size, preset.input_size),
        is_training=train,
        scale=(cfg.image.train_scale_min, 1.0),
        hflip=cfg.image.hflip,
        color_jitter=cfg.image.color_jitter or None,
        interpolation=preset.interpolation,
        mean=mean,
        std=std,
        crop_pct=preset.crop_pct,
    )


def _fit_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (float(np.mean(values)),)
    return (values[0],) * channels


def default_modalities(
    cfg: DataConfig, image_preset: ImagePreset | None = None
) -> dict[str, ModalitySpec]:
    """The built-in ``image``, ``audio`` and ``text`` modalities for a data config."""
    preset = image_preset or ImagePreset()
    train_tf = image_transform(preset, cfg, train=True)
    eval_tf = image_transform(preset, cfg, train=False)

    def load_image(source: Source, train: bool, rng: np.random.Generator) -> torch.Tensor:
        img = decode_image(source, cfg.image)
        if not train:
            return eval_tf(img)
        # timm transforms draw from the global torch/python RNGs: seed them per item so an
        # item's augmentation depends on (seed, epoch, index) only, not on worker scheduling.
        seed = int(rng.integers(0, 2**31 - 1))
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(
                    seed
                )  # CPU only: seeding CUDA too costs ~1 ms/item
                random.seed(seed)
                return train_tf(img)
        finally:
            random.setstate(state)

    def load_audio(source: Source, train: bool, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(decode_audio(source, cfg.audio, rng if train else None))

    def load_text(value: Any, train: bool, rng: np.random.Generator) -> str:
        return decode_text(value)

    size = preset.input_size
    return {
        "image": ModalitySpec(
            "image",
            load_image,
            torch.zeros(cfg.image.channels, size, size),
            extensions=("jpg", "jpeg", "png", "webp", "bmp"),
        ),
        "audio": ModalitySpec(
            "audio",
            load_audio,
            torch.zeros(cfg.audio.clip_samples),
            extensions=("wav", "flac", "ogg", "mp3"),
        ),
        "text": ModalitySpec("text", load_text, "", inline=True, extensions=("txt",)),
    }
