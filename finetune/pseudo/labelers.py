"""The pseudo-labeler registry (group ``modalign.pseudo_labelers``) and the built-in labelers.

A labeler is one registration: ``PSEUDO_LABELERS.add(name, Labeler(run, check), Options)``.
``check(cfg, options, model_modalities)`` runs before any work (raise UserInputError naming the fix);
``run(ctx, options)`` labels ``ctx.pool`` and returns a :class:`LabelerOutput` (or ``None``: no
pseudo-labels, train on the labels alone). A labeler that trains its own final head
(self-training) returns it in ``LabelerOutput.head``; otherwise the pipeline keeps rows above
``finetune.threshold``, balances classes and trains a head on labels + pseudo-labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast

import torch

from modalign.core.config_io import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Range
from modalign.core.errors import UserInputError
from modalign.core.registry import NoOptions
from modalign.finetune.config import PSEUDO_LABELERS, FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, fused_embedding
from modalign.finetune.head_base import FusionHead
from modalign.finetune.pseudo.algorithms import (
    class_prompt_embeddings,
    knn_propagate,
    label_propagation,
    prompts_for,
    zero_shot,
)
from modalign.finetune.pseudo.fewshot import mix_zero_and_few_shot
from modalign.finetune.pseudo.labels import NO_LABEL, PseudoLabels, from_probs
from modalign.finetune.pseudo.selection import balance_classes, soft_weights
from modalign.finetune.pseudo.selftrain import embed_strong_views, fixmatch_train
from modalign.finetune.pseudo.transport import MARGINALS, balanced_kmeans
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
    """A labeler's result: pseudo-labels of ``ctx.pool`` (and its own head, if it trained one).

    ``weights`` (``(N_pool,)`` float, 0 = not used) is the labeler's own selection and weighting
    of its pseudo-labels; when given, the pipeline trains on it instead of applying
    ``finetune.threshold`` / ``balance``. ``info`` (JSON-ready) joins the pseudo-label report.
    """

    labels: PseudoLabels
    head: FusionHead | None = None  # the final head, when the labeler trained one itself
    selected: torch.Tensor | None = None  # rows it vouches for (report only), with ``head``
    weights: torch.Tensor | None = None  # per-row training weights chosen by the labeler
    info: dict[str, Any] | None = None  # e.g. the auto labeler's decision


@dataclass(frozen=True)
class Labeler:
    """A registered pseudo-labeler: ``run(ctx, opts)`` and an up-front
    ``check(cfg, opts, model_modalities)``. ``other_view``: it labels the pool from modalities
    the classifier does not read (``finetune.views``), so its labels are not anchored on the
    labeled rows' inputs (``auto`` with one label per class uses it, see ``AutoOptions``)."""

    run: Callable[[LabelContext, Any], LabelerOutput | None]
    check: Callable[[FinetuneConfig, Any, Sequence[str]], None] | None = None
    other_view: bool = False


def _no_labels(ctx: LabelContext, opts: object) -> None:
    return None


PSEUDO_LABELERS.add("none", Labeler(_no_labels), NoOptions)


# -- zero-shot ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotOptions:
    temperature: Annotated[float, POSITIVE] = 0.02
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


def _text_encoder(model: BundleModel, modality: str) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> (n, D)`` embeddings through the bundle's ``modality`` tower (for prompts)."""

    def encode(texts: list[str]) -> torch.Tensor:
        values: dict[str, Any] = {modality: list(texts)}
        return torch.as_tensor(model.encode(**values)[modality])  # a tensor already: no copy

    return encode


