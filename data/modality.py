"""Modalities as plugins: a :class:`ModalitySpec` owns everything the data layer does per modality.

A spec says how one value is decoded and transformed (``load``), what an absent row holds
(``placeholder``), how values are batched (``collate``), which files and shard members carry it
(``extensions``/``suffixes``), what ``data pack`` writes for it (``pack``), what ``data inspect``
reports (``describe``), how robustness evaluation perturbs it (``perturb``) and the input preset
of the tower it feeds (``preset``). Nothing in ``modalign.data`` branches on a modality's name.

Specs are built by *factories* registered in :data:`MODALITIES` (entry-point group
``modalign.modalities``): ``factory(data_cfg, options, preset) -> ModalitySpec``. The built-ins
``image``, ``audio`` and ``text`` live in :mod:`modalign.data.builtin_modalities`; a plugin
package adds its own with a hook ``def hook(registry): registry.add("depth", factory, Options)``.
:func:`modality_specs` builds the specs a model needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from modalign.core.errors import ConfigError
from modalign.core.registry import Registry
from modalign.data.config import DataConfig
from modalign.data.decode import BadItem

RESERVED_COLUMNS = ("id", "label", "present", "index", "bad", "line")
"""Manifest columns that are never a modality."""

Loader = Callable[[Any, bool, np.random.Generator], Any]
Stats = Mapping[str, Any]


@dataclass(frozen=True)
class ImagePreset:
    """Input geometry and normalisation of an image tower (from timm's data config)."""

    input_size: int = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


@dataclass(frozen=True)
class StatKind:
    """How ``data inspect`` aggregates one statistic: ``minmax`` (per component), ``summary``
    (min/mean/max/total) or ``counts`` (value -> occurrences)."""

    key: str  # report key, e.g. "image_size"
    kind: str = "summary"


@dataclass(frozen=True)
class ModalitySpec:
    """Everything the data layer needs to handle one modality.

    ``load(source, train, rng)`` turns a path/bytes (or inline manifest value) into the model
    input (tensor or string), raising :class:`~modalign.data.decode.BadItem` when unusable.
    ``placeholder`` is what an absent row holds in a batch (its ``present`` bit is False).
    Optional hooks (``None`` = the generic behaviour documented on each method):

    - ``decode(source)``: the raw decoded value, without transforms (``pack``/``inspect`` check
      items with it); default ``load(source, False, rng0)``.
    - ``describe(raw)``: small statistics for ``data inspect``, keys declared in ``stats``.
    - ``pack_fn(value)``: ``(member extension, bytes)`` for ``data pack``.
    - ``collate_fn(values)``: batch values; default stacks tensors, lists anything else.
    - ``perturb_fn(values, level, generator)``: robustness noise, clamped to the valid range.
    - ``clamp_fn(values)``: project a batch of inputs onto the valid input range (pixels in
      [0, 1] for images in normalised units, full scale for audio); attacks and noise use it.
    - ``sniff(head)``: the media type of a file from its first bytes
      (:data:`~modalign.data.media.SNIFF_BYTES`), None unless it is one this modality
      declares; a server serves only files it names (:mod:`modalign.data.media`).
    - ``decode_bytes(data)``: peak memory in bytes that decoding ``data`` takes, read from its
      header (ValueError if unreadable); servers refuse or queue uploads by it.
    - ``prepare(source)`` + ``augment(raw, train, rng)``: ``load`` split in two, so the
      decoded-item cache (:mod:`modalign.data.cache`) can keep ``prepare``'s result across
      epochs. ``prepare`` is deterministic (it depends only on the item's bytes and the settings
      ``prepare_fingerprint`` names; default: the spec's ``options``) and returns a numpy array
      or a dict of them; ``augment`` draws all its randomness from ``rng``. ``load(s, t, r)``
      must equal ``augment(prepare(s), t, r)`` bit for bit. Specs without them are not cached.
    """

    name: str
    load: Loader
    placeholder: Any
    inline: bool = False  # value lives in the manifest cell (text), not in a file
    extensions: tuple[str, ...] = ()  # shard member extensions; the first is what pack writes
    suffixes: tuple[str, ...] = ()  # manifest file suffixes (default: the extensions)
    decode: Callable[[Any], Any] | None = None
    describe: Callable[[Any], Stats] | None = None
    stats: tuple[StatKind, ...] = ()
    pack_fn: Callable[[Any], tuple[str, bytes]] | None = None
    collate_fn: Callable[[Sequence[Any]], Any] | None = None
    perturb_fn: Callable[[Any, float, torch.Generator], Any] | None = None
    clamp_fn: Callable[[Any], Any] | None = None
    preset: Any = None  # the tower's input preset (e.g. ImagePreset) the transforms use
    options: Any = None  # the factory's typed options (for records and plugins)
    prepare: Callable[[Any], Any] | None = None  # decode only, cacheable (see above)
    augment: Loader | None = None  # prepare's result -> model input (train-time randomness)
    prepare_fingerprint: str = ""  # the settings prepare depends on ("" = from ``options``)
    sniff: Callable[[bytes], str | None] | None = None  # file head -> declared media type
    decode_bytes: Callable[[bytes], int] | None = None  # file bytes -> peak decode memory

    # -- batching ------------------------------------------------------------------------
    def collate(self, values: Sequence[Any]) -> Any:
        """Batch ``values`` (``collate_fn``, else stack tensors / keep a list)."""
        if self.collate_fn is not None:
            return self.collate_fn(values)
        if isinstance(self.placeholder, torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in values])
        return list(values)

    def absent(self, n: int) -> Any:
        """A batch of ``n`` placeholders (rows that lack this modality)."""
        return self.collate([self.placeholder] * n)

    # -- checking, packing, inspecting -----------------------------------------------------
    def decode_raw(self, source: Any) -> Any:
        """The decoded value without transforms; raises BadItem."""
        if self.decode is not None:
            return self.decode(source)
        return self.load(source, False, np.random.default_rng(0))

    def member_extensions(self) -> tuple[str, ...]:
        return tuple(e.lower().lstrip(".") for e in self.extensions)

    def file_suffixes(self) -> tuple[str, ...]:
        return tuple(f".{e.lower().lstrip('.')}" for e in (self.suffixes or self.extensions))

    def pack(self, value: Any) -> tuple[str, bytes]:
        """``(member extension, bytes)`` that ``data pack`` writes; raises BadItem.

        Default: inline values are decoded and written as UTF-8 under the first extension; files
        are decoded once (to check them) and their original bytes pass through under their own
        suffix when it is one of ``extensions`` (else the first extension).
        """
        if self.pack_fn is not None:
            return self.pack_fn(value)
        exts = self.member_extensions()
        if not exts:
            raise BadItem("unpackable", f"modality {self.name!r} declares no member extension")
        raw = self.decode_raw(value)
        if self.inline:
            return exts[0], str(raw).encode("utf-8")
        if isinstance(value, bytes):  # a Parquet bytes cell
            return exts[0], value
        path = Path(value)
        ext = path.suffix.lower().lstrip(".")
        return (ext if ext in exts else exts[0]), path.read_bytes()

    def inspect(self, source: Any) -> Stats:
        """Decode ``source`` (raises BadItem) and return its ``describe`` statistics."""
        raw = self.decode_raw(source)
        return dict(self.describe(raw)) if self.describe is not None else {}

    # -- robustness ----------------------------------------------------------------------
    def perturb(self, values: Any, level: float, generator: torch.Generator) -> Any:
        """Values with noise of ``level`` (``perturb_fn``); unchanged when the spec has none."""
        if self.perturb_fn is None or level == 0:
            return values
        return self.perturb_fn(values, level, generator)

    def clamp(self, values: Any) -> Any:
        """``values`` projected onto the valid input range (``clamp_fn``); unchanged when the
        spec declares no range (e.g. text, or a plugin without one)."""
        if self.clamp_fn is None:
            return values
        return self.clamp_fn(values)


