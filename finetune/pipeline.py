"""Few-label fine-tuning: pseudo-labels + fusion head over cached tower embeddings.

Data flow: the model bundle embeds the training manifest once (:mod:`.embedded`), the few-label
split picks labeled/validation rows, the configured pseudo-labeler (:mod:`.labelers` registry)
labels the pool, :func:`train_head` (through the one loop :func:`.fit.fit_head`) trains the
configured fusion head (:mod:`.heads` registry), :mod:`.evaluate` scores it on ``finetune.test``
and :mod:`.classifier` writes the classifier bundle. Towers stay locked. No global RNG is
reseeded: every head is trained inside :func:`.fit.local_rng`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modalign.core.artifact import output_dir
from modalign.core.errors import ConfigError
from modalign.data.modality import MODALITIES
from modalign.data.preflight import SourceCheck, check_source
from modalign.finetune.classifier import (
    CLASSIFIER_KIND,
    Classifier,
    load_classifier,
    save_classifier,
)
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import (
    EmbeddedSet,
    concat_sets,
    embed_labeled,
    few_label_split,
    fused_embedding,
)
from modalign.finetune.evaluate import evaluate_head, predict, subsets
from modalign.finetune.fit import local_rng, preserved_rng, train_cached
from modalign.finetune.head_base import FusionHead
from modalign.finetune.heads import build_head_from_options
from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS, LabelContext, LabelerOutput
from modalign.finetune.pseudo.labels import NO_LABEL, PseudoLabels
from modalign.finetune.pseudo.selection import balance_classes, pseudo_label_report
from modalign.pretrain.bundle import BundleModel, load_bundle

log = logging.getLogger(__name__)


def new_head(cfg: FinetuneConfig, dims: dict[str, int], num_classes: int) -> FusionHead:
    """A fresh head of the configured kind and options (draws init from the default RNG)."""
    spec = cfg.head
    return build_head_from_options(spec.kind, dims, num_classes, spec.options)


def train_head(
    train: EmbeddedSet,
    weights: torch.Tensor,
    num_classes: int,
    cfg: FinetuneConfig,
    val: EmbeddedSet | None = None,
) -> FusionHead:
    """Train a fresh fusion head with modality dropout; early-stop on ``val`` when given."""
    score = None
    if val is not None and len(val):

        def score(head: FusionHead) -> float:
            return float((predict(head, val).argmax(1) == val.y).float().mean())

    with local_rng(cfg.seed) as gen:
        head = new_head(cfg, {m: v.shape[1] for m, v in train.x.items()}, num_classes)
        return train_cached(
            head,
            train,
            weights,
            gen,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            dropout=cfg.modality_dropout,
            score=score,
            min_steps=cfg.min_steps,
        )


@dataclass
class FinetuneResult:
    out_dir: Path
    class_names: list[str]
    fused: dict[str, Any]  # evaluation with pseudo-labels + labels
    labels_only: dict[str, Any]  # same head, labels alone
    pseudo: list[dict[str, Any]]  # per-round pseudo-label report


def check_finetune_inputs(cfg: FinetuneConfig) -> dict[str, SourceCheck]:
    """``finetune.model`` (a bundle folder), ``finetune.train`` and ``finetune.test`` (when
    set), checked and parsed before any work; errors name the key and the path (exit 2)."""
    model = Path(cfg.model) if cfg.model else None
    if model is None:
        raise ConfigError(
            "finetune.model is empty; set it to a model bundle (--set finetune.model=DIR)"
        )
    if not model.is_dir():
        raise ConfigError(
            f"finetune.model: {model}: no such bundle folder; pass a pretrain output.dir"
        )
    mods = MODALITIES.names()  # the bundle's modalities are read later; any known one will do
    checks = {"finetune.train": check_source(cfg.train, mods, "finetune.train")}
    if cfg.test:
        checks["finetune.test"] = check_source(cfg.test, mods, "finetune.test")
    return checks


def run_finetune(
    cfg: FinetuneConfig, out_dir: str | Path, key: str = "finetune.out"
) -> FinetuneResult:
    """Few labels + pseudo-labels -> fusion head; evaluates on ``cfg.test``; writes a classifier
    bundle into ``out_dir``, claimed (:func:`~modalign.core.artifact.output_dir`: exit 2 naming
    ``key`` if it holds other files or another run writes it) from before the model is loaded
    until the bundle is written.

    Deterministic for a given ``finetune.seed``; the process RNG states are left as found.
    """
    check_finetune_inputs(cfg)
    with output_dir(out_dir, CLASSIFIER_KIND, key) as out, preserved_rng():
        return _run(cfg, out)


def check_labeler(cfg: FinetuneConfig, modalities: Sequence[str]) -> None:
    """The configured pseudo-labeler's own up-front check of ``cfg`` (with its options) and a
    model with ``modalities``: a UserInputError naming why, before anything is embedded."""
    labeler = PSEUDO_LABELERS.get(cfg.pseudo_label, "finetune.pseudo_label")
    if labeler.factory.check is not None:
        opts = PSEUDO_LABELERS.options(
            cfg.pseudo_label, cfg.pseudo_label_options, "finetune.pseudo_label_options"
        )
        labeler.factory.check(cfg, opts, list(modalities))


def _run(cfg: FinetuneConfig, out: Path) -> FinetuneResult:
    model = load_bundle(cfg.model)
    check_labeler(cfg, model.modalities)
    data, class_names = embed_labeled(
        model, cfg.train, cfg.inputs, cfg.class_names or None, views=cfg.views
    )
    num_classes = len(class_names)
    split = few_label_split(
        data.y, class_names, cfg.labels_per_class, cfg.val_per_class, cfg.label_seed
    )
    test = embed_labeled(model, cfg.test, cfg.inputs, class_names)[0] if cfg.test else None
    # out is claimed by run_finetune (output_dir) from before the model was loaded.
    labeled, pool = data.subset(split.labeled), data.subset(split.unlabeled)
    val = data.subset(split.val)
    val_set = val if len(val) else None
    labels_only_head = train_head(labeled, torch.ones(len(labeled)), num_classes, cfg, val_set)
    reports: list[dict[str, Any]] = []
    head = labels_only_head
    if len(pool):
        ctx = _context(model, labeled, pool, class_names, cfg)
        head, reports = _pseudo_label_rounds(ctx, val_set, labels_only_head)
    test = val if test is None else test
    fused = evaluate_head(head, test, num_classes) if len(test) else {}
    labels_only = evaluate_head(labels_only_head, test, num_classes) if len(test) else {}
    results = {"test": fused, "labels_only": labels_only, "pseudo": reports}
    save_classifier(out, head, cfg, class_names, model, results)
    return FinetuneResult(out, class_names, fused, labels_only, reports)


def pseudo_label_head(
    model: BundleModel,
    labeled: EmbeddedSet,
    pool: EmbeddedSet,
    class_names: list[str],
    cfg: FinetuneConfig,
    val: EmbeddedSet | None = None,
) -> tuple[FusionHead, list[dict[str, Any]]]:
    """The configured pseudo-labeler's rounds on ``pool`` -> head and per-round reports."""
    labels_only = train_head(labeled, torch.ones(len(labeled)), len(class_names), cfg, val)
    if not len(pool):
        return labels_only, []
    return _pseudo_label_rounds(_context(model, labeled, pool, class_names, cfg), val, labels_only)


