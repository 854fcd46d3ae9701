"""FixMatch-style self-training over cached embeddings of weak and strong views.

Towers are locked, so views are embedded once: the weak view is the clean (eval-transform)
embedding; strong views use the training transforms (random resized crops, random time shift)
plus waveform noise. Each step: cross-entropy on labeled rows + cross-entropy of the strong view
against the weak view's confident hard label (threshold: FixMatch fixed, FlexMatch per-class
curriculum or FreeMatch self-adaptive).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from modalign.data.dataset import PairedDataset, make_loader
from modalign.data.manifest import read_manifest
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.heads import FusionHead, build_head, modality_dropout
from modalign.finetune.pseudo_label import (
    ConfidenceThreshold,
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    PseudoLabels,
    self_training_loss,
)
from modalign.pretrain.bundle import BundleModel


def make_threshold(
    cfg: FinetuneConfig, num_classes: int, num_unlabeled: int
) -> ConfidenceThreshold:
    if cfg.threshold_policy == "flexmatch":
        return FlexMatchThreshold(num_classes, tau=cfg.tau, num_unlabeled=num_unlabeled)
    if cfg.threshold_policy == "freematch":
        return FreeMatchThreshold(num_classes)
    return FixedThreshold(cfg.tau)


@torch.no_grad()
def embed_strong_views(
    model: BundleModel,
    src: str,
    ids: Sequence[str],
    inputs: Sequence[str],
    views: int,
    noise: float,
    seed: int,
    batch_size: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """``views`` augmented embeddings per row of ``ids`` (row-aligned, zeros where absent)."""
    specs = {m: s for m, s in model.modality_specs().items() if m in inputs}
    manifest = read_manifest(src, list(specs), inline=[m for m, s in specs.items() if s.inline])
    by_id = {r.id: r for r in manifest.rows}
    rows = [by_id[i] for i in ids]
    out = []
    for v in range(views):
        dataset = PairedDataset(
            rows, specs, train=True, seed=seed + 1000 * (v + 1), source=str(manifest.path)
        )
        gen = torch.Generator().manual_seed(seed + v)
        emb = {m: torch.zeros(len(rows), model.embed_dim) for m in inputs}
        offset = 0
        for batch in make_loader(dataset, batch_size=batch_size):
            n = len(batch["id"])
            if "audio" in batch and noise > 0:
                wave = batch["audio"]
                rms = wave.pow(2).mean(-1, keepdim=True).sqrt()
                level = torch.rand(n, 1, generator=gen) * noise
                batch["audio"] = wave + level * rms * torch.randn(wave.shape, generator=gen)
            for m, e in model.encode_batch({m: batch[m] for m in inputs if m in batch}).items():
                emb[m][offset : offset + n][batch["present"][m]] = e[batch["present"][m]]
            offset += n
        out.append(emb)
    return out


def fixmatch_train(
    labeled_x: dict[str, torch.Tensor],
    labeled_present: dict[str, torch.Tensor],
    labeled_y: torch.Tensor,
    weak_x: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    strong_views: list[dict[str, torch.Tensor]],
    num_classes: int,
    cfg: FinetuneConfig,
) -> tuple[FusionHead, PseudoLabels]:
    """Train a head with the supervised + unlabeled consistency loss; returns head and final
    pseudo-labels of the pool (weak-view predictions with confidences)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = build_head(
        cfg.head, {m: v.shape[1] for m, v in labeled_x.items()}, num_classes, hidden=cfg.hidden
    )
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_pool = len(next(iter(weak_x.values())))
    threshold = make_threshold(cfg, num_classes, n_pool)
    steps = cfg.epochs * max(1, (n_pool + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n_lab = len(labeled_y)
    for _ in range(steps):
        head.train()
        li = torch.randint(0, n_lab, (min(cfg.batch_size, 4 * n_lab),), generator=gen)
        lp = modality_dropout(
            {m: p[li] for m, p in labeled_present.items()}, cfg.modality_dropout, gen
        )
        sup = F.cross_entropy(head({m: v[li] for m, v in labeled_x.items()}, lp), labeled_y[li])
        ui = torch.randint(0, n_pool, (cfg.batch_size,), generator=gen)
        up = {m: p[ui] for m, p in present.items()}
        with torch.no_grad():
            head.eval()
            probs = head({m: v[ui] for m, v in weak_x.items()}, up).softmax(1)
            head.train()
        view = strong_views[int(torch.randint(0, len(strong_views), (1,), generator=gen))]
        strong_present = modality_dropout(up, cfg.modality_dropout, gen)
        unsup, _ = self_training_loss(
            head({m: v[ui] for m, v in view.items()}, strong_present), probs, threshold
        )
        if isinstance(threshold, FlexMatchThreshold):
            threshold.update(probs, ui)
        else:
            threshold.update(probs)
        loss = sup + cfg.unlabeled_weight * unsup
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        probs = head(weak_x, present).softmax(1)
    conf, labels = probs.max(1)
    return head, PseudoLabels(labels, conf, f"self_training/{cfg.threshold_policy}", probs)
