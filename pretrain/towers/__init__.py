"""Towers per modality, built by builders registered in :data:`TOWERS` (ImageBind-style parts).

A builder turns a :class:`TowerConfig` into :class:`TowerParts`: an on-device preprocessor
(log-mel for audio, identity for images), a trunk (timm / sentence-transformers), its output
width and its declared properties. The model adds a projection head and L2 normalisation.
Builders never see the trainer, Accelerate or the data pipeline.

Adding a tower kind: ``TOWERS.add("my_kind", builder)``, or from another package an entry point
in group ``modalign.towers`` naming a hook ``hook(registry)`` that calls ``registry.add``.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.pretrain.towers.adapters import ADAPTERS, AdapterConfig, inject_adapter
from modalign.pretrain.towers.api import (
    TOWERS,
    ExternalWeights,
    TowerBuilder,
    TowerConfig,
    TowerParts,
    TowerTraits,
    external_weights,
    numbered_layer_groups,
)
from modalign.pretrain.towers.text import (
    SentenceTransformerTrunk,
    build_sentence_transformer,
    bundled_text_model_path,
)
from modalign.pretrain.towers.timm import (
    AudioFrontEnd,
    TimmOptions,
    build_timm_audio,
    build_timm_image,
    load_local_weights,
    timm_layer_groups,
)

TOWERS.add("timm_image", build_timm_image, TimmOptions)
TOWERS.add("timm_audio", build_timm_audio, TimmOptions)
TOWERS.add("sentence_transformer", build_sentence_transformer)


def _register_pretrained_kinds() -> None:
    """open_clip and transformers kinds (their libraries are imported only when built)."""
    from modalign.pretrain.towers.hf import (
        HFOptions,
        build_hf_audio,
        build_hf_text,
        build_hf_vision,
    )
    from modalign.pretrain.towers.openclip import OpenClipOptions, build_open_clip

    TOWERS.add("open_clip", build_open_clip, OpenClipOptions)
    TOWERS.add("hf_vision", build_hf_vision, HFOptions)
    TOWERS.add("hf_audio", build_hf_audio, HFOptions)
    TOWERS.add("hf_text", build_hf_text, HFOptions)


_register_pretrained_kinds()

__all__ = [
    "ADAPTERS",
    "TOWERS",
    "AdapterConfig",
    "AudioFrontEnd",
    "ExternalWeights",
    "SentenceTransformerTrunk",
    "TowerBuilder",
    "TowerParts",
    "TowerTraits",
    "apply_adapter",
    "apply_lock",
    "build_tower",
    "bundled_text_model_path",
    "default_tower_builders",
    "external_weights",
    "is_frozen",
    "load_local_weights",
    "numbered_layer_groups",
    "parameter_groups",
    "timm_layer_groups",
]


def default_tower_builders() -> dict[str, TowerBuilder]:
    """Back-compat view of :data:`TOWERS` (built-ins and installed plugins) by kind."""
    return {e.name: e.factory for e in TOWERS}


def resolve_builder(
    name: str, kind: str, builders: Mapping[str, TowerBuilder] | None = None
) -> tuple[TowerBuilder, dict[str, str]]:
    """The builder for ``kind`` (extra ``builders`` first, then the registry) + its provenance."""
    if builders and kind in builders:
        registered = kind in TOWERS and TOWERS.get(kind).factory is builders[kind]
        if not registered:  # passed in by the caller: no package provides it
            return builders[kind], {"name": kind, "provider": "", "version": ""}
    if kind not in TOWERS:
        raise ConfigError(
            f"model.towers.{name}.kind: unknown tower kind {kind!r}; valid: "
            f"{', '.join(sorted({*TOWERS.names(), *(builders or {})}))} (install the plugin that "
            "provides it, register it with TOWERS.add, or pass it as tower_builders= to "
            "pretrain() and load_bundle())"
        )
    return TOWERS.get(kind).factory, TOWERS.provenance(kind)


def build_tower(
    name: str,
    cfg: TowerConfig,
    data_cfg: DataConfig,
    builders: Mapping[str, TowerBuilder] | None = None,
) -> TowerParts:
    """Build modality ``name``'s tower from its config and lock it as configured."""
    builder, _ = resolve_builder(name, cfg.kind, builders)
    parts = builder(cfg, data_cfg)
    apply_lock(parts, cfg)
    apply_adapter(name, parts, cfg)
    return parts


def apply_adapter(name: str, parts: TowerParts, cfg: TowerConfig) -> dict[str, str] | None:
    """Inject ``cfg.adapter`` (if any) into modality ``name``'s trunk: its base is frozen and
    only the adapter trains. Returns the adapter kind's provenance (None without adapter).

    The targets are ``adapter.options.target_modules`` or the tower's declared
    ``adapter_targets``; none matching is exit 2 naming the tower and listing its layers."""
    if not cfg.adapter.enabled:
        return None
    where = f"model.towers.{name}"
    cfg.adapter.check(where, cfg.lock)
    inject_adapter(parts.trunk, cfg.adapter, parts.adapter_targets, where)
    return ADAPTERS.provenance(cfg.adapter.kind)


def tower_traits(
    parts: TowerParts, provenance: Mapping[str, str], adapter: dict[str, str] | None = None
) -> TowerTraits:
    """The declared properties of a built tower, with where its builder came from (and its
    adapter kind's, for an adapted tower)."""
    return TowerTraits(
        kind=provenance["name"],
        provider=provenance.get("provider", ""),
        version=provenance.get("version", ""),
        compilable=parts.compilable,
        cache_outputs=parts.cache_outputs,
        input_preset=parts.input_preset,
        external=parts.external,
        adapter=adapter,
    )


def apply_lock(parts: TowerParts | nn.Module, cfg: TowerConfig) -> None:
    """Freeze a trunk fully (``lock=all``) or all but its last ``unlocked_groups`` (LiT)."""
    if cfg.lock == "none":
        return
    if not isinstance(parts, TowerParts):
        parts = TowerParts(nn.Identity(), parts, 0)
    parts.trunk.requires_grad_(False)
    if cfg.lock == "partial" and cfg.unlocked_groups > 0:
        for group in parts.groups()[-cfg.unlocked_groups :]:
            for p in group:
                p.requires_grad_(True)


def is_frozen(trunk: nn.Module) -> bool:
    """A trunk with no trainable parameter; kept in eval mode so BN/dropout stay fixed."""
    return not any(p.requires_grad for p in trunk.parameters())


def parameter_groups(parts: TowerParts | nn.Module) -> list[list[nn.Parameter]]:
    """Ordered layer groups of a built tower (a bare module: numbered transformer layers)."""
    if isinstance(parts, TowerParts):
        return parts.groups()
    return numbered_layer_groups(parts)