def _context(
    model: BundleModel,
    labeled: EmbeddedSet,
    pool: EmbeddedSet,
    class_names: list[str],
    cfg: FinetuneConfig,
) -> LabelContext:
    dims = {m: v.shape[1] for m, v in labeled.x.items()}
    return LabelContext(
        model,
        labeled,
        pool,
        class_names,
        cfg,
        lambda: new_head(cfg, dims, len(class_names)),
        torch.Generator().manual_seed(cfg.seed),
    )


def _run_labeler(ctx: LabelContext) -> LabelerOutput | None:
    cfg = ctx.cfg
    opts = PSEUDO_LABELERS.options(
        cfg.pseudo_label, cfg.pseudo_label_options, "finetune.pseudo_label_options"
    )
    return PSEUDO_LABELERS.get(cfg.pseudo_label).factory.run(ctx, opts)


def _pseudo_label_rounds(
    ctx: LabelContext, val: EmbeddedSet | None, labels_only: FusionHead
) -> tuple[FusionHead, list[dict[str, Any]]]:
    """Round 1: the configured labeler; later rounds: self-training from the last head.

    A labeler that trains its own head (``LabelerOutput.head``) ends the rounds there.
    """
    cfg = ctx.cfg
    reports: list[dict[str, Any]] = []
    head = labels_only
    for round_no in range(max(1, cfg.rounds)):
        if round_no == 0:
            first = _run_labeler(ctx)
            if first is None:
                return labels_only, []
            head, report = head_from_output(ctx, first, val, labels_only)
            if first.head is not None:
                return head, [{**report, "round": 1}]
            pl = first.labels
        else:  # later rounds: classic self-training from the previous head
            probs = predict(head, ctx.pool).softmax(1)
            pl = PseudoLabels(probs.argmax(1), probs.max(1).values, "self_training", probs)
            head, report = _train_on_pseudo(ctx, pl, val)
        reports.append({**report, "round": round_no + 1})
        log.info(
            "pseudo-labels round %d (%s): coverage %.3f accuracy %s",
            round_no + 1,
            pl.method,
            report["coverage"],
            report["accuracy"],
        )
    return head, reports


