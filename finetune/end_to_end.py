"""Fine-tuning with trainable towers: the "partly unlocked" path and the from-scratch baseline.

The cached-embedding path (``pipeline.py``) is the fast default. Here the towers run on every
step on augmented inputs (training transforms), so they can adapt: starting from a pretrained
encoder (library use) or from random weights (the labels-only baseline of the benchmark).
Classifier bundles from this path are not written yet: ``modalign finetune`` uses locked towers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from modalign.data.dataset import PairedDataset, make_loader
from modalign.data.manifest import ManifestRow
from modalign.data.modality import ModalitySpec
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.heads import FusionHead, build_head, modality_dropout
from modalign.finetune.pipeline import EmbeddedSet
from modalign.pretrain.model import MultimodalEncoder


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
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = build_head(
        cfg.head, {m: encoder.embed_dim for m in cfg.inputs}, len(class_index), hidden=cfg.hidden
    )
    params = [
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": lr * tower_lr_scale},
        {"params": list(head.parameters()), "lr": lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    dataset = PairedDataset(rows, {m: specs[m] for m in cfg.inputs}, train=True, seed=cfg.seed)
    from modalign.data.dataset import EpochBatchSampler

    batch = min(cfg.batch_size, len(rows))
    for epoch in range(epochs):
        encoder.train()
        head.train()
        sampler = EpochBatchSampler(len(rows), batch, seed=cfg.seed, epoch=epoch, drop_last=False)
        for b in make_loader(dataset, sampler):
            y = torch.tensor([class_index[lab] for lab in b["label"]])
            present = modality_dropout(dict(b["present"]), cfg.modality_dropout, gen)
            emb = encoder({m: b[m] for m in cfg.inputs if m in b})
            loss = F.cross_entropy(head(emb, present), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


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
    dataset = PairedDataset(rows, {m: specs[m] for m in inputs}, train=False)
    n = len(rows)
    x = {m: torch.zeros(n, encoder.embed_dim) for m in inputs}
    present = {m: torch.zeros(n, dtype=torch.bool) for m in inputs}
    ids, ys = [], []
    offset = 0
    for b in make_loader(dataset, batch_size=128):
        k = len(b["id"])
        for m, e in encoder({m: b[m] for m in inputs if m in b}).items():
            x[m][offset : offset + k] = e
            present[m][offset : offset + k] = b["present"][m]
        ids.extend(b["id"])
        ys.extend(class_index.get(lab, -1) if lab is not None else -1 for lab in b["label"])
        offset += k
    return EmbeddedSet(
        ids,
        {m: v[:offset] for m, v in x.items()},
        {m: v[:offset] for m, v in present.items()},
        torch.tensor(ys),
    )
