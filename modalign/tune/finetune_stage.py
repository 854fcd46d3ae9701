"""The fine-tuning objective: a validation metric of the trained head (:data:`METRICS`).

``subsets`` (the default) averages the accuracy over every modality subset (robustness to a
missing modality); ``accuracy`` is the accuracy with each row's modalities present, the figure
``modalign finetune`` reports as test accuracy. The training manifest is embedded once; its
labels are split (seeded) into ``labels_per_class`` few labels + ``val_per_class`` validation
rows per class, the rest is the unlabeled pool. The test manifest (``finetune.test``) is never
read by the search: only ``best.yaml`` is later evaluated on it (by ``modalign finetune``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalign.config import Config, load_config
from modalign.core.config_io import apply_override, to_dict
from modalign.core.errors import UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, embed_labeled, few_label_split
from modalign.finetune.evaluate import evaluate_head
from modalign.finetune.pipeline import pseudo_label_head
from modalign.pretrain.bundle import BundleModel, load_bundle

__all__ = ["METRICS", "FinetuneData", "FinetuneObjective", "config_with", "load_finetune_data"]

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
class FinetuneData:
    """Cached embeddings of the training manifest and the search's own split of its labels."""

    model: BundleModel
    labeled: EmbeddedSet
    pool: EmbeddedSet
    val: EmbeddedSet
    class_names: list[str]
    sources: list[str]  # what was read (tests assert the test manifest is not among them)


def load_finetune_data(cfg: FinetuneConfig, val_per_class: int) -> FinetuneData:
    """Embed ``cfg.train`` once; split its labels into few-label train / validation / pool."""
    if not cfg.model or not cfg.train:
        raise UserInputError("finetune.model and finetune.train must be set to tune fine-tuning")
    if val_per_class < 1:
        raise UserInputError("--val-per-class must be >= 1 (validation rows drawn from train)")
    model = load_bundle(cfg.model)
    data, names = embed_labeled(model, cfg.train, cfg.inputs, cfg.class_names or None)
    split = few_label_split(data.y, names, cfg.labels_per_class, val_per_class, cfg.label_seed)
    return FinetuneData(
        model,
        data.subset(split.labeled),
        data.subset(split.unlabeled),
        data.subset(split.val),
        names,
        [cfg.train],
    )


@dataclass
class FinetuneObjective:
    """``objective(trial)``: suggested keys -> head (+ pseudo-labels) -> validation score."""

    base_tree: dict[str, Any]
    data: FinetuneData
    space: Any
    metric: str = "subsets"  # a key of METRICS

    def params(self, trial: Any) -> dict[str, Any]:
        return self.space.suggest(trial)

    def score(self, params: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
        """The metric on the validation rows, and the figures it came from (accuracy, subsets)."""
        cfg = config_with(self.base_tree, params).finetune
        d = self.data
        head, _ = pseudo_label_head(d.model, d.labeled, d.pool, d.class_names, cfg)
        ev = evaluate_head(head, d.val, len(d.class_names))
        return METRICS[self.metric](ev), {
            "accuracy": float(ev["accuracy"]),
            "by_subset": ev["by_subset"],
        }

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
