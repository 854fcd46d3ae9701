"""The multimodal encoder (towers -> projection -> shared space) and the contrastive task."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalign.data.batch import Batch
from modalign.data.config import DataConfig
from modalign.data.item_keys import item_keys
from modalign.data.modality import ImagePreset
from modalign.pretrain.config import ModelConfig
from modalign.pretrain.losses import ContrastiveLoss, LossOutput
from modalign.pretrain.projection_init import check_projection_inits
from modalign.pretrain.towers import (
    TowerBuilder,
    apply_adapter,
    apply_lock,
    is_frozen,
    resolve_builder,
    tower_traits,
)
from modalign.pretrain.towers.adapters import freeze_norm_statistics
from modalign.pretrain.towers.api import ExternalWeights, TowerTraits


def projection_head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


class MultimodalEncoder(nn.Module):
    """Per-modality preprocessor -> trunk -> head -> L2 normalisation, keyed by modality name.

    ``encoder({"image": x, "text": ["a cat"]})`` -> ``{"image": (B, D), "text": (1, D)}``.
    """

    def __init__(
        self,
        parts: Mapping[str, Any],
        embed_dim: int,
        head_kinds: Mapping[str, str],
        traits: Mapping[str, TowerTraits] | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        # Declared tower properties (compilable, external weights...): plain data, not modules.
        self.traits: dict[str, TowerTraits] = dict(traits or {})
        self.preprocessors = nn.ModuleDict({m: p.preprocessor for m, p in parts.items()})
        self.trunks = nn.ModuleDict({m: p.trunk for m, p in parts.items()})
        # Each trunk's ordered layer groups as its tower declares them (callables over the
        # trunks' own parameters, not modules): what ``optim.layer_decay`` scales.
        self._layer_groups = {m: p.groups for m, p in parts.items()}
        self.heads = nn.ModuleDict(
            {
                m: projection_head(p.out_dim, embed_dim, head_kinds.get(m, "linear"))
                for m, p in parts.items()
            }
        )

    @property
    def modalities(self) -> list[str]:
        return list(self.trunks.keys())

    def layer_groups(self, modality: str) -> list[list[nn.Parameter]]:
        """``modality``'s trunk parameters in ordered groups (first = closest to the input)."""
        return self._layer_groups[modality]()

    def train(self, mode: bool = True) -> MultimodalEncoder:
        super().train(mode)
        for m, trunk in self.trunks.items():
            if is_frozen(trunk):
                trunk.eval()
            elif m in self.traits and self.traits[m].adapter is not None:
                freeze_norm_statistics(trunk)  # an adapted trunk's base stays as loaded
        return self

    def adapted(self) -> list[str]:
        """Modalities whose trunk carries an adapter (its base frozen)."""
        return [m for m, t in self.traits.items() if t.adapter is not None]

    def encode(
        self,
        modality: str,
        value: Any,
        normalize: bool = True,
        trunk_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One modality through preprocessor -> trunk -> head (-> L2 normalisation).

        ``trunk_out``: the trunk's output, already computed (a frozen tower run in the loader,
        see :mod:`modalign.pretrain.towers.in_loader`); then only the head runs."""
        if trunk_out is None:
            x = self.trunks[modality](self.preprocessors[modality](value))
        else:
            x = trunk_out
        head = self.heads[modality]
        # A float64 trunk output (e.g. from numpy) meets the head in the head's own dtype.
        weight = next(head.parameters(), None)
        if x.dtype == torch.float64 and weight is not None and weight.dtype != torch.float64:
            x = x.to(weight.dtype)
        z = head(x)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(
        self,
        inputs: Mapping[str, Any],
        normalize: bool = True,
        encoded: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Embeddings of the modalities in ``inputs``; ``encoded[m]`` (trunk outputs computed
        elsewhere) replaces preprocessor + trunk for ``m``."""
        done = encoded or {}
        return {
            m: self.encode(m, inputs[m], normalize, done.get(m))
            for m in self.modalities
            if m in inputs
        }


@dataclass
class BuiltModel:
    """An encoder plus what its towers declared (presets, external weights, provenance)."""

    encoder: MultimodalEncoder
    image_preset: ImagePreset | None
    external: dict[str, dict[str, Any]] = field(default_factory=dict)  # modality -> weights

    @property
    def traits(self) -> dict[str, TowerTraits]:
        return self.encoder.traits

    @property
    def input_presets(self) -> dict[str, ImagePreset]:
        """Each tower's own input preset (modality -> preset), for towers that declare one."""
        return {m: t.input_preset for m, t in self.traits.items() if t.input_preset is not None}

    @property
    def compilable(self) -> dict[str, bool]:
        """Which trunks take tensors and may be ``torch.compile``-d (modality -> bool)."""
        return {m: t.compilable for m, t in self.traits.items()}


def build_encoder(
    cfg: ModelConfig, data_cfg: DataConfig, builders: Mapping[str, TowerBuilder] | None = None
) -> BuiltModel:
    """Build towers for ``cfg.modalities`` from the tower registry (plus extra ``builders``)."""
    parts, traits = {}, {}
    for m in cfg.modalities:
        builder, provenance = resolve_builder(m, cfg.towers[m].kind, builders)
        parts[m] = builder(cfg.towers[m], data_cfg)
        apply_lock(parts[m], cfg.towers[m])
        adapter = apply_adapter(m, parts[m], cfg.towers[m])
        traits[m] = tower_traits(parts[m], provenance, adapter)
    encoder = MultimodalEncoder(
        parts, cfg.embed_dim, {m: cfg.towers[m].head for m in parts}, traits
    )
    # identity heads are set here; pca heads are fitted by the trainer on data.train
    check_projection_inits(
        cfg.towers,
        dict(encoder.heads.items()),
        {m: p.out_dim for m, p in parts.items()},
        cfg.embed_dim,
    )
    preset = next((p.input_preset for p in parts.values() if p.input_preset is not None), None)
    external = {m: t.external.to_dict() for m, t in traits.items() if t.external is not None}
    return BuiltModel(encoder, preset, external)


def external_of(encoder: MultimodalEncoder) -> dict[str, ExternalWeights]:
    """Modality -> external weights of the towers that reference weights outside bundles."""
    return {m: t.external for m, t in encoder.traits.items() if t.external is not None}


@dataclass
class TaskOutput:
    loss: LossOutput
    features: dict[str, torch.Tensor]


class ContrastiveTask(nn.Module):
    """Owns the encoder and the loss; reads a typed :class:`Batch`."""

    def __init__(self, encoder: MultimodalEncoder, loss: ContrastiveLoss) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    def forward(self, batch: Batch, features_only: bool = False) -> Any:
        """Encode ``batch`` (inside its per-item augmentation keys) and, unless
        ``features_only``, apply the loss."""
        inputs = {m: v for m, v in batch.inputs.items() if m in self.encoder.modalities}
        with item_keys(batch.keys):
            features = self.encoder(inputs, encoded=batch.encoded)
        if features_only:
            return features
        return TaskOutput(self.loss(features, batch.present), features)
