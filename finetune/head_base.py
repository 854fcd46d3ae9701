"""Fusion-head base class and modality dropout (heads classify from any subset of modalities).

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

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from modalign.core.errors import UserInputError


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout -> Linear, the MLP block of the built-in heads."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


def check_head_args(dims: Mapping[str, int], num_classes: int) -> None:
    """Every head's common arguments: non-empty ``{modality: positive dim}``, ``num_classes >= 1``."""
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


__all__ = ["FusionHead", "check_head_args", "mlp", "modality_dropout"]
