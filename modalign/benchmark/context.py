"""What a benchmark task sees: one model on one corpus, with embeddings cached across tasks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modalign.benchmark.suite import CorpusSpec, Suite
from modalign.core.config_io import from_dict
from modalign.finetune.classifier import Classifier
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, embed_labeled, few_label_split
from modalign.finetune.head_base import FusionHead
from modalign.finetune.pipeline import pseudo_label_head
from modalign.pretrain.bundle import BundleModel
from modalign.retrieval.embed import Embeddings, embed_source

__all__ = ["TaskContext"]


@dataclass
class TaskContext:
    """One (model, corpus) cell of a benchmark run; tasks share its cached embeddings.

    ``seed`` seeds every bootstrap (local generators) and the first training seed.
    """

    model: BundleModel
    model_name: str
    corpus_name: str
    corpus: CorpusSpec
    suite: Suite
    out: Path  # folder for this cell's plots
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def seed(self) -> int:
        return self.suite.seed

    @property
    def resamples(self) -> int:
        return self.suite.resamples

    @property
    def max_items(self) -> int | None:
        return self.corpus.max_items or None

    @property
    def inputs(self) -> list[str]:
        return [m for m in self.corpus.inputs if m in self.model.modalities]

    @property
    def views(self) -> list[str]:
        """The suite's ``finetune.views`` that this model has and this corpus does not take as a
        classifier input (co-training views of the train split)."""
        views = self.suite.finetune.get("views", [])
        return [m for m in views if m in self.model.modalities and m not in self.inputs]

    def _cached(self, key: str, make: Any) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def retrieval_embeddings(self) -> dict[str, Embeddings]:
        """Every modality of the test split (up to ``max_items`` items)."""
        return self._cached(
            "retrieval",
            lambda: embed_source(self.model, self.corpus.test, max_items=self.max_items)[0],
        )

    def labeled(self, split: str) -> tuple[EmbeddedSet, list[str]]:
        """Classifier inputs of ``train`` or ``test`` as an :class:`EmbeddedSet` + class names
        (``train`` also carries the :attr:`views` pseudo-labelers may read)."""
        names = self.corpus.class_names or None
        views: list[str] = self.views
        if split == "test":
            names, views = self.labeled("train")[1], []
        src = getattr(self.corpus, split)
        return self._cached(
            f"labeled:{split}",
            lambda: embed_labeled(self.model, src, self.inputs, names, views=views),
        )

    def finetune_cfg(self, **changes: Any) -> FinetuneConfig:
        """The suite's ``finetune`` keys (+ ``changes``) as a config for this corpus."""
        base = from_dict(FinetuneConfig, dict(self.suite.finetune), "finetune")
        class_names = self.labeled("train")[1]
        return dataclasses.replace(
            base,
            model=str(self.model.path),
            train=self.corpus.train,
            test=self.corpus.test,
            inputs=self.inputs,
            views=self.views,
            class_names=class_names,
            **changes,
        )

    def train_few_label(self, cfg: FinetuneConfig) -> FusionHead:
        """Few labels of ``cfg.labels_per_class`` per class (+ its pseudo-labeler) -> head."""
        data, names = self.labeled("train")
        split = few_label_split(data.y, names, cfg.labels_per_class, 0, cfg.label_seed)
        labeled, pool = data.subset(split.labeled), data.subset(split.unlabeled)
        head, _ = pseudo_label_head(self.model, labeled, pool, names, cfg)
        return head

    def reference_classifier(self) -> Classifier:
        """The fused classifier of the suite's ``finetune`` settings (robustness, calibration)."""

        def make() -> Classifier:
            cfg = self.finetune_cfg()
            head = self.train_few_label(cfg)
            return Classifier(self.model, head, self.labeled("train")[1], self.inputs, cfg)

        return self._cached("classifier", make)


def correct_vector(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-item 0/1 correctness as float."""
    return (logits.argmax(1) == y).float()
