"""Label-free initialisation of the projection heads (``model.towers.<m>.projection_init``).

A pretrained trunk's features carry the geometry the trunk learned; the default projection
head (torch's ``nn.Linear`` init) maps them into the shared space through a random matrix. With
few or no alignment steps (a locked tower, a small corpus) that random map is what every
downstream use (retrieval, kNN / propagation pseudo-labels, the few-label head) sees.

``random``      torch's own ``nn.Linear`` init (the default; what every earlier bundle used).
``identity``    the head starts as the identity: the shared space is the trunk's own feature
                space, L2-normalised. ``model.embed_dim`` must equal the trunk's width.
``pca``         the head starts as the projection on the top ``embed_dim`` principal
                components of the trunk's outputs, centred (bias = -W mean);
``pca_whiten``  the same, each component scaled to unit variance (PCA whitening).

The PCA is fitted on the trunk's outputs for the first ``projection_init_items`` items of
``data.train`` (read in file order without augmentation, as embedding reads them). No label
is read: this is the unsupervised statistic semi-supervised practice fits on unlabeled data.
It runs once, before step 0 of a fresh run (a resumed run restores the trained head), and the
bundle stores the trained head, so loading never refits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from modalign.core.errors import ConfigError, UserInputError
from modalign.data.modality import ModalitySpec
from modalign.pretrain.towers.api import TowerConfig

log = logging.getLogger(__name__)

__all__ = [
    "DATA_INITS",
    "PROJECTION_INITS",
    "check_projection_inits",
    "fit_projection_inits",
    "pca_projection",
]

PROJECTION_INITS = ("random", "identity", "pca", "pca_whiten")
DATA_INITS = ("pca", "pca_whiten")  # the kinds fitted on training items


def check_projection_inits(
    towers: Mapping[str, TowerConfig],
    heads: Mapping[str, nn.Module],
    widths: Mapping[str, int],
    embed_dim: int,
) -> None:
    """Refuse (ConfigError naming the key) what cannot be initialised; apply ``identity``.

    Runs when the encoder is built, before any data is read."""
    for m, head in heads.items():
        kind = towers[m].projection_init
        if kind == "random":
            continue
        key = f"model.towers.{m}.projection_init={kind}"
        if not isinstance(head, nn.Linear):
            raise ConfigError(
                f"{key} needs a linear projection head (model.towers.{m}.head=linear); "
                f"it is {towers[m].head!r}"
            )
        width = widths[m]
        if kind == "identity" and width != embed_dim:
            raise ConfigError(
                f"{key} needs model.embed_dim equal to the {m} trunk's width ({width}); it is "
                f"{embed_dim}: set model.embed_dim={width}, or projection_init=pca"
            )
        if kind in DATA_INITS and embed_dim > width:
            raise ConfigError(
                f"{key}: model.embed_dim={embed_dim} is more than the {m} trunk's width "
                f"({width}), the most principal components there are; lower model.embed_dim"
            )
        if kind == "identity":
            with torch.no_grad():
                head.weight.copy_(torch.eye(width, dtype=head.weight.dtype))
                head.bias.zero_()


def _trunk_outputs(
    encoder: Any, modality: str, source: Any, max_items: int, batch_size: int, device: Any
) -> torch.Tensor:
    """The trunk's outputs (float64, on CPU) for the first ``max_items`` present items."""
    pre, trunk = encoder.preprocessors[modality], encoder.trunks[modality]
    pre.to(device)
    trunk.to(device)  # where the run will train it (accelerate's prepare keeps it there)
    was_training = trunk.training
    trunk.eval()
    rows: list[torch.Tensor] = []
    seen = 0
    try:
        with torch.no_grad():
            for batch in source.batches(batch_size):
                if modality not in batch.inputs:
                    continue
                keep = batch.present[modality].nonzero().flatten()
                if len(keep) == 0:
                    continue
                value = batch.inputs[modality]
                if isinstance(value, torch.Tensor):
                    value = value.to(device)
                out = trunk(pre(value)).float().flatten(1)[keep.to(device)]
                rows.append(out.double().cpu()[: max_items - seen])
                seen += len(rows[-1])
                if seen >= max_items:
                    break
    finally:
        trunk.train(was_training)
    if not rows:
        return torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat(rows)


def pca_projection(
    feats: torch.Tensor, dim: int, whiten: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (dim, width), bias (dim,))`` projecting centred ``feats`` on their top ``dim``
    principal components (unit variance each when ``whiten``); signs fixed (largest |loading|
    positive) so the result does not depend on the SVD routine's sign choice."""
    mean = feats.mean(0)
    _, s, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    w = vh[:dim]
    flip = torch.sign(w.gather(1, w.abs().argmax(1, keepdim=True)))
    w = w * flip
    if whiten:
        std = s[:dim] / max(1, len(feats) - 1) ** 0.5
        w = w / std.clamp_min(1e-12 * float(std[0]) if len(std) else 1e-12)[:, None]
    return w, -(w @ mean)


def fit_projection_inits(
    encoder: Any,
    towers: Mapping[str, TowerConfig],
    train_src: Any,
    specs: Mapping[str, ModalitySpec],
    batch_size: int,
    device: Any = "cpu",
) -> dict[str, dict[str, Any]]:
    """Fit the ``pca``/``pca_whiten`` heads on the trunks' outputs for the first items of
    ``train_src`` (no labels read); returns what was fitted, per modality, for the run log."""
    from modalign.data.sources import open_eval_source

    mods = [m for m in encoder.modalities if towers[m].projection_init in DATA_INITS]
    info: dict[str, dict[str, Any]] = {}
    for m in mods:
        cfg = towers[m]
        head = encoder.heads[m]
        dim = head.out_features
        source = open_eval_source(train_src, {m: specs[m]})
        feats = _trunk_outputs(encoder, m, source, cfg.projection_init_items, batch_size, device)
        if len(feats) <= dim:
            raise UserInputError(
                f"model.towers.{m}.projection_init={cfg.projection_init}: {len(feats)} {m} "
                f"items in data.train, need more than model.embed_dim={dim} to fit "
                f"{dim} principal components; lower model.embed_dim or use projection_init=random"
            )
        weight, bias = pca_projection(feats, dim, cfg.projection_init == "pca_whiten")
        total = float(((feats - feats.mean(0)) ** 2).sum())
        kept = float(((feats - feats.mean(0)) @ (weight / weight.norm(dim=1, keepdim=True)).T)
                     .pow(2).sum())  # fmt: skip
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))
        info[m] = {
            "kind": cfg.projection_init,
            "items": len(feats),
            "explained_variance": kept / total if total > 0 else 0.0,
        }
        log.info(
            "%s projection head: %s on %d training items (%.1f%% of the variance kept)",
            m, cfg.projection_init, len(feats), 100 * info[m]["explained_variance"],
        )  # fmt: skip
    return info
