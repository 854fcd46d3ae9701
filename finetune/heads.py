"""Built-in fusion heads and the fusion-head registry (group ``modalign.heads``).

A head is one registration: ``HEADS.add(name, factory, OptionsDataclass)`` where
``factory(dims, num_classes, options) -> FusionHead``. Config names the head and its options
(``finetune.head: {kind: lowrank, options: {rank: 8}}`` or just ``finetune.head: late``); the
resolved options are stored in ``classifier.json`` so :func:`build_head_from_options` rebuilds
the same head on load. See :mod:`modalign.finetune.head_base` for the head interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import Tensor, nn

from modalign.core.config_io import AT_LEAST_1, Range, to_dict
from modalign.core.errors import UserInputError
from modalign.core.registry import Registry
from modalign.finetune.head_base import FusionHead, check_head_args, mlp, modality_dropout

HeadFactory = Callable[[Mapping[str, int], int, object], FusionHead]
HEADS: Registry[HeadFactory] = Registry("fusion head", "modalign.heads")


@dataclass(frozen=True)
class HeadOptions:
    """Options every built-in head takes: hidden width and dropout."""

    hidden: Annotated[int, AT_LEAST_1] = 256
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class ConcatOptions(HeadOptions):
    missing: str = "learned"  # "learned" fill vector per modality, or "zero"


@dataclass(frozen=True)
class TransformerOptions(HeadOptions):
    layers: Annotated[int, AT_LEAST_1] = 2
    heads: Annotated[int, AT_LEAST_1] = 4


@dataclass(frozen=True)
class LowRankOptions(HeadOptions):
    rank: Annotated[int, AT_LEAST_1] = 4


class ConcatHead(FusionHead):
    """Early fusion: concatenated (filled) modality vectors plus presence bits into an MLP.

    ``missing="learned"`` fills absent rows with a trained per-modality vector, ``"zero"`` with 0.
    The presence bits let the MLP tell a real zero vector from a missing one.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int,
        hidden: int = 256,
        dropout: float = 0.1,
        missing: str = "learned",
    ) -> None:
        super().__init__(dims, num_classes)
        if missing not in ("learned", "zero"):
            raise UserInputError(
                f"concat head: missing must be 'learned' or 'zero', got {missing!r}"
            )
        self.missing = nn.ParameterList(
            nn.Parameter(torch.zeros(self.dims[m]), requires_grad=missing == "learned")
            for m in self.modalities
        )
        in_dim = sum(self.dims.values()) + len(self.modalities)
        self.mlp = mlp(in_dim, hidden, num_classes, dropout)

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        parts = [
            torch.where(mask[:, i, None], x, fill)
            for i, (x, fill) in enumerate(zip(inputs, self.missing))
        ]
        parts.append(mask.to(inputs[0].dtype))
        return self.mlp(torch.cat(parts, dim=1))


