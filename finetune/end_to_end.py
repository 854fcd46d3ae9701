"""Fine-tuning with trainable towers: the "partly unlocked" path and the from-scratch baseline.

The cached-embedding path (``pipeline.py``) is the fast default. Here the towers run on every
step on augmented inputs (training transforms), so they can adapt: starting from a pretrained
encoder (library use) or from random weights (the labels-only baseline of the benchmark).
Training goes through the one loop :func:`~modalign.finetune.fit.fit_head`; embedding through
:func:`~modalign.retrieval.embed.embed_batches`. Classifier bundles from this path are not
written yet: ``modalign finetune`` uses locked towers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modalign.core.errors import UserInputError
from modalign.data.batch import Batch
from modalign.data.dataset import EpochBatchSampler, PairedDataset, make_loader
from modalign.data.manifest import ManifestRow
from modalign.data.modality import ModalitySpec
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.fit import fit_head, local_rng
from modalign.finetune.head_base import FusionHead, modality_dropout
from modalign.finetune.heads import build_head_from_options
from modalign.finetune.pseudo.labels import NO_LABEL
from modalign.pretrain.model import MultimodalEncoder
from modalign.retrieval.embed import embed_batches


def _labeled(label: str | None) -> str:
    if label is None:
        raise UserInputError("end-to-end fine-tuning got an unlabeled row; it takes labeled rows")
    return label


def train_end_to_end(
    encoder: MultimodalEncoder,
    rows: Sequence[ManifestRow],
    specs: Mapping[str, ModalitySpec],
    class_index: Mapping[str, int],
    cfg: FinetuneConfig,
    epochs: int,
    lr: float = 1e-3,
    tower_lr_scale: float = 1.0,
) -> FusionHead:
    """Train encoder towers and a fresh head on labeled ``rows`` with modality dropout."""
    device = next(encoder.parameters()).device
    with local_rng(cfg.seed, device) as gen:
        spec = cfg.head
        dims = {m: encoder.embed_dim for m in cfg.inputs}
        head = build_head_from_options(spec.kind, dims, len(class_index), spec.options)
        params = [
            {
                "params": [p for p in encoder.parameters() if p.requires_grad],
                "lr": lr * tower_lr_scale,
            },
            {"params": list(head.parameters()), "lr": lr},
        ]
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
        dataset = PairedDataset(rows, {m: specs[m] for m in cfg.inputs}, train=True, seed=cfg.seed)
        batch = min(cfg.batch_size, len(rows))

        def batches(epoch: int) -> Iterable[Batch]:
            sampler = EpochBatchSampler(
                len(rows), batch, seed=cfg.seed, epoch=epoch, drop_last=False
            )
            return make_loader(dataset, sampler)

        def loss_fn(h: FusionHead, b: Batch) -> torch.Tensor:
            y = torch.tensor([class_index[_labeled(lab)] for lab in b.labels])
            present = modality_dropout(dict(b.present), cfg.modality_dropout, gen)
            emb = encoder({m: b.inputs[m] for m in cfg.inputs if m in b.inputs})
            return F.cross_entropy(h(emb, present), y)

        return fit_head(head, batches, loss_fn, opt, epochs, modules=[encoder])


@dataclass
class _LiveEncoder:
    """An :class:`~modalign.retrieval.embed.EncoderModel` view of an encoder being trained."""

    encoder: MultimodalEncoder
    specs: dict[str, ModalitySpec]

    @property
    def modalities(self) -> list[str]:
        return list(self.specs)

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def modality_specs(self) -> dict[str, ModalitySpec]:
        return dict(self.specs)

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {m: e.detach().cpu() for m, e in self.encoder(batch).items()}


@torch.no_grad()
def embed_with(
    encoder: MultimodalEncoder,
    rows: Sequence[ManifestRow],
    specs: Mapping[str, ModalitySpec],
    class_index: Mapping[str, int],
    inputs: Sequence[str],
) -> EmbeddedSet:
    """Eval-mode embeddings of ``rows`` from any encoder, as an :class:`EmbeddedSet`."""
    encoder.eval()
    wanted = {m: specs[m] for m in inputs}
    dataset = PairedDataset(rows, wanted, train=False)
    n = len(rows)
    x = {m: torch.zeros(n, encoder.embed_dim) for m in inputs}
    present = {m: torch.zeros(n, dtype=torch.bool) for m in inputs}
    y = torch.full((n,), NO_LABEL, dtype=torch.long)
    ids = [r.id for r in rows]
    loader = make_loader(dataset, batch_size=128, keep_empty=True)
    for part in embed_batches(_LiveEncoder(encoder, wanted), loader, list(inputs), _no_value):
        for m, e in part.items():
            pos = torch.tensor(e.positions, dtype=torch.long)
            x[m][pos] = torch.from_numpy(e.vectors)
            present[m][pos] = True
            for p, lab in zip(e.positions, e.labels):
                y[p] = class_index.get(lab, NO_LABEL) if lab is not None else NO_LABEL
    return EmbeddedSet(ids, x, present, y)


def _no_value(modality: str, position: int, item_id: str, decoded: Any) -> str:
    return item_id


__all__ = ["embed_with", "train_end_to_end"]