def _zero_shot(ctx: LabelContext, opts: ZeroShotOptions) -> LabelerOutput:
    model, m = ctx.model, opts.text_modality
    text = class_prompt_embeddings(
        _text_encoder(model, m), list(ctx.class_names), ctx.cfg.templates()
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
    k: Annotated[int, AT_LEAST_1] = 10
    iterations: Annotated[int, AT_LEAST_1] = 100
    alpha: Annotated[float, Range(gt=0, lt=1)] = 0.99


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


# -- selection shared by the newer labelers ---------------------------------------------------
@dataclass(frozen=True)
class SelectOptions:
    """How a labeler's pseudo-labels join the labels (judged over the whole training set).

    ``fraction``: at most this share of the pool is used; ``ratio``: a class ends with at most
    ``ratio`` x the smallest class's total (labels + pseudo-labels, :func:`balance_classes` with
    ``labeled_counts``); ``weighting``: ``soft`` (SoftMatch weights) or ``hard`` (weight 1);
    ``min_confidence``: rows below it are dropped; ``weight``: a pseudo-label's weight relative to
    a label.
    """

    fraction: Annotated[float, Range(gt=0, le=1)] = 1.0
    # 2.0, chosen on unlabeled-pool accuracy (CIFAR-10, label seeds 100-102, never the test
    # items): 1.0 / 1.5 / 2.0 / 3.0 gave 0.460 / 0.462 / 0.467 / 0.466 at 4 labels per class
    ratio: Annotated[float, Range(ge=1)] = 2.0
    weighting: str = "soft"
    min_confidence: Annotated[float, FRACTION] = 0.0
    weight: Annotated[float, POSITIVE] = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.ratio < 1.0:
            raise ValueError(f"ratio must be >= 1, got {self.ratio!r}")
        if self.weighting not in ("soft", "hard"):
            raise ValueError(f"weighting must be 'soft' or 'hard', got {self.weighting!r}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight!r}")


def select_weights(
    pl: PseudoLabels, labeled_y: torch.Tensor, num_classes: int, opts: SelectOptions
) -> torch.Tensor:
    """Per-row training weights of pseudo-labels ``pl`` (0 = dropped) under ``opts``: confident
    enough, class-balanced over labels + pseudo-labels, at most ``fraction`` of the pool."""
    n = pl.labels.shape[0]
    eligible = (pl.labels != NO_LABEL) & (pl.confidence >= opts.min_confidence)
    counts = torch.bincount(labeled_y[labeled_y >= 0], minlength=num_classes)
    quota = max(1, math.floor(opts.fraction * n / num_classes))
    keep = balance_classes(
        pl, num_classes, max_per_class=quota, ratio=opts.ratio, eligible=eligible,
        labeled_counts=counts,
    )  # fmt: skip
    if opts.weighting == "soft":
        weights = soft_weights(pl.confidence, keep)
    else:
        weights = keep.float()
    return weights * opts.weight


# -- label propagation (Zhou et al. 2004) -----------------------------------------------------
@dataclass(frozen=True)
class PropagationOptions(SelectOptions):
    k: Annotated[int, AT_LEAST_1] = 10
    alpha: Annotated[float, Range(gt=0, lt=1)] = 0.99
    iterations: Annotated[int, AT_LEAST_1] = 50  # conjugate-gradient steps
    class_mass: bool = True
    center: bool = True  # subtract the mean embedding before the kNN graph (CL2N)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations!r}")


def _propagation(ctx: LabelContext, opts: PropagationOptions) -> LabelerOutput:
    num_classes = len(ctx.class_names)
    labels = label_propagation(
        fused_embedding(ctx.pool),
        fused_embedding(ctx.labeled),
        ctx.labeled.y,
        num_classes,
        k=opts.k,
        alpha=opts.alpha,
        iterations=opts.iterations,
        class_mass=opts.class_mass,
        center=opts.center,
    )
    return LabelerOutput(labels, weights=select_weights(labels, ctx.labeled.y, num_classes, opts))


PSEUDO_LABELERS.add("propagation", Labeler(_propagation), PropagationOptions)


# -- class-balanced soft k-means (PT-MAP, Hu et al. 2021) ------------------------------------
@dataclass(frozen=True)
class BalancedKMeansOptions(SelectOptions):
    """``balanced_kmeans``: prototypes from the labels, refined on the pool by soft k-means whose
    assignments are a Sinkhorn transport plan with a fixed class marginal
    (:func:`~modalign.finetune.pseudo.transport.balanced_kmeans`); the selection options of
    :class:`SelectOptions` then choose and weight its pseudo-labels.

    ``power``: signed power transform (1 = off); ``dims``: PCA components fitted on the rows
    being labelled (0 = all), ``whiten`` them; ``sharpness``: inverse temperature on squared
    distances; ``step``: how far prototypes move per round; ``iterations``: rounds;
    ``marginal``: ``uniform`` (every class gets ``N / C`` of the pool) or ``labels`` (the labeled
    rows' class shares) or ``none`` (no transport: plain soft k-means, an ablation);
    ``sinkhorn_iterations``: normalisation steps per assignment.
    """

    # Defaults chosen on unlabeled-pool accuracy (CIFAR-10 identity 1280-d substrate, label
    # seeds 100-102, 4 labels per class; never the test items): PCA-whitened 64 components
    # 0.505, all 1280 unwhitened 0.479, label propagation 0.470. Its confidence ranks well
    # (precision of each class's top 30% 0.73, propagation's 0.58), so by default only each
    # class's most confident 30% of the pool joins the labels (head accuracy on the pool 0.517
    # vs 0.512 at 50% and 0.504 with all; labels only 0.438).
    fraction: Annotated[float, Range(gt=0, le=1)] = 0.3
    power: Annotated[float, Range(gt=0, le=1)] = 0.5
    dims: Annotated[int, Range(ge=0, note="0 = all")] = 64
    whiten: bool = True
    sharpness: Annotated[float, POSITIVE] = 100.0
    step: Annotated[float, Range(gt=0, le=1)] = 0.2
    iterations: Annotated[int, Range(ge=0)] = 30
    marginal: str = "uniform"
    sinkhorn_iterations: Annotated[int, AT_LEAST_1] = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.power <= 1.0:
            raise ValueError(f"power must be in (0, 1], got {self.power!r}")
        if self.dims < 0:
            raise ValueError(f"dims must be >= 0 (0 = all components), got {self.dims!r}")
        if self.sharpness <= 0:
            raise ValueError(f"sharpness must be > 0, got {self.sharpness!r}")
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {self.step!r}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations!r}")
        if self.marginal not in MARGINALS:
            raise ValueError(f"marginal must be one of {MARGINALS}, got {self.marginal!r}")
        if self.sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {self.sinkhorn_iterations!r}")


