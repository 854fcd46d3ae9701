"""The built-in modalities ``image``, ``audio`` and ``text``, registered in :data:`MODALITIES`.

Each is an ordinary factory ``factory(data_cfg, options, preset) -> ModalitySpec``, exactly what
a plugin registers; nothing else in the data layer knows these names.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.core.registry import NoOptions
from modalign.data.config import AudioConfig, DataConfig, ImageConfig
from modalign.data.decode import (
    Source,
    augment_audio,
    decode_audio,
    decode_image,
    decode_text,
    prepare_audio,
    read_audio,
)
from modalign.data.media import audio_decode_bytes, image_decode_bytes, sniff_audio, sniff_image
from modalign.data.modality import MODALITIES, ImagePreset, Loader, ModalitySpec, StatKind

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "mp3")


# -- image ---------------------------------------------------------------------------------
def image_transform(preset: ImagePreset, cfg: DataConfig | ImageConfig, train: bool) -> Callable:
    """timm's train/eval transform for the tower's input size, adapted to 1 or 3 channels."""
    from timm.data import create_transform

    icfg = cfg.image if isinstance(cfg, DataConfig) else cfg
    channels = icfg.channels
    mean, std = _fit_channels(preset.mean, channels), _fit_channels(preset.std, channels)
    return create_transform(
        input_size=(channels, preset.input_size, preset.input_size),
        is_training=train,
        scale=(icfg.train_scale_min, 1.0),
        hflip=icfg.hflip,
        color_jitter=icfg.color_jitter or None,  # type: ignore[arg-type]  # timm: None = no jitter; its hint omits None
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


def _image_prepare(icfg: ImageConfig) -> Callable[[Source], np.ndarray]:
    """Decode to uint8 pixels, (H, W) for ``L`` or (H, W, 3) for ``RGB`` (what the cache keeps)."""

    def prepare(source: Source) -> np.ndarray:
        return np.asarray(decode_image(source, icfg))

    return prepare


class _ImageAugment:
    """Decoded pixels -> timm transform; transforms are built on first use (pack/inspect never
    need them)."""

    def __init__(self, preset: ImagePreset, icfg: ImageConfig) -> None:
        self.preset, self.icfg = preset, icfg
        self._tf: dict[bool, Callable] = {}

    def _transform(self, train: bool) -> Callable:
        if train not in self._tf:
            self._tf[train] = image_transform(self.preset, self.icfg, train)
        return self._tf[train]

    def __call__(self, pixels: np.ndarray, train: bool, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image

        img = Image.fromarray(pixels)
        tf = self._transform(train)
        if not train:
            return tf(img)
        # timm transforms draw from the global torch/python RNGs: seed them per item so an
        # item's augmentation depends on (seed, epoch, index) only, not on worker scheduling.
        seed = int(rng.integers(0, 2**31 - 1))
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: CUDA seeding costs ~1 ms
                random.seed(seed)
                return tf(img)
        finally:
            random.setstate(state)


def composed(prepare: Callable[[Any], Any], augment: Loader) -> Loader:
    """``load`` as ``augment(prepare(source), train, rng)``, for a spec that splits its load."""

    def load(source: Any, train: bool, rng: np.random.Generator) -> Any:
        return augment(prepare(source), train, rng)

    return load


def _image_pack(icfg: ImageConfig) -> Callable[[Any], tuple[str, bytes]]:
    def pack(value: Any) -> tuple[str, bytes]:
        img = decode_image(value, icfg)
        if isinstance(value, bytes):  # a Parquet bytes cell: the format tells the extension
            data, ext = value, _image_format(value)
        else:
            data, ext = Path(value).read_bytes(), Path(value).suffix.lower().lstrip(".")
        if ext in IMAGE_EXTENSIONS:
            return ext, data
        buf = io.BytesIO()  # a format shard readers do not map to "image": store as PNG
        img.save(buf, format="PNG")
        return "png", buf.getvalue()

    return pack


def _image_format(data: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return (img.format or "").lower().replace("jpeg", "jpg")


def _image_clamp(preset: ImagePreset, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Clamp normalised images to the pixel range [0, 1] (per channel, in normalised units)."""
    mean = torch.tensor(_fit_channels(preset.mean, channels)).view(-1, 1, 1)
    std = torch.tensor(_fit_channels(preset.std, channels)).view(-1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std

    def clamp(x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, hi.to(x)), lo.to(x))

    return clamp


