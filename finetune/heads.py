"""Fusion heads that classify from any subset of modality embeddings.

Every head has the same interface, ``head(embeddings, present) -> logits (B, C)``:

* ``embeddings`` maps a modality name to a ``(B, D_m)`` tensor. A modality the head knows but that
  is not in the dict is treated as absent for every row, so one set of weights serves any subset
  of modalities at inference. Names the head does not know are ignored.
* ``present`` maps a modality name to a ``(B,)`` bool tensor. A modality in ``embeddings`` but not
  in ``present`` (or ``present=None``) counts as present on every row.

The values stored in an absent row are garbage (zeros, noise, NaN) and never reach any arithmetic:
the base class swaps them out with ``torch.where`` before a head sees them, so outputs and gradients
do not depend on them, not even through ``NaN * 0``.

A row with no modality present gets the head's learned class prior, ``head.prior`` (starts at zero,
i.e. uniform; it trains only if such rows occur in training).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

from modalign.core.errors import UserInputError

HEAD_KINDS: tuple[str, ...] = ("concat", "late", "gated", "transformer", "lowrank")


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


def _check_config(dims: Mapping[str, int], num_classes: int, hidden: int, dropout: float) -> None:
    if not dims:
        raise UserInputError("a fusion head needs at least one modality in `dims`")
    for name, dim in dims.items():
        if not isinstance(name, str) or not name:
            raise UserInputError(f"modality names must be non-empty strings, got {name!r}")
        if not isinstance(dim, int) or dim < 1:
            raise UserInputError(
                f"embedding dim of modality {name!r} must be a positive int, got {dim!r}"
            )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserInputError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(hidden, int) or hidden < 1:
        raise UserInputError(f"hidden must be a positive int, got {hidden!r}")
    if not 0.0 <= dropout < 1.0:
        raise UserInputError(f"dropout must be in [0, 1), got {dropout!r}")


class FusionHead(nn.Module):
    """Base class: validates inputs, hides absent rows' values, applies the empty-row prior.

    Subclasses implement :meth:`_fuse`, which receives one ``(B, D_m)`` tensor per modality in
    ``self.modalities`` order (absent rows already zero-filled, never garbage) and the ``(B, M)``
    presence mask, and returns ``(B, C)`` logits.
    """

    def __init__(self, dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        # Sorted so parameter order (stored by index) does not depend on dict insertion order.
        self.modalities: tuple[str, ...] = tuple(sorted(dims))
        self.dims: dict[str, int] = {m: int(dims[m]) for m in self.modalities}
        self.num_classes = num_classes
        self.prior = nn.Parameter(torch.zeros(num_classes))

    def forward(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Return ``(B, num_classes)`` logits for the rows of ``embeddings``."""
        inputs, mask = self._prepare(embeddings, present or {})
        logits = self._fuse(inputs, mask)
        any_present = mask.any(dim=1, keepdim=True)
        return torch.where(any_present, logits, self.prior.expand_as(logits))

    def _fuse(self, inputs: list[Tensor], mask: Tensor) -> Tensor:
        raise NotImplementedError

    def _prepare(
        self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor]
    ) -> tuple[list[Tensor], Tensor]:
        batch = self._batch_size(embeddings, present)
        device, dtype = self.prior.device, self.prior.dtype
        inputs, columns = [], []
        for name in self.modalities:
            rows = present.get(name)
            x = embeddings.get(name)
            if x is None:
                if rows is not None and bool(rows.any()):
                    raise UserInputError(
                        f"modality {name!r} is marked present but has no embeddings"
                    )
                x = torch.zeros(batch, self.dims[name], device=device, dtype=dtype)
                rows = torch.zeros(batch, dtype=torch.bool, device=device)
            elif rows is None:
                rows = torch.ones(batch, dtype=torch.bool, device=device)
            self._check_shapes(name, x, rows, batch)
            rows = rows.to(device=device, dtype=torch.bool)
            # Absent rows may hold NaN: select zeros instead (never multiply by the mask).
            x = x.to(device=device, dtype=dtype)
            inputs.append(
                torch.where(rows[:, None], x, torch.zeros((), device=device, dtype=dtype))
            )
            columns.append(rows)
        return inputs, torch.stack(columns, dim=1)

    def _batch_size(self, embeddings: Mapping[str, Tensor], present: Mapping[str, Tensor]) -> int:
        for source in (embeddings, present):
            for name in self.modalities:
                if name in source:
                    return int(source[name].shape[0])
        raise UserInputError(
            f"none of the head's modalities {list(self.modalities)} was given; cannot infer batch size"
        )

    def _check_shapes(self, name: str, x: Tensor, rows: Tensor, batch: int) -> None:
        if x.dim() != 2 or x.shape[1] != self.dims[name]:
            raise UserInputError(
                f"modality {name!r}: expected embeddings of shape (B, {self.dims[name]}), "
                f"got {tuple(x.shape)}"
            )
        if x.shape[0] != batch or tuple(rows.shape) != (batch,):
            raise UserInputError(
                f"modality {name!r}: batch size mismatch (embeddings {tuple(x.shape)}, "
                f"present {tuple(rows.shape)}, expected {batch} rows)"
            )


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
        self.mlp = _mlp(in_dim, hidden, num_classes, dropout)

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
            _mlp(self.dims[m], hidden, num_classes, dropout) for m in self.modalities
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
        self.classifier = _mlp(hidden, hidden, num_classes, dropout)

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


