"""Bundle metadata: weights fingerprint (covering external weights), plugin provenance, checks.

``modalign.json`` records which plugins built a bundle (tower kinds and modality factories, each
with its provider package and version) and the identity of every external weight set (package,
version, sha256 per file). Loading checks both before any weights are read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from modalign.core.errors import ConfigError, UserInputError
from modalign.core.registry import PluginMissing
from modalign.data.modality import MODALITIES, ImagePreset
from modalign.pretrain.model import MultimodalEncoder, external_of
from modalign.pretrain.towers import ADAPTERS, TOWERS, is_frozen
from modalign.pretrain.towers.adapters import adapter_parameter_names
from modalign.pretrain.towers.api import ExternalWeights

BUNDLE_FORMAT = "modalign.model-bundle"
"""The ``format`` of a bundle's ``modalign.json`` (also the kind its folder's lock records)."""


def external_trunk_prefixes(encoder: MultimodalEncoder) -> list[str]:
    """State-dict prefixes of frozen trunks whose weights live outside the bundle."""
    return [f"trunks.{m}." for m in external_of(encoder) if is_frozen(encoder.trunks[m])]


def adapted_external(encoder: MultimodalEncoder) -> dict[str, set[str]]:
    """Adapted trunks whose base weights live outside the bundle: modality -> the state keys of
    their adapter tensors (the only part of such a trunk a bundle stores)."""
    external = external_of(encoder)
    return {
        m: {f"trunks.{m}.{n}" for n in adapter_parameter_names(encoder.trunks[m])}
        for m in encoder.adapted()
        if m in external
    }


def is_referenced(encoder: MultimodalEncoder) -> Callable[[str], bool]:
    """Whether a state key's tensor is referenced, not stored: frozen external trunks whole,
    adapted external trunks all but their adapter tensors (their base is the external file)."""
    frozen = tuple(external_trunk_prefixes(encoder))
    adapted = adapted_external(encoder)
    prefixes = tuple(f"trunks.{m}." for m in adapted)
    keep = set().union(*adapted.values()) if adapted else set()

    def referenced(key: str) -> bool:
        return key.startswith(frozen) or (key.startswith(prefixes) and key not in keep)

    return referenced


def encoder_state(
    encoder: MultimodalEncoder, cfg: Any = None, state: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors a bundle stores (everything but referenced external weights: frozen
    external trunks, the base of adapted external trunks); ``state``: the encoder's full state
    dict when it was gathered elsewhere (sharded engines)."""
    referenced = is_referenced(encoder)
    state = encoder.state_dict() if state is None else state
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if not referenced(k)}


def adapter_record(encoder: MultimodalEncoder) -> dict[str, dict[str, Any]]:
    """Modality -> adapter of each adapted tower: kind provenance, whether its base weights are
    ``external`` (referenced) or ``stored``, and its number of adapter tensors."""
    adapted = adapted_external(encoder)
    out = {}
    for m in encoder.adapted():
        prov = dict(encoder.traits[m].adapter or {})
        names = adapter_parameter_names(encoder.trunks[m])
        out[m] = {**prov, "base": "external" if m in adapted else "stored", "tensors": len(names)}
    return out


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().numpy().tobytes())
    return h.hexdigest()[:16]


def external_record(encoder: MultimodalEncoder) -> dict[str, dict[str, Any]]:
    """Modality -> external weights (package, version, path, files) of the referenced towers."""
    return {m: e.to_dict() for m, e in sorted(external_of(encoder).items())}


def bundle_fingerprint(state: Mapping[str, torch.Tensor], external: Mapping[str, Any]) -> str:
    """Fingerprint of stored weights plus the identity of every external weight set."""
    if not external:
        return state_fingerprint(state)  # unchanged for bundles without external weights
    ident = {m: ExternalWeights(**e).identity() for m, e in sorted(external.items())}
    h = hashlib.sha256(state_fingerprint(state).encode())
    h.update(json.dumps(ident, sort_keys=True).encode())
    return h.hexdigest()[:16]


