"""The pseudo-labeler registry (group ``modalign.pseudo_labelers``) and the built-in labelers.

A labeler is one registration: ``PSEUDO_LABELERS.add(name, Labeler(run, check), Options)``.
``check(cfg, options, model_modalities)`` runs before any work (raise UserInputError naming the fix);
``run(ctx, options)`` labels ``ctx.pool`` and returns a :class:`LabelerOutput` (or ``None``: no
pseudo-labels, train on the labels alone). A labeler that trains its own final head
(self-training) returns it in ``LabelerOutput.head``; otherwise the pipeline keeps rows above
``finetune.threshold``, balances classes and trains a head on labels + pseudo-labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from modalign.core.errors import UserInputError
from modalign.core.registry import NoOptions, Registry
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, fused_embedding
from modalign.finetune.head_base import FusionHead
from modalign.finetune.labels import PseudoLabels
from modalign.finetune.pseudo_label import class_prompt_embeddings, knn_propagate, zero_shot
from modalign.pretrain.bundle import BundleModel


@dataclass
class LabelContext:
    """What a labeler may use: the model, the labeled rows, the unlabeled pool, the config.

    ``new_head()`` builds a fresh head of the configured kind (call it inside
    :func:`~modalign.finetune.fit.local_rng` for a seeded init); ``gen`` is a generator seeded
    with ``finetune.seed`` for the labeler's own draws (never use the global RNG).
    """

    model: BundleModel
    labeled: EmbeddedSet
    pool: EmbeddedSet
    class_names: list[str]
    cfg: FinetuneConfig
    new_head: Callable[[], FusionHead]
    gen: torch.Generator


@dataclass
class LabelerOutput:
    """A labeler's result: pseudo-labels of ``ctx.pool`` (and its own head, if it trained one)."""

    labels: PseudoLabels
    head: FusionHead | None = None  # the final head, when the labeler trained one itself
    selected: torch.Tensor | None = None  # rows it vouches for (report only), with ``head``


@dataclass(frozen=True)
class Labeler:
    """A registered pseudo-labeler: ``run(ctx, opts)`` and an up-front
    ``check(cfg, opts, model_modalities)``."""

    run: Callable[[LabelContext, Any], LabelerOutput | None]
    check: Callable[[FinetuneConfig, Any, Sequence[str]], None] | None = None


PSEUDO_LABELERS: Registry[Labeler] = Registry("pseudo-labeler", "modalign.pseudo_labelers")


def _no_labels(ctx: LabelContext, opts: object) -> None:
    return None


PSEUDO_LABELERS.add("none", Labeler(_no_labels), NoOptions)


# -- zero-shot ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotOptions:
    temperature: float = 0.02
    text_modality: str = "text"  # the modality whose tower reads the class prompts

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")


def _zero_shot_check(cfg: FinetuneConfig, opts: ZeroShotOptions, modalities: Sequence[str]) -> None:
    if not cfg.class_names:
        raise UserInputError(
            "pseudo_label=zero_shot needs finetune.class_names (words the text tower can read)"
        )
    text = opts.text_modality
    if text not in modalities:
        raise UserInputError(
            f"pseudo_label=zero_shot needs a text tower ({text!r}, "
            f"finetune.pseudo_label_options.text_modality); {cfg.model} has only "
            f"{list(modalities)}; use knn or self_training"
        )


def _zero_shot(ctx: LabelContext, opts: ZeroShotOptions) -> LabelerOutput:
    model, m = ctx.model, opts.text_modality
    text = class_prompt_embeddings(
        lambda t: model.encode(**{m: list(t)})[m], list(ctx.class_names), ctx.cfg.templates()
    )
    return LabelerOutput(zero_shot(ctx.pool.x, ctx.pool.present, text, opts.temperature))


PSEUDO_LABELERS.add(
    "zero_shot",
    Labeler(_zero_shot, _zero_shot_check),
    ZeroShotOptions,
)


# -- kNN label propagation ------------------------------------------------------------------
@dataclass(frozen=True)
class KnnOptions:
    k: int = 10
    iterations: int = 100
    alpha: float = 0.99


def _knn(ctx: LabelContext, opts: KnnOptions) -> LabelerOutput:
    labels = knn_propagate(
        fused_embedding(ctx.pool),
        fused_embedding(ctx.labeled),
        ctx.labeled.y,
        len(ctx.class_names),
        k=opts.k,
        alpha=opts.alpha,
        iterations=opts.iterations,
    )
    return LabelerOutput(labels)


PSEUDO_LABELERS.add("knn", Labeler(_knn), KnnOptions)


# -- self-training (FixMatch over cached views) ---------------------------------------------
@dataclass(frozen=True)
class SelfTrainingOptions:
    strong_views: int = 2  # augmented embeddings per unlabeled row
    strong_noise: float = 0.5  # perturbation level of strong views (ModalitySpec units)
    unlabeled_weight: float = 1.0


def _self_training(ctx: LabelContext, opts: SelfTrainingOptions) -> LabelerOutput:
    from modalign.finetune.selftrain import embed_strong_views, fixmatch_train

    cfg = ctx.cfg
    views = embed_strong_views(
        ctx.model,
        cfg.train,
        ctx.pool.ids,
        cfg.inputs,
        opts.strong_views,
        opts.strong_noise,
        cfg.seed,
    )
    head, labels = fixmatch_train(ctx, views, opts.unlabeled_weight)
    return LabelerOutput(labels, head=head, selected=labels.confidence >= cfg.tau)


PSEUDO_LABELERS.add(
    "self_training",
    Labeler(_self_training),
    SelfTrainingOptions,
)

__all__ = [
    "PSEUDO_LABELERS",
    "KnnOptions",
    "LabelContext",
    "Labeler",
    "LabelerOutput",
    "SelfTrainingOptions",
    "ZeroShotOptions",
]
