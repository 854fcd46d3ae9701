"""The ``auto`` pseudo-labeler: the few labels decide whether, and which, pseudo-labels to use.

Each candidate labeler runs inside a stratified k-fold cross-validation over the labeled rows:
a fold's held-out labels join the unlabeled pool (their labels hidden), the candidate labels the
pool from the fold's training labels, a head is trained exactly as the final one would be
(:func:`~modalign.finetune.pipeline.head_from_output`) and scored on the held-out rows. ``none``
(labels only) is always a candidate and wins ties, so pseudo-labels are used only when they
measurably helped on labels the labeler never saw. With a single label in some class nothing can
be held out per class; then a labeler that reads another view decides, else reverse validation
(``AutoOptions.one_label``). The decision
(scores per candidate) joins the pseudo-label report and ``classifier.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch

from modalign.core.config_io import FRACTION, Range
from modalign.core.errors import UserInputError
from modalign.finetune.config import PSEUDO_LABELERS
from modalign.finetune.embedded import EmbeddedSet, concat_sets
from modalign.finetune.evaluate import predict
from modalign.finetune.pipeline import head_from_output, train_head
from modalign.finetune.pseudo.labelers import LabelContext, Labeler, LabelerOutput
from modalign.finetune.pseudo.labels import NO_LABEL, PseudoLabels

log = logging.getLogger(__name__)


# -- auto: cross-validation over the labeled rows decides (the default) -----------------------
ONE_LABEL = ("views", "reverse", "none")
"""What ``auto`` does when some class has a single label (``AutoOptions.one_label``)."""


@dataclass(frozen=True)
class AutoOptions:
    """``auto`` runs each candidate labeler (registry names, their options in
    ``candidate_options``) inside a k-fold cross-validation over the labeled rows and keeps the
    one whose head scores best on the held-out labels; ``none`` (labels only) is always a
    candidate and wins ties and gains of at most ``min_gain``. ``folds``: at most this many folds
    (never more than the smallest class's label count). With one label in some class no row can
    be held out: ``one_label: reverse`` then keeps the best candidate whose pseudo-labels alone
    train a head that gets at least ``reverse_min`` of the labeled rows right (reverse
    validation), else ``none``; ``one_label: views`` (the default) first takes the first
    available candidate registered with ``Labeler.other_view`` (``cross_view`` with
    ``finetune.views`` set), else does what ``reverse`` does; ``one_label: none`` always trains
    on the labels alone.

    Why ``views``: reverse validation scores a head trained on the pseudo-labels against the
    labeled rows, which every labeler seeded by those same rows' inputs (propagation, prototypes)
    passes almost by construction: on icons at one label per class propagation scored 0.97-1.0
    and still made the classifier worse than labels only (-0.008 [-0.015, -0.002], 5 seeds),
    while the view labeler scored 0.41-0.68 and added +0.164. A labeler that reads another view
    is not anchored on the labeled rows' inputs, so that test says nothing about it either;
    with one label per class nothing is left to check it, and ``views`` trusts the view the
    config declared.
    """

    candidates: list[str] = field(
        default_factory=lambda: [
            "none",
            "propagation",
            "zero_shot_mix",
            "balanced_kmeans",
            "cross_view",
        ]
    )
    candidate_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    folds: Annotated[int, Range(ge=2)] = 4
    min_gain: Annotated[float, Range(ge=-1, le=1)] = 0.0
    one_label: str = "views"
    reverse_min: Annotated[float, FRACTION] = 0.9

    def __post_init__(self) -> None:
        if not self.candidates:
            raise ValueError("candidates must name at least one pseudo-labeler")
        for name in self.candidates:
            if name == "auto":
                raise ValueError("candidates cannot include 'auto' itself")
            PSEUDO_LABELERS.get(name, "finetune.pseudo_label_options.candidates")
        for name, raw in self.candidate_options.items():
            if name not in self.candidates:
                raise ValueError(
                    f"candidate_options.{name}: {name!r} is not in candidates {self.candidates}"
                )
            PSEUDO_LABELERS.options(
                name, raw, f"finetune.pseudo_label_options.candidate_options.{name}"
            )
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds!r}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain!r}")
        if self.one_label not in ONE_LABEL:
            raise ValueError(f"one_label must be one of {ONE_LABEL}, got {self.one_label!r}")
        if not 0.0 <= self.reverse_min <= 1.0:
            raise ValueError(f"reverse_min must be in [0, 1], got {self.reverse_min!r}")


def stratified_folds(
    y: torch.Tensor, num_classes: int, folds: int, seed: int
) -> list[torch.Tensor]:
    """``min(folds, smallest class count)`` folds of row indices, each class spread evenly
    (seeded shuffle within each class); needs at least two labels in every class."""
    counts = torch.bincount(y, minlength=num_classes)
    k = min(folds, int(counts.min()))
    if k < 2:
        raise UserInputError("stratified_folds needs at least two labeled rows in every class")
    gen = torch.Generator().manual_seed(seed)
    assign = torch.empty(len(y), dtype=torch.long)
    for c in range(num_classes):
        rows = (y == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        assign[rows] = torch.arange(len(rows)) % k
    return [(assign == f).nonzero().flatten() for f in range(k)]


def auto_select(ctx: LabelContext, opts: AutoOptions) -> LabelerOutput:
    """Pick a candidate by cross-validation on ``ctx.labeled``; return its output on the pool
    (an empty selection when ``none`` wins) with the decision in ``info``."""
    num_classes = len(ctx.class_names)
    candidates, skipped = _available(ctx, opts)
    counts = torch.bincount(ctx.labeled.y, minlength=num_classes)
    if int(counts.min()) >= 2:
        scores = {name: _cv_score(ctx, name, opts) for name in candidates}
        best = _best(scores, opts.min_gain)
        decision: dict[str, Any] = {"criterion": "cross_validation", "cv_accuracy": scores}
        decision["folds"] = min(opts.folds, int(counts.min()))
        outputs: dict[str, LabelerOutput | None] = {}
    elif opts.one_label == "none":
        best, outputs = "none", {}
        decision = {"criterion": "one_label_none"}
    elif opts.one_label == "views" and (views := _other_view(candidates)):
        best, outputs = views[0], {}
        decision = {"criterion": "one_label_other_view", "other_view": views}
    else:
        outputs = {name: _run(ctx, name, opts) for name in candidates if name != "none"}
        reverse = {name: _reverse_score(ctx, out) for name, out in outputs.items()}
        good = {n: v for n, v in reverse.items() if v >= opts.reverse_min}
        best = max(good, key=lambda n: (good[n], -candidates.index(n))) if good else "none"
        decision = {"criterion": "reverse_validation", "reverse_accuracy": reverse}
        decision["reverse_min"] = opts.reverse_min
    decision.update({"chosen": best, "skipped": skipped})
    log.info("auto pseudo-labeler: %s", decision)
    if best == "none":
        return _empty(len(ctx.pool), num_classes, decision)
    out = outputs.get(best) or _run(ctx, best, opts)
    if out is None:
        return _empty(len(ctx.pool), num_classes, decision)
    info = {**(out.info or {}), "auto": decision}
    return dataclasses.replace(out, info=info)


def _available(ctx: LabelContext, opts: AutoOptions) -> tuple[list[str], dict[str, str]]:
    """Candidates in order, ``none`` first; those whose up-front check refuses this model or
    config are skipped with the reason."""
    names = ["none", *[n for n in opts.candidates if n != "none"]]
    keep, skipped = [], {}
    for name in names:
        entry = PSEUDO_LABELERS.get(name, "finetune.pseudo_label_options.candidates")
        if entry.factory.check is not None:
            try:
                entry.factory.check(ctx.cfg, _options(name, opts), ctx.model.modalities)
            except UserInputError as exc:
                skipped[name] = str(exc)
                continue
        keep.append(name)
    return keep, skipped


def _other_view(candidates: list[str]) -> list[str]:
    """The candidates registered as labelling from another view (``Labeler.other_view``)."""
    return [n for n in candidates if PSEUDO_LABELERS.get(n).factory.other_view]


def _options(name: str, opts: AutoOptions) -> Any:
    raw = opts.candidate_options.get(name, {})
    return PSEUDO_LABELERS.options(
        name, raw, f"finetune.pseudo_label_options.candidate_options.{name}"
    )


def _run(ctx: LabelContext, name: str, opts: AutoOptions) -> LabelerOutput | None:
    return PSEUDO_LABELERS.get(name).factory.run(ctx, _options(name, opts))


def _cv_score(ctx: LabelContext, name: str, opts: AutoOptions) -> float:
    """Held-out accuracy of candidate ``name`` over the folds (every labeled row held out once)."""

    num_classes = len(ctx.class_names)
    y = ctx.labeled.y
    correct = 0
    for k, held in enumerate(stratified_folds(y, num_classes, opts.folds, ctx.cfg.seed)):
        train_mask = torch.ones(len(y), dtype=torch.bool)
        train_mask[held] = False
        train = ctx.labeled.subset(train_mask.nonzero().flatten())
        test = ctx.labeled.subset(held)
        hidden = dataclasses.replace(test, y=torch.full_like(test.y, NO_LABEL))
        fold = dataclasses.replace(
            ctx,
            labeled=train,
            pool=concat_sets(ctx.pool, hidden),
            gen=torch.Generator().manual_seed(ctx.cfg.seed + 7919 * (k + 1)),
        )
        out = _run(fold, name, opts) if name != "none" else None
        if out is None:
            head = train_head(train, torch.ones(len(train)), num_classes, ctx.cfg)
        else:
            head = head_from_output(fold, out, None)[0]
        correct += int((predict(head, test).argmax(1) == test.y).sum())
    return correct / len(y)


def _reverse_score(ctx: LabelContext, out: LabelerOutput | None) -> float:
    """Accuracy on the labeled rows of a head trained on the candidate's pseudo-labels alone."""

    if out is None:
        return 0.0
    if out.head is None:
        weights = out.weights
        if weights is None:
            weights = (out.labels.labels != NO_LABEL).float()
        if not bool(((weights > 0) & (out.labels.labels != NO_LABEL)).any()):
            return 0.0
        out = dataclasses.replace(out, weights=weights)
    head = head_from_output(ctx, out, None, labels=False)[0]
    labeled: EmbeddedSet = ctx.labeled
    return float((predict(head, labeled).argmax(1) == labeled.y).float().mean())


def _best(scores: dict[str, float], min_gain: float) -> str:
    """The best-scoring candidate; ``none`` unless another beats it by more than ``min_gain``."""
    base = scores["none"]
    best = max(scores, key=lambda n: scores[n])
    return best if scores[best] > base + min_gain + 1e-12 else "none"


def _empty(n: int, num_classes: int, decision: dict[str, Any]) -> LabelerOutput:
    labels = PseudoLabels(torch.full((n,), NO_LABEL, dtype=torch.long), torch.zeros(n), "auto/none")
    return LabelerOutput(labels, weights=torch.zeros(n), info={"auto": decision})


__all__ = ["ONE_LABEL", "AutoOptions", "auto_select", "stratified_folds"]


PSEUDO_LABELERS.add("auto", Labeler(auto_select), AutoOptions)