def plugin_record(
    encoder: MultimodalEncoder, extra_modalities: Mapping[str, Any] | None = None
) -> dict[str, dict[str, dict[str, str]]]:
    """Which tower kinds and modality factories built the bundle, with provider + version."""
    towers = {
        m: {"name": t.kind, "provider": t.provider, "version": t.version}
        for m, t in encoder.traits.items()
    }
    modalities = {}
    for m in encoder.modalities:
        if (extra_modalities and m in extra_modalities) or m not in MODALITIES:
            modalities[m] = {"name": m, "provider": "", "version": ""}
        else:
            modalities[m] = MODALITIES.provenance(m)
    return {"towers": towers, "modalities": modalities}


def input_presets(encoder: MultimodalEncoder) -> dict[str, dict[str, Any]]:
    """Modality -> declared input preset (JSON form) of the towers that declare one."""
    return {
        m: dataclasses.asdict(t.input_preset)
        for m, t in encoder.traits.items()
        if isinstance(t.input_preset, ImagePreset)
    }


def read_presets(meta: Mapping[str, Any]) -> dict[str, ImagePreset]:
    """Per-modality input presets of a bundle (old bundles: the single ``image_preset``)."""
    raw = dict(meta.get("input_presets") or {})
    if not raw and meta.get("image_preset"):
        raw = {"image": meta["image_preset"]}
    return {
        m: ImagePreset(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"])})
        for m, p in raw.items()
    }


def require_plugins(
    meta: Mapping[str, Any],
    where: str,
    tower_builders: Mapping[str, Any] | None = None,
    modalities: Mapping[str, Any] | None = None,
) -> None:
    """Every plugin the bundle records must be installed (or passed in); else name its package.

    An entry recorded without a provider was passed in as an argument when the bundle was
    trained: it must be passed again (a same-named entry of some other package is not it).
    """
    plugins = meta.get("plugins") or {}
    for m, rec in (plugins.get("towers") or {}).items():
        if not (tower_builders and rec["name"] in tower_builders):
            _require(TOWERS, rec, f"{where} (tower {m!r})", "tower_builders=")
    for m, rec in (plugins.get("modalities") or {}).items():
        if not (modalities and m in modalities):
            _require(MODALITIES, rec, f"{where} (modality {m!r})", "modalities=")
    for m, rec in (meta.get("adapters") or {}).items():
        _require(ADAPTERS, rec, f"{where} (adapter of tower {m!r})", "an adapter")


def _require(registry: Any, rec: Mapping[str, str], what: str, argument: str) -> None:
    name, provider = rec["name"], rec.get("provider", "")
    if not provider:
        raise ConfigError(
            f"{what} was built with {name!r} passed in as {argument} (no package provides it); "
            f"pass the same {argument} to load_bundle() / modalign.load()"
        )
    entry = registry.require(name, provider, what)
    if entry.provider != provider:
        raise UserInputError(
            f"{what} needs {registry.what} {name!r} from package {provider!r}, but the installed "
            f"one comes from {entry.provider!r}; install {provider}"
        )


def check_external(
    meta: Mapping[str, Any],
    encoder: MultimodalEncoder,
    where: str,
    skip: set[str] | frozenset[str] = frozenset(),
) -> None:
    """The external weights installed now must be the ones the bundle was trained with.

    ``skip``: towers whose trunk weights the bundle stores (the recorded external weights were
    only their initialisation; they stay in the fingerprint but are not needed to load).
    """
    now = external_record(encoder)
    for m, rec in (meta.get("external_weights") or {}).items():
        if m in skip:
            continue
        kind = encoder.traits[m].kind if m in encoder.traits else "?"
        then = ExternalWeights(**rec)
        cur = ExternalWeights(**now[m]) if m in now else None
        if cur is None or cur.identity() != then.identity():
            got = f"{cur.package or cur.path} {cur.version}".strip() if cur else "none"
            raise UserInputError(
                f"{where}: tower {m!r} ({kind}) was trained with external weights "
                f"{then.package or then.path} {then.version} (sha256 {_short(then.files)}) but "
                f"the installed ones differ ({got}, sha256 {_short(cur.files) if cur else '-'}); "
                "install the same version of the weights package or retrain the bundle"
            )


def _short(files: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v[:12]}" for k, v in sorted(files.items())) or "none"


__all__ = [
    "BUNDLE_FORMAT",
    "PluginMissing",
    "adapted_external",
    "adapter_record",
    "bundle_fingerprint",
    "check_external",
    "encoder_state",
    "external_record",
    "external_trunk_prefixes",
    "input_presets",
    "is_referenced",
    "plugin_record",
    "read_presets",
    "require_plugins",
    "state_fingerprint",
]
