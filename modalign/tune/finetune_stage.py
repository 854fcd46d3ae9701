"""The fine-tuning objective: a validation metric of the trained head (:data:`METRICS`).

``subsets`` (the default) averages the accuracy over every modality subset (robustness to a
missing modality); ``accuracy`` is the accuracy with each row's modalities present, the figure
``modalign finetune`` reports as test accuracy. The training manifest is embedded once; its
labels are split (seeded) into ``labels_per_class`` few labels + ``val_per_class`` validation
rows per class, the rest is the unlabeled pool; with ``--label-splits N`` every trial is scored
on N such splits (label seeds ``finetune.label_seed`` .. ``+ N - 1``) and the scores averaged. The test manifest (``finetune.test``) is never
read by the search: only ``best.yaml`` is later evaluated on it (by ``modalign finetune``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalign.benchmark.figures import pack_outcomes
from modalign.config import Config, load_config
from modalign.core.config_io import apply_override, to_dict
from modalign.core.errors import UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, embed_labeled, few_label_split
from modalign.finetune.evaluate import evaluate_head, predict
from modalign.finetune.pipeline import check_labeler, pseudo_label_head
from modalign.pretrain.bundle import BundleModel, load_bundle

__all__ = [
    "METRICS",
    "FinetuneData",
    "FinetuneObjective",
    "LabelSplit",
    "config_with",
    "load_finetune_data",
]

# what a fine-tuning trial maximises: a function of evaluate_head's result on the validation rows
METRICS: dict[str, Callable[[dict[str, Any]], float]] = {
    "subsets": lambda ev: float(np.mean(list(ev["by_subset"].values()))),
    "accuracy": lambda ev: float(ev["accuracy"]),
}


def check_metric(metric: str) -> str:
    """``metric`` if it names an entry of :data:`METRICS`, else a UserInputError listing them."""
    if metric not in METRICS:
        raise UserInputError(f"--metric {metric!r}: valid metrics are {', '.join(METRICS)}")
    return metric


def config_with(base_tree: dict[str, Any], params: Mapping[str, Any]) -> Config:
    """The root config tree with ``params`` (dotted keys) applied, validated."""
    import yaml

    from modalign.core.config_io import from_dict

    tree = to_dict(from_dict(Config, base_tree))
    for key, value in params.items():
        apply_override(tree, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    return from_dict(Config, tree)


@dataclass
class LabelSplit:
    """One seeded split of the training labels: few labels, validation rows, unlabeled pool."""

    seed: int  # the label seed it was drawn with
    labeled: EmbeddedSet
    pool: EmbeddedSet
    val: EmbeddedSet


@dataclass
class FinetuneData:
    """Cached embeddings of the training manifest and the search's own splits of its labels."""

    model: BundleModel
    splits: list[LabelSplit]  # a trial is scored on each and the scores averaged
    class_names: list[str]
    sources: list[str]  # what was read (tests assert the test manifest is not among them)


def load_finetune_data(
    cfg: FinetuneConfig, val_per_class: int, label_splits: int = 1
) -> FinetuneData:
    """Embed ``cfg.train`` once; draw ``label_splits`` splits of its labels into few-label
    train / validation / pool (label seeds ``finetune.label_seed``, ``+1``, ...).

    With few labels one validation split of a few rows per class ranks many configurations
    alike and by chance; averaging a trial over several splits scores what a user meets: a
    configuration applied to labels it was not chosen on."""
    if not cfg.model or not cfg.train:
        raise UserInputError("finetune.model and finetune.train must be set to tune fine-tuning")
    if val_per_class < 1:
        raise UserInputError("--val-per-class must be >= 1 (validation rows drawn from train)")
    if label_splits < 1:
        raise UserInputError("--label-splits must be >= 1 (label splits each trial is scored on)")
    model = load_bundle(cfg.model)
    check_labeler(cfg, model.modalities)  # the base config's labeler, replayed as trial 0
    data, names = embed_labeled(
        model, cfg.train, cfg.inputs, cfg.class_names or None, views=cfg.views
    )
    splits = []
    for seed in range(cfg.label_seed, cfg.label_seed + label_splits):
        split = few_label_split(data.y, names, cfg.labels_per_class, val_per_class, seed)
        splits.append(
            LabelSplit(
                seed,
                data.subset(split.labeled),
                data.subset(split.unlabeled),
                data.subset(split.val),
            )
        )
    return FinetuneData(model, splits, names, [cfg.train])


@dataclass
class FinetuneObjective:
    """``objective(trial)``: suggested keys -> head (+ pseudo-labels) -> validation score."""

    base_tree: dict[str, Any]
    data: FinetuneData
    space: Any
    metric: str = "subsets"  # a key of METRICS

    def params(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def baseline_params(self) -> dict[str, Any]:
        """Trial parameters that replay the base config (see ``FinetuneSpace.baseline``)."""
        return self.space.baseline(self.base_tree["finetune"])

    def neighbour_params(self) -> list[dict[str, Any]]:
        """The base config with each other labeler (see ``FinetuneSpace.neighbours``)."""
        return self.space.neighbours(self.base_tree["finetune"])

    def score(self, params: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
        """The metric on the validation rows, averaged over the label splits, and the figures
        it came from (accuracy, subsets, and the metric per split)."""
        base = config_with(self.base_tree, params).finetune
        d = self.data
        values, accuracy, subsets, hits = [], [], [], []
        for split in d.splits:
            cfg = dataclasses.replace(base, label_seed=split.seed)
            head, _ = pseudo_label_head(d.model, split.labeled, split.pool, d.class_names, cfg)
            ev = evaluate_head(head, split.val, len(d.class_names))
            values.append(METRICS[self.metric](ev))
            accuracy.append(float(ev["accuracy"]))
            subsets.append(ev["by_subset"])
            hits.append((predict(head, split.val).argmax(1) == split.val.y).numpy())
        by_subset = {k: float(np.mean([s[k] for s in subsets])) for k in subsets[0]}
        figures: dict[str, Any] = {
            "accuracy": float(np.mean(accuracy)),
            "by_subset": by_subset,
            # each validation row right or wrong (all inputs present), split after split, packed:
            # the paired comparison with the study's baseline trial reads them
            "hits": pack_outcomes(np.concatenate(hits)),
            "rows": int(sum(len(h) for h in hits)),
        }
        if len(d.splits) > 1:
            figures["by_split"] = values
        return float(np.mean(values)), figures

    def __call__(self, trial: Any) -> float:
        value, figures = self.score(self.params(trial))
        for key, fig in figures.items():
            trial.set_user_attr(key, fig)
        return value


def usable_labelers(names: list[str], cfg: FinetuneConfig, model: BundleModel) -> list[str]:
    """The pseudo-labelers whose own ``check`` accepts this model (e.g. zero-shot needs text)."""
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS

    ok = []
    for name in names:
        entry = PSEUDO_LABELERS.get(name, "tune pseudo_labels")
        try:
            if entry.factory.check is not None:
                opts = PSEUDO_LABELERS.options(name, {}, "finetune.pseudo_label_options")
                entry.factory.check(cfg, opts, model.modalities)
        except UserInputError:
            continue
        ok.append(name)
    return ok


def default_tree(config: str, overrides: list[str]) -> dict[str, Any]:
    """The root config (file or built-in + ``--set``) as a plain tree."""
    return to_dict(load_config(config, overrides))