def _balanced_kmeans(ctx: LabelContext, opts: BalancedKMeansOptions) -> LabelerOutput:
    num_classes = len(ctx.class_names)
    labels = balanced_kmeans(
        fused_embedding(ctx.pool),
        fused_embedding(ctx.labeled),
        ctx.labeled.y,
        num_classes,
        power=opts.power,
        dims=opts.dims,
        whiten=opts.whiten,
        sharpness=opts.sharpness,
        step=opts.step,
        iterations=opts.iterations,
        marginal=opts.marginal,
        sinkhorn_iterations=opts.sinkhorn_iterations,
    )
    weights = select_weights(labels, ctx.labeled.y, num_classes, opts)
    return LabelerOutput(labels, weights=weights)


PSEUDO_LABELERS.add("balanced_kmeans", Labeler(_balanced_kmeans), BalancedKMeansOptions)


# -- zero-shot + few-shot interpolation (Tip-Adapter / LP++ / WiSE-FT style) ------------------
@dataclass(frozen=True)
class ZeroShotMixOptions(SelectOptions):
    text_modality: str = "text"
    mix: Annotated[
        float, Range(le=1, note="< 0 = chosen by leave-one-out")
    ] = -1.0  # weight of the zero-shot classifier; < 0 = chosen by leave-one-out
    one_label_mix: Annotated[float, FRACTION] = (
        0.5  # the weight used when no labeled row can be held out
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mix > 1.0:
            raise ValueError(f"mix must be <= 1 (< 0 = chosen from the labels), got {self.mix!r}")
        if not 0.0 <= self.one_label_mix <= 1.0:
            raise ValueError(f"one_label_mix must be in [0, 1], got {self.one_label_mix!r}")


def _zero_shot_mix_check(
    cfg: FinetuneConfig, opts: ZeroShotMixOptions, modalities: Sequence[str]
) -> None:
    _zero_shot_check(cfg, ZeroShotOptions(text_modality=opts.text_modality), modalities)


def _zero_shot_mix(ctx: LabelContext, opts: ZeroShotMixOptions) -> LabelerOutput:
    model, m = ctx.model, opts.text_modality
    text = class_prompt_embeddings(
        _text_encoder(model, m), list(ctx.class_names), ctx.cfg.templates()
    )
    labels, info = mix_zero_and_few_shot(ctx.labeled, ctx.pool, text, opts.mix, opts.one_label_mix)
    weights = select_weights(labels, ctx.labeled.y, len(ctx.class_names), opts)
    return LabelerOutput(labels, weights=weights, info=info)


PSEUDO_LABELERS.add(
    "zero_shot_mix", Labeler(_zero_shot_mix, _zero_shot_mix_check), ZeroShotMixOptions
)


# -- co-training: the pool labelled by its other views (Blum & Mitchell 1998) -----------------
@dataclass(frozen=True)
class CrossViewOptions(SelectOptions):
    """``cross_view``: the pool is labelled from modalities the classifier does not read
    (``finetune.views``, e.g. the captions of training images) and the classifier learns those
    labels: co-training (Blum & Mitchell 1998) with the views as the teacher.

    Per view, two few-label classifiers of the view's embeddings: label propagation on its kNN
    graph (``k``, ``alpha``, ``iterations``, as ``propagation``) and, for the ``text_modality``
    view when ``finetune.class_names`` are set and ``zero_shot`` is on, the zero-shot + few-shot
    mix (class-name prompts read by the same tower, as ``zero_shot_mix``). ``inputs`` adds the
    classifier inputs' own propagation. The class probabilities of all of them are multiplied
    (a product of experts) and renormalised; a pool row with no view gets no label. The
    :class:`SelectOptions` then choose and weight the pseudo-labels.
    """

    # Defaults chosen on the unlabeled pool's hidden labels (icons, 34 categories, label seeds
    # 100-102, 4 labels per class; never the test items): head accuracy on the pool, labels
    # only 0.264; at ratio 5, text propagation alone 0.433, text zero-shot mix alone 0.448, their
    # product 0.460 (with the inputs' propagation too 0.447); ratio 2 / 5 / 100: 0.423 / 0.460 /
    # 0.460
    # (34 classes of 16-668 items: ratio 2 drops most of the big classes' pseudo-labels).
    ratio: Annotated[float, Range(ge=1)] = 5.0
    k: Annotated[int, AT_LEAST_1] = 10
    alpha: Annotated[float, Range(gt=0, lt=1)] = 0.99
    iterations: Annotated[int, AT_LEAST_1] = 50
    zero_shot: bool = True
    text_modality: str = "text"
    inputs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        PropagationOptions(k=self.k, alpha=self.alpha, iterations=self.iterations)


def _cross_view_check(
    cfg: FinetuneConfig, opts: CrossViewOptions, modalities: Sequence[str]
) -> None:
    if not cfg.views:
        raise UserInputError(
            "pseudo_label=cross_view needs finetune.views: the modalities of the training items "
            "it may read besides the classifier inputs (e.g. views: [text] for captioned images)"
        )
    missing = [m for m in cfg.views if m not in modalities]
    if missing:
        raise UserInputError(
            f"finetune.views {missing}: {cfg.model} has no such tower; it has {list(modalities)}"
        )


def _view_set(s: EmbeddedSet, m: str, rows: torch.Tensor) -> EmbeddedSet:
    """The rows of ``s`` that have view ``m``, with that view as their only input."""
    x = s.views[m][rows]
    return EmbeddedSet(
        [i for i, r in zip(s.ids, rows.tolist()) if r],
        {m: x},
        {m: torch.ones(len(x), dtype=torch.bool)},
        s.y[rows],
    )


def _cross_view(ctx: LabelContext, opts: CrossViewOptions) -> LabelerOutput:
    num_classes, cfg = len(ctx.class_names), ctx.cfg
    log_probs = torch.zeros(len(ctx.pool), num_classes)
    reached = torch.zeros(len(ctx.pool), dtype=torch.bool)
    info: dict[str, Any] = {}

    def add(probs: torch.Tensor, rows: torch.Tensor, name: str) -> None:
        log_probs[rows] += probs.clamp_min(1e-6).log()
        reached[rows] = True
        info.setdefault("experts", []).append(name)

    def propagate(pool: torch.Tensor, labeled: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pl = label_propagation(
            pool, labeled, y, num_classes, k=opts.k, alpha=opts.alpha, iterations=opts.iterations
        )
        return cast(torch.Tensor, pl.probs)

    for m in cfg.views:
        lab_rows, pool_rows = ctx.labeled.view_present[m], ctx.pool.view_present[m]
        if not lab_rows.any() or not pool_rows.any():
            info.setdefault("views_unused", []).append(m)
            continue
        lab, pool = _view_set(ctx.labeled, m, lab_rows), _view_set(ctx.pool, m, pool_rows)
        add(propagate(pool.x[m], lab.x[m], lab.y), pool_rows, f"{m}/propagation")
        if opts.zero_shot and m == opts.text_modality and cfg.class_names:
            templates = list(cfg.prompts) or prompts_for([m], cfg.prompts_by_modality)
            text = class_prompt_embeddings(
                _text_encoder(ctx.model, m), list(ctx.class_names), templates
            )
            mixed, mix_info = mix_zero_and_few_shot(lab, pool, text)
            add(cast(torch.Tensor, mixed.probs), pool_rows, f"{m}/zero_shot_mix")
            info[f"{m}/mix"] = mix_info["mix"]
    if opts.inputs:
        everywhere = torch.ones(len(ctx.pool), dtype=torch.bool)
        feats = fused_embedding(ctx.pool), fused_embedding(ctx.labeled)
        add(propagate(*feats, ctx.labeled.y), everywhere, "inputs/propagation")
    probs = log_probs.softmax(dim=1)
    labels = from_probs(probs, reached, probs.max(dim=1).values, "cross_view")
    weights = select_weights(labels, ctx.labeled.y, num_classes, opts)
    return LabelerOutput(labels, weights=weights, info={"cross_view": info})


PSEUDO_LABELERS.add(
    "cross_view", Labeler(_cross_view, _cross_view_check, other_view=True), CrossViewOptions
)


# -- self-training (FixMatch over cached views) ---------------------------------------------
@dataclass(frozen=True)
class SelfTrainingOptions:
    strong_views: Annotated[int, AT_LEAST_1] = 2  # augmented embeddings per unlabeled row
    strong_noise: Annotated[float, NON_NEGATIVE] = (
        0.5  # perturbation level of strong views (ModalitySpec units)
    )
    unlabeled_weight: Annotated[float, NON_NEGATIVE] = 1.0


def _self_training(ctx: LabelContext, opts: SelfTrainingOptions) -> LabelerOutput:
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
    "BalancedKMeansOptions",
    "CrossViewOptions",
    "KnnOptions",
    "LabelContext",
    "Labeler",
    "LabelerOutput",
    "PropagationOptions",
    "SelectOptions",
    "SelfTrainingOptions",
    "ZeroShotMixOptions",
    "ZeroShotOptions",
    "select_weights",
]