class ModalityFactory(Protocol):
    """``factory(data_cfg, options, preset) -> ModalitySpec`` (options: the entry's dataclass)."""

    def __call__(self, data_cfg: DataConfig, options: Any, preset: Any) -> ModalitySpec: ...


MODALITIES: Registry[ModalityFactory] = Registry("modality", "modalign.modalities")


def check_name(name: str, where: str = "model.modalities") -> None:
    """A modality may not be named like a reserved manifest column (``id``, ``label``, ...)."""
    if name in RESERVED_COLUMNS:
        raise ConfigError(
            f"{where}: modality {name!r} is named like the reserved column {name!r} "
            f"(reserved: {', '.join(RESERVED_COLUMNS)}); rename the modality"
        )


def modality_specs(
    names: Sequence[str],
    data_cfg: DataConfig | None = None,
    presets: Mapping[str, Any] | None = None,
    extra: Mapping[str, ModalitySpec] | None = None,
) -> dict[str, ModalitySpec]:
    """Specs for ``names`` (in order) from :data:`MODALITIES` (``extra`` specs win).

    ``presets[name]`` is passed to that modality's factory (e.g. an :class:`ImagePreset`);
    options come from ``data_cfg.modality_options(name)``. An unknown name is a ConfigError
    naming it and the ``modalign.modalities`` entry-point group; a reserved name too.
    """
    data_cfg = data_cfg or DataConfig()
    presets, extra = dict(presets or {}), dict(extra or {})
    for name in data_cfg.modalities:  # a typo in an options key must not pass silently
        if name not in extra:
            MODALITIES.get(name, f"data.modalities.{name}")
    out: dict[str, ModalitySpec] = {}
    for name in names:
        check_name(name)
        if name in extra:
            out[name] = extra[name]
            continue
        entry = MODALITIES.get(name, "model.modalities")
        raw = data_cfg.modality_options(name)
        options = MODALITIES.options(name, raw, f"data.modalities.{name}")
        spec = entry.factory(data_cfg, options, presets.get(name))
        if not isinstance(spec, ModalitySpec):
            raise ConfigError(
                f"modality factory {name!r} returned {type(spec).__name__}, not a ModalitySpec"
            )
        out[name] = spec if spec.name == name else dataclasses.replace(spec, name=name)
    return out


def modality_for_path(path: str | Path, specs: Mapping[str, ModalitySpec]) -> str | None:
    """The file modality whose suffixes include ``path``'s (first in ``specs`` order), or None."""
    suffix = Path(path).suffix.lower()
    return next((m for m, s in specs.items() if not s.inline and suffix in s.file_suffixes()), None)


def default_modalities(
    cfg: DataConfig,
    image_preset: ImagePreset | None = None,
    presets: Mapping[str, Any] | None = None,
) -> dict[str, ModalitySpec]:
    """The built-in ``image``, ``audio`` and ``text`` specs (``image_preset``: old spelling of
    ``presets={"image": ...}``)."""
    presets = dict(presets or {})
    if image_preset is not None:
        presets.setdefault("image", image_preset)
    return modality_specs(["image", "audio", "text"], cfg, presets)
