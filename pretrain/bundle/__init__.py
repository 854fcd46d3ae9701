"""Model bundles: ``config.yaml`` + ``model.safetensors`` + ``modalign.json``.

Loading never executes code from the bundle: YAML (safe loader), JSON and safetensors only.
Frozen towers whose weights come from an installed package (the bundled MiniLM text model)
are referenced, not copied, so bundles stay small; their identity (package, version, sha256 of
the weight files) is part of the fingerprint and checked on load. ``modalign.json`` also records
which plugins built the bundle; a bundle whose plugin is missing is refused naming the package.
Towers and modalities are found through their registries (``modalign.towers`` /
``modalign.modalities``); ``tower_builders=``/``modalities=`` add unregistered ones.
Every bundle also gets a model card, ``README.md`` (:mod:`modalign.pretrain.bundle.card`):
documentation outside the verified files, sealed so modalign only ever rewrites its own.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from modalign.core.artifact import atomic_files, read_json_meta, verify_files
from modalign.core.config_io import dump_yaml, from_dict, to_dict
from modalign.core.errors import UserInputError
from modalign.data.modality import ImagePreset, ModalitySpec
from modalign.pretrain.bundle.card import (
    CARD,
    CardUpdate,
    card_data,
    metric_row,
    read_card,
    update_card_metrics,
    write_card,
)
from modalign.pretrain.bundle.meta import (
    BUNDLE_FORMAT,
    adapter_record,
    bundle_fingerprint,
    check_external,
    encoder_state,
    external_record,
    input_presets,
    is_referenced,
    plugin_record,
    read_presets,
    require_plugins,
    state_fingerprint,
)
from modalign.pretrain.bundle.model import BundleModel, EmbeddingModel
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.model import MultimodalEncoder, build_encoder
from modalign.pretrain.towers import TowerBuilder

FORMAT = BUNDLE_FORMAT
FORMAT_VERSION = 2  # 2: plugins, external_weights, input_presets, files (sha256 per file)
META = "modalign.json"

__all__ = [
    "CARD",
    "FORMAT",
    "BundleModel",
    "CardUpdate",
    "EmbeddingModel",
    "card_data",
    "encoder_state",
    "load_bundle",
    "metric_row",
    "read_bundle_meta",
    "read_card",
    "save_bundle",
    "state_fingerprint",
    "update_card_metrics",
]


def save_bundle(
    out_dir: str | Path,
    encoder: MultimodalEncoder,
    cfg: PretrainConfig,
    image_preset: ImagePreset | None = None,
    extra: dict[str, Any] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the bundle files into ``out_dir`` (``atomic_files``: checkpoints/ etc. are left
    alone, each file's sha256 goes into ``modalign.json``, written last).

    ``modalities``: specs passed in rather than registered (recorded without a provider).
    ``state``: the encoder's full state dict when its parameters are sharded (FSDP, DeepSpeed).
    """
    from safetensors.torch import save  # bytes, so a write error names the path

    out_dir = Path(out_dir)
    state = encoder_state(encoder, state=state)
    external = external_record(encoder)
    presets = input_presets(encoder)
    if image_preset is not None and not presets:
        presets = {"image": dataclasses.asdict(image_preset)}
    with atomic_files(out_dir, META) as (tmp, meta):
        (tmp / "model.safetensors").write_bytes(save(state))
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        meta.update(
            {
                **(extra or {}),
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "modalities": encoder.modalities,
                "embed_dim": encoder.embed_dim,
                "fingerprint": bundle_fingerprint(state, external),
                "image_preset": next(iter(presets.values()), None),
                "input_presets": presets,
                "towers": {
                    m: {"kind": cfg.model.towers[m].kind, "arch": cfg.model.towers[m].arch}
                    for m in encoder.modalities
                },
                "plugins": plugin_record(encoder, modalities),
                "external_weights": external,
                "adapters": adapter_record(encoder),
                "versions": _versions(),
            }
        )
    # The model card is documentation, written after modalign.json and not among its verified
    # files: editing it never breaks loading; a foreign or edited README.md is left alone.
    write_card(out_dir, card_data(meta, to_dict(cfg)))
    return out_dir


def _versions() -> dict[str, str]:
    import timm

    from modalign.core.version import __version__

    return {
        "modalign": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    """``modalign.json`` of a bundle dir (format and version checked)."""
    return read_json_meta(
        Path(path) / META,
        "model bundle",
        "pass the output.dir of `modalign pretrain`",
        format=FORMAT,
        max_version=FORMAT_VERSION,
    )


def _read_config(path: Path, stored: set[str] | None = None) -> PretrainConfig:
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"{path / 'config.yaml'}: unreadable bundle config ({exc})") from None
    # A bundle written from the full app config also holds other sections (finetune...).
    sections = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = from_dict(PretrainConfig, {k: v for k, v in (raw or {}).items() if k in sections}, "")
    for m, tower in cfg.model.towers.items():
        if stored is None or m in stored:
            tower.weights = ""  # the bundle holds the trained weights; don't re-read init files
    return cfg


def stored_trunks(state: Mapping[str, Any], modalities: list[str]) -> set[str]:
    """Modalities whose trunk weights the bundle stores (the others reference external ones)."""
    return {m for m in modalities if any(k.startswith(f"trunks.{m}.") for k in state)}


def load_bundle(
    path: str | Path,
    device: str = "cpu",
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> BundleModel:
    """Load a model bundle directory written by :func:`save_bundle`.

    Plugin towers and modalities come from the registries; ``tower_builders``/``modalities``
    add unregistered ones (bundles never carry code). Refused (exit 2) when a recorded plugin
    is missing (naming the package), a file's checksum does not match, or a tower's external
    weights differ from the ones it was trained with (naming the tower).
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_bundle_meta(path)
    verify_files(path, meta, "model bundle")
    require_plugins(meta, str(path), tower_builders, modalities)
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise UserInputError(
            f"{weights}: cannot read model weights ({exc}); re-export the bundle"
        ) from None
    # Frozen external trunks (not stored) are rebuilt from their recorded weights file or dir;
    # stored trunks need no init file (their trained weights are in the bundle).
    stored = stored_trunks(state, list(meta.get("modalities") or []))
    # An adapted tower whose base is referenced stores only its adapter: its base is rebuilt.
    stored -= {m for m, a in (meta.get("adapters") or {}).items() if a.get("base") == "external"}
    cfg = _read_config(path, stored)
    encoder = build_encoder(cfg.model, cfg.data, tower_builders).encoder
    check_external(meta, encoder, str(path), skip=stored)
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another architecture than the bundle's
        raise UserInputError(
            f"{weights}: weights do not fit the towers built from the bundle config "
            f"({str(exc).splitlines()[-1].strip()}); was it trained with another plugin version?"
        ) from None
    referenced = is_referenced(encoder)
    missing = [k for k in missing if not referenced(k)]
    if missing or unexpected:
        raise UserInputError(
            f"{weights}: weights do not match the bundle config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    return BundleModel(encoder, cfg, meta, path, device, modalities, read_presets(meta))
