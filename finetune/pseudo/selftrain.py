"""FixMatch-style self-training over cached embeddings of weak and strong views.

Towers are locked, so views are embedded once: the weak view is the clean (eval-transform)
embedding; strong views use the training transforms of each modality plus its own perturbation
(:meth:`ModalitySpec.perturb`, at a random level up to ``strong_noise``). Each step:
cross-entropy on labeled rows + cross-entropy of the strong view against the weak view's
confident hard label (threshold policy from :data:`~modalign.finetune.pseudo.thresholds.THRESHOLDS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from modalign.data.batch import Batch
from modalign.data.modality import ModalitySpec
from modalign.data.sources import open_source
from modalign.finetune.fit import cosine_adamw, fit_head, local_rng
from modalign.finetune.head_base import FusionHead, modality_dropout
from modalign.finetune.pseudo.labels import PseudoLabels
from modalign.finetune.pseudo.thresholds import make_threshold, self_training_loss
from modalign.pretrain.bundle import BundleModel
from modalign.retrieval.embed import embed_batches, value_reader


def _perturbed(
    batches: Iterator[Batch], specs: Mapping[str, ModalitySpec], noise: float, gen: torch.Generator
) -> Iterator[Batch]:
    for batch in batches:
        level = float(torch.rand((), generator=gen)) * noise
        inputs = {m: specs[m].perturb(v, level, gen) for m, v in batch.inputs.items()}
        yield dataclasses.replace(batch, inputs=inputs)


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
    pos = {i: n for n, i in enumerate(ids)}
    out = []
    for v in range(views):
        source = open_source(
            src, specs, train=True, seed=seed + 1000 * (v + 1), shuffle=False, rank=0, world_size=1
        )
        gen = torch.Generator().manual_seed(seed + v)
        batches = _perturbed(iter(source.batches(batch_size)), specs, noise, gen)
        emb = {m: torch.zeros(len(ids), model.embed_dim) for m in inputs}
        for part in embed_batches(model, batches, list(specs), value_reader(source, src)):
            for m, e in part.items():
                keep = [(n, pos[i]) for n, i in enumerate(e.ids) if i in pos]
                if keep:
                    src_rows, dst_rows = (torch.tensor(c) for c in zip(*keep))
                    emb[m][dst_rows] = torch.from_numpy(e.vectors)[src_rows]
        out.append(emb)
    return out


def fixmatch_train(
    ctx: Any, strong_views: list[dict[str, torch.Tensor]], unlabeled_weight: float
) -> tuple[FusionHead, PseudoLabels]:
    """Train a head with the supervised + unlabeled consistency loss; returns the head and the
    final pseudo-labels of the pool (weak-view predictions with confidences).

    ``ctx`` is a :class:`~modalign.finetune.pseudo.labelers.LabelContext`.
    """
    cfg, lab, pool = ctx.cfg, ctx.labeled, ctx.pool
    num_classes, n_lab, n_pool = len(ctx.class_names), len(lab), len(pool)
    threshold = make_threshold(
        cfg.threshold_policy, num_classes, n_pool, cfg.tau, cfg.threshold_options
    )
    steps_per_epoch = max(1, (n_pool + cfg.batch_size - 1) // cfg.batch_size)
    with local_rng(cfg.seed) as gen:
        head = ctx.new_head()
        opt, sched = cosine_adamw(
            head.parameters(), cfg.lr, cfg.weight_decay, cfg.epochs * steps_per_epoch
        )

        def step_loss(h: FusionHead, _: int) -> torch.Tensor:
            li = torch.randint(0, n_lab, (min(cfg.batch_size, 4 * n_lab),), generator=gen)
            lp = modality_dropout(
                {m: p[li] for m, p in lab.present.items()}, cfg.modality_dropout, gen
            )
            sup = F.cross_entropy(h({m: v[li] for m, v in lab.x.items()}, lp), lab.y[li])
            ui = torch.randint(0, n_pool, (cfg.batch_size,), generator=gen)
            up = {m: p[ui] for m, p in pool.present.items()}
            with torch.no_grad():
                h.eval()
                probs = h({m: v[ui] for m, v in pool.x.items()}, up).softmax(1)
                h.train()
            view = strong_views[int(torch.randint(0, len(strong_views), (1,), generator=gen))]
            strong_present = modality_dropout(up, cfg.modality_dropout, gen)
            logits = h({m: v[ui] for m, v in view.items()}, strong_present)
            unsup = self_training_loss(logits, probs, threshold)[0]
            threshold.update(probs, ui)
            return sup + unlabeled_weight * unsup

        fit_head(
            head, lambda e: range(steps_per_epoch), step_loss, opt, cfg.epochs, scheduler=sched
        )
    with torch.no_grad():
        probs = head(pool.x, pool.present).softmax(1)
    conf, labels = probs.max(1)
    return head, PseudoLabels(labels, conf, f"self_training/{cfg.threshold_policy}", probs)


__all__ = ["embed_strong_views", "fixmatch_train"]