def _image_perturb(clamp: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def perturb(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        return clamp(x + level * noise)

    return perturb


@MODALITIES.register("image", options=ImageConfig)
def image_modality(data_cfg: DataConfig, options: ImageConfig, preset: Any) -> ModalitySpec:
    """Images (files) through timm transforms sized by the tower's :class:`ImagePreset`."""
    preset = preset or ImagePreset()
    size = preset.input_size
    clamp = _image_clamp(preset, options.channels)
    prepare, augment = _image_prepare(options), _ImageAugment(preset, options)
    return ModalitySpec(
        "image",
        composed(prepare, augment),
        torch.zeros(options.channels, size, size),
        extensions=IMAGE_EXTENSIONS,
        decode=lambda source: decode_image(source, options),
        describe=lambda img: {"image_size": tuple(int(v) for v in img.size)},
        stats=(StatKind("image_size", "minmax"),),
        pack_fn=_image_pack(options),
        perturb_fn=_image_perturb(clamp),
        clamp_fn=clamp,
        preset=preset,
        options=options,
        prepare=prepare,
        augment=augment,
        prepare_fingerprint=f"image/1 channels={options.channels} max_pixels={options.max_pixels}",
        sniff=sniff_image,
        decode_bytes=image_decode_bytes,
    )


# -- audio ---------------------------------------------------------------------------------
def _audio_pack(value: Any) -> tuple[str, bytes]:
    wave, sr = read_audio(value)
    if isinstance(value, bytes):  # a Parquet bytes cell
        import soundfile as sf

        try:
            ext = sf.info(io.BytesIO(value)).format.lower()
        except Exception:  # read by the librosa fallback (MP3 and the like)
            ext = "mp3"
        data = value
    else:
        ext, data = Path(value).suffix.lower().lstrip("."), Path(value).read_bytes()
    if ext in AUDIO_EXTENSIONS:
        return ext, data
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="FLOAT")
    return "wav", buf.getvalue()


def _audio_perturb(x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise relative to each clip's RMS (level 1 = 0 dB SNR), clipped to full scale."""
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return _audio_clamp(x + level * rms * noise)


def _audio_clamp(x: torch.Tensor) -> torch.Tensor:
    """Waveforms clipped to full scale [-1, 1]."""
    return x.clamp(-1.0, 1.0)


@MODALITIES.register("audio", options=AudioConfig)
def audio_modality(data_cfg: DataConfig, options: AudioConfig, preset: Any) -> ModalitySpec:
    """Mono waveforms (files) cropped/padded to the clip length; log-mel runs in the tower."""

    def load(source: Source, train: bool, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(decode_audio(source, options, rng if train else None))

    def augment(raw: dict[str, np.ndarray], train: bool, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(augment_audio(raw, options, rng if train else None))

    return ModalitySpec(
        "audio",
        load,
        torch.zeros(options.clip_samples),
        extensions=AUDIO_EXTENSIONS,
        decode=read_audio,  # no resampling: the checks do not need it
        describe=lambda ws: {"audio_seconds": ws[0].shape[0] / ws[1], "audio_sample_rates": ws[1]},
        stats=(StatKind("audio_seconds", "summary"), StatKind("audio_sample_rates", "counts")),
        pack_fn=_audio_pack,
        perturb_fn=_audio_perturb,
        clamp_fn=_audio_clamp,
        preset=preset,
        options=options,
        prepare=lambda source: prepare_audio(source, options),
        augment=augment,
        # prepare checks short clips whole and long ones per window: the clip length decides
        prepare_fingerprint=f"audio/1 sample_rate={options.sample_rate} "
        f"clip_samples={options.clip_samples}",
        sniff=sniff_audio,
        decode_bytes=lambda data: audio_decode_bytes(data, options.clip_seconds),
    )


# -- text ----------------------------------------------------------------------------------
def word_dropout(values: list[str], level: float, gen: torch.Generator) -> list[str]:
    """Drop each word with probability ``min(level, 1)``, keeping at least one word per text."""
    p = min(float(level), 1.0)
    out = []
    for text in values:
        words = text.split()
        keep = [w for w in words if float(torch.rand((), generator=gen)) >= p]
        if not keep and words:
            keep = [words[int(torch.randint(len(words), (), generator=gen))]]
        out.append(" ".join(keep))
    return out


@MODALITIES.register("text", options=NoOptions)
def text_modality(data_cfg: DataConfig, options: Any, preset: Any) -> ModalitySpec:
    """Inline captions (the manifest cell, a shard's ``txt`` member or its json field)."""
    return ModalitySpec(
        "text",
        lambda value, train, rng: decode_text(value),
        "",
        inline=True,
        extensions=("txt",),
        decode=decode_text,
        describe=lambda text: {"text_chars": len(text)},
        stats=(StatKind("text_chars", "summary"),),
        perturb_fn=word_dropout,
        preset=preset,
        options=options,
    )
