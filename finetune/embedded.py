"""Row-aligned embeddings of labeled data (:class:`EmbeddedSet`), the few-label split.

Every item is embedded once with :func:`modalign.retrieval.embed.embed_source` (the one embedding
loop); the set holds per-modality vectors, presence masks and class indices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F

from modalign.core.errors import UserInputError
from modalign.finetune.pseudo.labels import NO_LABEL
from modalign.pretrain.bundle import BundleModel
from modalign.retrieval.embed import Embeddings, embed_source

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSet:
    """Row-aligned embeddings of the classifier inputs, presence masks and class indices.

    ``views`` / ``view_present`` hold other modalities of the same items (``finetune.views``):
    pseudo-labelers may read them (co-training, the ``cross_view`` labeler), heads never do.
    """

    ids: list[str]
    x: dict[str, torch.Tensor]  # (N, D) per modality, zeros where absent
    present: dict[str, torch.Tensor]  # (N,) bool
    y: torch.Tensor  # (N,) long, NO_LABEL when unknown
    views: dict[str, torch.Tensor] = field(default_factory=dict)  # (N, D), zeros where absent
    view_present: dict[str, torch.Tensor] = field(default_factory=dict)  # (N,) bool

    def subset(self, idx: torch.Tensor) -> EmbeddedSet:
        return EmbeddedSet(
            [self.ids[i] for i in idx.tolist()],
            {m: v[idx] for m, v in self.x.items()},
            {m: v[idx] for m, v in self.present.items()},
            self.y[idx],
            {m: v[idx] for m, v in self.views.items()},
            {m: v[idx] for m, v in self.view_present.items()},
        )

    def __len__(self) -> int:
        return len(self.ids)


def embed_labeled(
    model: BundleModel,
    src: str,
    inputs: Sequence[str],
    class_names: Sequence[str] | None,
    batch_size: int = 128,
    views: Sequence[str] = (),
) -> tuple[EmbeddedSet, list[str]]:
    """Embed ``inputs`` (and ``views``) modalities of a manifest; map labels to class indices.

    Rows are the items with at least one input modality; ``views`` (``finetune.views``) are
    embedded in the same pass into :attr:`EmbeddedSet.views`. ``class_names`` None -> the
    sorted distinct labels of this manifest. A label outside the class list is an error naming
    the item.
    """
    for key, names in (("finetune.inputs", inputs), ("finetune.views", views)):
        missing = [m for m in names if m not in model.modalities]
        if missing:
            raise UserInputError(
                f"{key} {missing}: the model has no such tower; it has {model.modalities}"
            )
    emb, bad = embed_source(model, src, [*inputs, *views], batch_size=batch_size)
    if bad.total:
        log.warning("%s: %s", src, bad.summary())
    ids = list(dict.fromkeys(i for m in inputs if m in emb for i in emb[m].ids))
    pos = {i: n for n, i in enumerate(ids)}
    labels: dict[str, str | None] = {}
    for e in emb.values():
        labels.update(zip(e.ids, e.labels))
    if class_names is None:
        class_names = sorted({lab for lab in labels.values() if lab is not None})
    index = {c: n for n, c in enumerate(class_names)}
    unknown = sorted({lab for lab in labels.values() if lab is not None and lab not in index})
    if unknown:
        example = next(i for i, lab in labels.items() if lab == unknown[0])
        raise UserInputError(
            f"{src}: item {example!r} has label {unknown[0]!r}, not in the class list {list(class_names)}; fix the label or finetune.class_names"
        )
    n = len(ids)
    x, present = _rows(emb, inputs, pos, n, model.embed_dim)
    vx, vpresent = _rows(emb, views, pos, n, model.embed_dim)
    y = torch.tensor(
        [index[lab] if (lab := labels[i]) is not None else NO_LABEL for i in ids], dtype=torch.long
    )
    return EmbeddedSet(ids, x, present, y, vx, vpresent), list(class_names)


def _rows(
    emb: dict[str, Embeddings], modalities: Sequence[str], pos: dict[str, int], n: int, dim: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(N, dim)`` vectors and ``(N,)`` presence per modality, rows placed by ``pos`` (an item
    that is not a row, e.g. one with a caption but no classifier input, is dropped)."""
    x, present = {}, {}
    for m in modalities:
        x[m] = torch.zeros(n, dim)
        present[m] = torch.zeros(n, dtype=torch.bool)
        if m in emb:
            keep = [(r, pos[i]) for r, i in enumerate(emb[m].ids) if i in pos]
            src = torch.tensor([r for r, _ in keep], dtype=torch.long)
            rows = torch.tensor([p for _, p in keep], dtype=torch.long)
            x[m][rows] = torch.from_numpy(emb[m].vectors)[src]
            present[m][rows] = True
    return x, present


@dataclass
class Split:
    labeled: torch.Tensor
    val: torch.Tensor
    unlabeled: torch.Tensor


def few_label_split(
    y: torch.Tensor, class_names: Sequence[str], k: int, val_k: int, seed: int
) -> Split:
    """``k`` labeled (+ ``val_k`` validation) rows per class, seeded; the rest is unlabeled."""
    gen = torch.Generator().manual_seed(seed)
    labeled, val = [], []
    for c, name in enumerate(class_names):
        rows = (y == c).nonzero().flatten()
        if len(rows) == 0:
            raise UserInputError(
                f"class {name!r} has no labeled example in the training manifest; add some or drop it from finetune.class_names"
            )
        if len(rows) < k + val_k:
            raise UserInputError(
                f"class {name!r} has {len(rows)} labeled rows, fewer than labels_per_class + val_per_class = {k + val_k}; lower them"
            )
        rows = rows[torch.randperm(len(rows), generator=gen)]
        labeled.append(rows[:k])
        val.append(rows[k : k + val_k])
    lab, va = torch.cat(labeled), torch.cat(val)
    used = torch.zeros(len(y), dtype=torch.bool)
    used[lab] = True
    used[va] = True
    return Split(lab, va, (~used).nonzero().flatten())


def fused_embedding(s: EmbeddedSet) -> torch.Tensor:
    """Mean of the present modalities' (shared-space) embeddings, re-normalised."""
    total = sum(torch.where(s.present[m][:, None], s.x[m], 0.0) for m in s.x)
    return F.normalize(cast(torch.Tensor, total), dim=-1)  # s.x has >= 1 modality


def concat_sets(a: EmbeddedSet, b: EmbeddedSet) -> EmbeddedSet:
    """The rows of ``a`` then ``b`` (same inputs and views)."""
    return EmbeddedSet(
        a.ids + b.ids,
        {m: torch.cat([a.x[m], b.x[m]]) for m in a.x},
        {m: torch.cat([a.present[m], b.present[m]]) for m in a.present},
        torch.cat([a.y, b.y]),
        {m: torch.cat([a.views[m], b.views[m]]) for m in a.views},
        {m: torch.cat([a.view_present[m], b.view_present[m]]) for m in a.view_present},
    )


__all__ = [
    "EmbeddedSet",
    "Split",
    "concat_sets",
    "embed_labeled",
    "few_label_split",
    "fused_embedding",
]