def head_from_output(
    ctx: LabelContext,
    out: LabelerOutput,
    val: EmbeddedSet | None,
    labels_only: FusionHead | None = None,
    *,
    labels: bool = True,
) -> tuple[FusionHead, dict[str, Any]]:
    """The head a labeler's output leads to, and its pseudo-label report.

    A labeler that trained its own head gives it back; one that chose ``weights`` trains on
    labels + its weighted pseudo-labels (none chosen: ``labels_only``, or a labels-only head);
    otherwise ``finetune.threshold`` and ``balance`` select (:func:`_train_on_pseudo`).
    ``labels=False`` trains on the pseudo-labels alone (the auto labeler's reverse check).
    """
    num_classes = len(ctx.class_names)
    info = out.info or {}
    if out.head is not None:
        selected = out.selected if out.selected is not None else out.labels.labels != NO_LABEL
        report = pseudo_label_report(out.labels, selected, ctx.pool.y, num_classes)
        return out.head, {**report, **info}
    if out.weights is None:
        head, report = _train_on_pseudo(ctx, out.labels, val, labels=labels)
        return head, {**report, **info}
    weights = out.weights.float()
    keep = (weights > 0) & (out.labels.labels != NO_LABEL)
    report = {**pseudo_label_report(out.labels, keep, ctx.pool.y, num_classes), **info}
    if keep.any():
        report["mean_weight"] = float(weights[keep].mean())
    if not keep.any() and labels:
        if labels_only is None:
            labels_only = train_head(
                ctx.labeled, torch.ones(len(ctx.labeled)), num_classes, ctx.cfg, val
            )
        return labels_only, report
    return _train_weighted(ctx, out.labels, keep, weights, val, labels), report


def _train_weighted(
    ctx: LabelContext,
    pl: PseudoLabels,
    keep: torch.Tensor,
    weights: torch.Tensor,
    val: EmbeddedSet | None,
    labels: bool = True,
) -> FusionHead:
    idx = keep.nonzero().flatten()
    chosen = ctx.pool.subset(idx)
    chosen.y = pl.labels[idx]
    labeled = ctx.labeled
    if not labels:
        return train_head(chosen, weights[idx], len(ctx.class_names), ctx.cfg, val)
    train = concat_sets(labeled, chosen)
    w = torch.cat([torch.ones(len(labeled)), weights[idx]])
    return train_head(train, w, len(ctx.class_names), ctx.cfg, val)


def _train_on_pseudo(
    ctx: LabelContext, pl: PseudoLabels, val: EmbeddedSet | None, labels: bool = True
) -> tuple[FusionHead, dict[str, Any]]:
    """Keep confident pseudo-labels, class-balanced over the training set they join (labels +
    pseudo-labels, :func:`balance_classes` with ``labeled_counts``); train a head on them."""
    cfg, pool, labeled = ctx.cfg, ctx.pool, ctx.labeled
    num_classes = len(ctx.class_names)
    keep = (pl.confidence >= cfg.threshold) & (pl.labels != NO_LABEL)
    if cfg.balance:
        counts = torch.bincount(labeled.y[labeled.y >= 0], minlength=num_classes)
        keep = balance_classes(
            pl, num_classes, ratio=cfg.balance_ratio, eligible=keep, labeled_counts=counts
        )
    report = pseudo_label_report(pl, keep, pool.y, num_classes)
    weights = torch.full((len(pool),), cfg.pseudo_weight)
    return _train_weighted(ctx, pl, keep, weights, val, labels), report


__all__ = [
    "Classifier",
    "EmbeddedSet",
    "FinetuneResult",
    "check_labeler",
    "embed_labeled",
    "evaluate_head",
    "few_label_split",
    "fused_embedding",
    "head_from_output",
    "load_classifier",
    "new_head",
    "predict",
    "pseudo_label_head",
    "run_finetune",
    "subsets",
    "train_head",
]