_HEAD_CLASSES: Mapping[str, type[FusionHead]] = MappingProxyType(
    {
        "concat": ConcatHead,
        "late": LateHead,
        "gated": GatedHead,
        "transformer": TransformerHead,
        "lowrank": LowRankHead,
    }
)
# Constructor arguments build_head passes itself; anything else in **kw is kind-specific.
_BASE_ARGS = frozenset({"self", "dims", "num_classes", "hidden", "dropout"})


def build_head(
    kind: str,
    dims: dict[str, int],
    num_classes: int,
    hidden: int = 256,
    dropout: float = 0.1,
    **kw: object,
) -> FusionHead:
    """Build a fusion head of ``kind`` (one of :data:`HEAD_KINDS`).

    ``kw`` holds kind-specific options: ``missing`` (concat), ``layers``/``heads`` (transformer),
    ``rank`` (lowrank). Unknown kinds or options raise :class:`UserInputError`.
    """
    if kind not in _HEAD_CLASSES:
        raise UserInputError(f"unknown head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")
    cls = _HEAD_CLASSES[kind]
    _check_config(dims, num_classes, hidden, dropout)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in _BASE_ARGS]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise UserInputError(
            f"head kind {kind!r} does not take option(s) {unknown}; "
            f"it accepts: {', '.join(allowed) or 'none'}"
        )
    return cls(dims, num_classes, hidden=hidden, dropout=dropout, **kw)


def modality_dropout(
    present: dict[str, Tensor], p: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Randomly hide present modalities, for training heads that must cope with missing inputs.

    Each present modality of each row is dropped with probability ``p``; if that would leave a row
    that had a modality with none, one of its originally present modalities (chosen uniformly) is
    kept. Rows with nothing present stay empty. With ``k`` modalities present the expected drop
    rate is therefore ``p - p**k / k`` (about ``p`` when ``k`` is large or ``p`` small).
    """
    if not 0.0 <= p <= 1.0:
        raise UserInputError(f"modality dropout probability must be in [0, 1], got {p!r}")
    if not present or p == 0.0:
        return dict(present)
    names = list(present)
    mask = torch.stack([present[n].to(torch.bool) for n in names], dim=1)  # (B, M)
    rand_device = generator.device if generator is not None else mask.device
    drop = torch.rand(mask.shape, generator=generator, device=rand_device).to(mask.device) < p
    keep = mask & ~drop
    emptied = mask.any(dim=1) & ~keep.any(dim=1)
    # Rescue emptied rows: pick the originally present modality with the highest random score.
    scores = torch.rand(mask.shape, generator=generator, device=rand_device).to(mask.device)
    choice = torch.where(mask, scores, torch.full_like(scores, -1.0)).argmax(dim=1)
    rescue = nn.functional.one_hot(choice, len(names)).to(torch.bool) & emptied[:, None]
    keep = keep | rescue
    return {n: keep[:, i] for i, n in enumerate(names)}


__all__ = [
    "HEAD_KINDS",
    "ConcatHead",
    "FusionHead",
    "GatedHead",
    "LateHead",
    "LowRankHead",
    "TransformerHead",
    "build_head",
    "modality_dropout",
]