class LateHead(FusionHead):
    """Late fusion: one MLP per modality; logits averaged over the modalities present in a row."""

    def __init__(
        self, dims: Mapping[str, int], num_classes: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__(dims, num_classes)
        self.heads = nn.ModuleList(
            mlp(self.dims[m], hidden, num_classes, dropout) for m in self.modalities
        )

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        logits = torch.stack([head(x) for head, x in zip(self.heads, inputs)], dim=1)
        total = torch.where(mask[..., None], logits, torch.zeros_like(logits)).sum(dim=1)
        # clamp keeps empty rows finite; base class replaces them with the prior anyway.
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
        return total / count


class GatedHead(FusionHead):
    """Gated-attention fusion (Ilse et al. 2018 style) over per-modality projections.

    Each modality is projected to ``hidden``; a scalar score ``w^T (tanh(V h) * sigmoid(U h))``
    is computed per modality and softmax-normalised over the modalities present in the row.
    """

    def __init__(
        self, dims: Mapping[str, int], num_classes: int, hidden: int = 256, dropout: float = 0.1
    ) -> None:
        super().__init__(dims, num_classes)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(self.dims[m], hidden), nn.GELU(), nn.LayerNorm(hidden))
            for m in self.modalities
        )
        attn = max(hidden // 2, 1)
        self.gate_v = nn.Linear(hidden, attn)
        self.gate_u = nn.Linear(hidden, attn)
        self.gate_w = nn.Linear(attn, 1)
        self.classifier = mlp(hidden, hidden, num_classes, dropout)

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        h = torch.stack([proj(x) for proj, x in zip(self.proj, inputs)], dim=1)  # (B, M, H)
        scores = self.gate_w(torch.tanh(self.gate_v(h)) * torch.sigmoid(self.gate_u(h))).squeeze(-1)
        # A finite floor (not -inf) keeps all-absent rows NaN-free, so their gradients stay clean.
        floor = torch.full_like(scores, torch.finfo(scores.dtype).min)
        weights = torch.softmax(torch.where(mask, scores, floor), dim=1)
        fused = (weights[..., None] * h).sum(dim=1)
        return self.classifier(fused)


class TransformerHead(FusionHead):
    """A small transformer encoder over one token per modality plus a CLS token.

    Absent modalities get a learned "missing" token; every token gets a modality-type embedding,
    so the encoder knows which slot is which. Logits come from the CLS output.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int,
        hidden: int = 256,
        dropout: float = 0.1,
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__(dims, num_classes)
        if layers < 1 or heads < 1 or hidden % heads:
            raise UserInputError(
                f"transformer head: need layers >= 1, heads >= 1 and hidden divisible by heads "
                f"(got layers={layers}, heads={heads}, hidden={hidden})"
            )
        self.proj = nn.ModuleList(nn.Linear(self.dims[m], hidden) for m in self.modalities)
        self.missing_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(len(self.modalities), hidden) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(
            hidden,
            heads,
            dim_feedforward=2 * hidden,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, num_classes)

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        tokens = torch.stack(
            [
                torch.where(mask[:, i, None], proj(x), self.missing_token)
                for i, (proj, x) in enumerate(zip(self.proj, inputs))
            ],
            dim=1,
        )
        tokens = tokens + self.type_embed
        cls = self.cls_token.expand(tokens.shape[0], 1, -1)
        encoded = self.encoder(torch.cat([cls, tokens], dim=1))
        return self.out(self.norm(encoded[:, 0]))


class LowRankHead(FusionHead):
    """Low-rank multimodal fusion (LMF, Liu et al. 2018).

    Each modality vector gets a constant 1 appended (so the product keeps unimodal and lower-order
    terms), is mapped by ``rank`` factor matrices, and the factors are multiplied elementwise across
    modalities and summed over rank with learned weights. Absent modalities use a learned vector.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_classes: int,
        hidden: int = 256,
        dropout: float = 0.1,
        rank: int = 4,
    ) -> None:
        super().__init__(dims, num_classes)
        if rank < 1:
            raise UserInputError(f"lowrank head: rank must be >= 1, got {rank}")
        self.missing = nn.ParameterList(
            nn.Parameter(torch.zeros(self.dims[m])) for m in self.modalities
        )
        self.factors = nn.ParameterList(
            nn.Parameter(self._factor_init(rank, self.dims[m] + 1, hidden)) for m in self.modalities
        )
        self.rank_weights = nn.Parameter(torch.randn(rank) / rank**0.5)
        self.fusion_bias = nn.Parameter(torch.zeros(hidden))
        self.classifier = nn.Sequential(
            nn.LayerNorm(hidden), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    @staticmethod
    def _factor_init(rank: int, in_dim: int, hidden: int) -> Tensor:
        factor = torch.empty(rank, in_dim, hidden)
        for r in range(rank):
            nn.init.xavier_normal_(factor[r])
        return factor

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        product = None
        for i, (x, fill, factor) in enumerate(zip(inputs, self.missing, self.factors)):
            x = torch.where(mask[:, i, None], x, fill)
            z = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            projected = torch.einsum("bd,rdh->brh", z, factor)
            product = projected if product is None else product * projected
        fused = torch.einsum("r,brh->bh", self.rank_weights, product) + self.fusion_bias
        return self.classifier(fused)


def _from_class(cls: type[FusionHead]) -> HeadFactory:
    def factory(dims: Mapping[str, int], num_classes: int, opts: object) -> FusionHead:
        return cls(dims, num_classes, **to_dict(opts))

    factory.__doc__ = cls.__doc__
    return factory


HEADS.add("concat", _from_class(ConcatHead), ConcatOptions)
HEADS.add("late", _from_class(LateHead), HeadOptions)
HEADS.add("gated", _from_class(GatedHead), HeadOptions)
HEADS.add("transformer", _from_class(TransformerHead), TransformerOptions)
HEADS.add("lowrank", _from_class(LowRankHead), LowRankOptions)
HEAD_KINDS: tuple[str, ...] = ("concat", "late", "gated", "transformer", "lowrank")  # built-ins


def head_options(kind: str, raw: Mapping[str, object] | object | None, where: str) -> object:
    """Typed, resolved options of head ``kind`` (ConfigError naming ``where.KEY`` when bad)."""
    return HEADS.options(kind, raw, where)


def build_head_from_options(
    kind: str, dims: Mapping[str, int], num_classes: int, opts: object
) -> FusionHead:
    """Build a registered head from its resolved options (what ``classifier.json`` stores)."""
    entry = HEADS.get(kind, "finetune.head.kind")
    check_head_args(dims, num_classes)
    return entry.factory(dict(dims), num_classes, HEADS.options(kind, opts, "finetune.head"))


def build_head(
    kind: str,
    dims: dict[str, int],
    num_classes: int,
    hidden: int = 256,
    dropout: float = 0.1,
    **kw: object,
) -> FusionHead:
    """Build a fusion head of ``kind`` with flat keyword options (``rank=8``, ``layers=3``).

    Unknown kinds or options raise :class:`~modalign.core.errors.ConfigError` (a UserInputError).
    """
    opts = head_options(kind, {"hidden": hidden, "dropout": dropout, **kw}, "head")
    return build_head_from_options(kind, dims, num_classes, opts)


__all__ = [
    "HEADS",
    "HEAD_KINDS",
    "ConcatHead",
    "ConcatOptions",
    "FusionHead",
    "GatedHead",
    "HeadOptions",
    "LateHead",
    "LowRankHead",
    "LowRankOptions",
    "TransformerHead",
    "TransformerOptions",
    "build_head",
    "build_head_from_options",
    "head_options",
    "modality_dropout",
]
