"""Periodic validation during pretraining: retrieval Recall@K per modality pair.

Kept small and self-contained (``retrieval`` sits above ``pretrain`` in the import order):
the validation set is embedded once per call, scored with one matmul per pair. Positives are
same-label items when every row has a label (class level), else the row's own partner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modalign.data.modality import ModalitySpec
from modalign.data.sources import open_source
from modalign.pretrain.model import MultimodalEncoder


@torch.no_grad()
def validation_recall(
    encoder: MultimodalEncoder,
    src: str,
    specs: Mapping[str, ModalitySpec],
    device: torch.device,
    ks: Sequence[int] = (1, 5),
    max_items: int = 5000,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """``{"audio->image": {"recall@1": .., "recall@5": ..}, ...}`` on up to ``max_items`` rows."""
    was_training = encoder.training
    encoder.eval()
    try:
        emb, present, labels = _embed(encoder, src, specs, device, max_items, batch_size)
    finally:
        encoder.train(was_training)
    class_level = all(lab is not None for lab in labels)
    codes = {lab: i for i, lab in enumerate(sorted(set(map(str, labels))))}
    group = (
        torch.tensor([codes[str(lab)] for lab in labels])
        if class_level
        else torch.arange(len(labels))
    )
    out = {}
    for q in emb:
        for g in emb:
            if q == g:
                continue
            qi, gi = present[q].nonzero().flatten(), present[g].nonzero().flatten()
            if len(qi) == 0 or len(gi) == 0:
                continue
            sims = emb[q][qi] @ emb[g][gi].T
            top = sims.topk(min(max(ks), len(gi)), dim=1).indices
            hits = group[gi][top] == group[qi].unsqueeze(1)
            out[f"{q}->{g}"] = {f"recall@{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}
    return out


def _embed(encoder, src, specs, device, max_items, batch_size):
    from torch.utils.data import DataLoader

    from modalign.data.dataset import Collate

    # Main process only, all of the source: rank 0 of a world of 1.
    source = open_source(src, specs, train=False, shuffle=False, rank=0, world_size=1)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in specs}
    masks: dict[str, list[torch.Tensor]] = {m: [] for m in specs}
    labels: list = []
    for batch in DataLoader(source, batch_size=batch_size, collate_fn=Collate(specs)):
        if len(labels) >= max_items:
            break
        k = len(batch["id"])
        inputs = {
            m: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for m, v in batch.items()
            if m in specs
        }
        feats = encoder(inputs)
        for m in specs:
            chunks[m].append(
                feats[m].float().cpu() if m in feats else torch.zeros(k, encoder.embed_dim)
            )
            masks[m].append(batch["present"].get(m, torch.zeros(k, dtype=torch.bool)))
        labels.extend(batch["label"])
    emb = {m: torch.cat(c) for m, c in chunks.items() if c}
    present = {m: torch.cat(v) for m, v in masks.items() if v}
    return emb, present, labels
