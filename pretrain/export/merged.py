"""The ``bundle`` export format: a model bundle, with ``merge`` its adapters folded into the base.

A bundle whose towers carry peft adapters (``model.towers.<m>.adapter``) stores only the adapter
tensors and references each base's weights file (path + sha256). ``modalign export --format
bundle --merge`` (or :func:`~modalign.pretrain.export.merge_adapters`) loads it, folds every adapter into its base
layer's weights with peft's own ``merge`` and writes a *standalone* model bundle: every trunk
tensor stored, no adapter in its config, the same embeddings (checked on a probe input before
anything is handed over: a difference above 1e-5 refuses the export). Its ``modalign.json``
records ``merged_from`` (the adapted bundle's fingerprint); the folder loads with
``modalign.load`` like any bundle and no longer needs the base weights file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modalign.core.errors import UserInputError
from modalign.pretrain.bundle import BundleModel, save_bundle
from modalign.pretrain.towers.adapters import AdapterConfig, merge_into_base

MERGE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class BundleExportOptions:
    """``export.bundle`` options: ``merge`` folds every adapter into its tower's base weights
    (a standalone bundle); without it the bundle is re-written as it is."""

    merge: bool = False


def _probe(model: BundleModel) -> dict[str, Any]:
    """A fixed input for every adapted modality (collated placeholders: zeros / empty text)."""
    specs = model.modality_specs()
    gen = torch.Generator().manual_seed(0)
    probe: dict[str, Any] = {}
    for m in model.encoder.adapted():
        ph = specs[m].placeholder
        if isinstance(ph, torch.Tensor):
            probe[m] = torch.rand((2, *ph.shape), generator=gen, dtype=ph.dtype)
        else:
            probe[m] = specs[m].collate([ph, ph])
    return probe


def merge_encoder(model: BundleModel) -> list[str]:
    """Fold the adapters of ``model``'s towers into their base weights, in place; the config
    and traits then describe plain (unlocked, stored) towers. Returns the merged modalities.
    Refused (exit 2) when the merged output differs from the adapted one by more than 1e-5."""
    encoder = model.encoder
    adapted = encoder.adapted()
    probe = _probe(model)
    before = model.encode_batch(probe)
    for m in adapted:
        trunk = encoder.trunks[m]
        merge_into_base(trunk)
        # The merged tower is a plain ``lock: none`` tower whose weights the bundle stores.
        trunk.requires_grad_(True)
        encoder.traits[m] = dataclasses.replace(encoder.traits[m], adapter=None)
        model.cfg.model.towers[m].adapter = AdapterConfig()
    after = model.encode_batch(probe)
    for m in adapted:
        diff = float((before[m] - after[m]).abs().max())
        if diff > MERGE_TOLERANCE:
            raise UserInputError(
                f"{model.path}: merging tower {m!r}'s adapter changes its embeddings by {diff:.2e} "
                f"(> {MERGE_TOLERANCE}); export without --merge"
            )
    return adapted


def export_bundle_format(model: BundleModel, out: Path, opts: BundleExportOptions) -> dict:
    """Write ``model`` as a model bundle into ``out`` (``merge``: adapters folded in first)."""
    merged: list[str] = []
    if opts.merge:
        if not model.encoder.adapted():
            raise UserInputError(
                f"{model.path}: --merge: no tower of this bundle has an adapter "
                "(model.towers.<m>.adapter); export without --merge"
            )
        merged = merge_encoder(model)
    keep = ("step", "command", "training_data")
    extra = {k: model.meta[k] for k in keep if k in model.meta}
    extra["merged_from"] = model.fingerprint if merged else None
    save_bundle(out, model.encoder, model.cfg, extra=extra)
    return {"merged": merged}


__all__ = ["BundleExportOptions", "export_bundle_format", "merge_encoder"]
