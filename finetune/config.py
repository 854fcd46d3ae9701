"""Fine-tuning configuration (the ``finetune`` section).

Strategy axes are registry names plus an options mapping typed by the entry:

* ``head: {kind: lowrank, options: {rank: 8, hidden: 128}}`` (or just ``head: late``), registry
  :data:`modalign.finetune.heads.HEADS`;
* ``pseudo_label: knn`` + ``pseudo_label_options: {k: 20}``, registry
  :data:`modalign.finetune.config.PSEUDO_LABELERS`;
* ``threshold_policy: flexmatch`` + ``threshold_options: {warmup: false}``, registry
  :data:`modalign.finetune.pseudo.thresholds.THRESHOLDS` (self-training only).

Options are checked against the entry's dataclass when the config is built (ConfigError naming
the key, before any work); ``classifier.json`` stores the head's fully resolved options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any

from modalign.core.config_io import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    from_dict,
    to_dict,
)
from modalign.core.errors import ConfigError
from modalign.core.registry import Registry
from modalign.finetune.heads import HEADS
from modalign.finetune.pseudo.algorithms import prompts_for
from modalign.finetune.pseudo.thresholds import THRESHOLDS

PSEUDO_LABELERS: Registry[Any] = Registry("pseudo-labeler", "modalign.pseudo_labelers")
"""Pseudo-labelers named by ``finetune.pseudo_label``; each entry is a
:class:`modalign.finetune.pseudo.labelers.Labeler`. The built-ins are registered by
:mod:`modalign.finetune.pseudo.labelers` and :mod:`modalign.finetune.pseudo.auto` (``auto``); the registry
sits beside :class:`FinetuneConfig`, which names its entries, so the config is checked when built
without importing the labelers."""


@dataclass
class HeadSpec:
    """A fusion head: registry name and its options (resolved: every field of the dataclass)."""

    kind: str = "late"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        HEADS.get(self.kind, "finetune.head.kind")
        HEADS.options(self.kind, self.options, "finetune.head.options")  # validate up front

    def resolved(self) -> dict[str, Any]:
        """Every option of the head, defaults filled in (what ``classifier.json`` stores)."""
        return to_dict(HEADS.options(self.kind, self.options, "finetune.head.options"))


@dataclass
class FinetuneConfig:
    model: str = ""  # pretrained model bundle dir
    train: str = ""  # manifest with labels (few labeled + the rest unlabeled)
    test: str = ""  # held-out manifest for evaluation
    out: str = ""  # classifier bundle dir ("" = <output.dir>/classifier)
    class_names: list[str] = field(default_factory=list)  # "" = sorted distinct labels
    inputs: list[str] = field(default_factory=lambda: ["image", "audio"])  # classifier modalities
    # other modalities of the training items that pseudo-labelers may read (co-training: e.g.
    # [text] when items carry captions but the classifier reads images); never head inputs
    views: list[str] = field(default_factory=list)
    labels_per_class: Annotated[int, AT_LEAST_1] = 5
    val_per_class: Annotated[int, Range(ge=0, note="0 = off")] = (
        0  # labeled validation rows per class (early stopping); 0 = off
    )
    label_seed: Annotated[int, SEED] = 0
    # auto (CV over the labels picks none / propagation / zero_shot_mix / balanced_kmeans /
    # cross_view), none, zero_shot, knn, propagation, zero_shot_mix, balanced_kmeans, cross_view,
    # self_training, or a plugin's name
    pseudo_label: str = "auto"
    pseudo_label_options: dict[str, Any] = field(default_factory=dict)
    # zero-shot class prompts ("{}" = the class name); [] = generic templates per input modality
    prompts: list[str] = field(default_factory=list)
    prompts_by_modality: dict[str, list[str]] = field(default_factory=dict)
    threshold: Annotated[float, FRACTION] = 0.5  # min pseudo-label confidence kept
    balance: bool = True
    balance_ratio: Annotated[float, Range(ge=1)] = (
        1.5  # a class keeps at most ratio x the smallest class's count
    )
    rounds: Annotated[int, AT_LEAST_1] = 1
    # self_training (FixMatch-style over cached views): confidence policy and its cut
    threshold_policy: str = "fixed"
    threshold_options: dict[str, Any] = field(default_factory=dict)
    tau: Annotated[float, FRACTION] = 0.95
    head: Any = field(default_factory=HeadSpec)  # HeadSpec, its mapping, or a kind name
    epochs: Annotated[int, AT_LEAST_1] = 60
    # a head trains for at least this many optimizer steps (epochs are raised when the training
    # set is small: 40 labels are one batch, so 60 epochs were 60 steps); 0 = epochs alone
    min_steps: Annotated[int, Range(ge=0, note="0 = epochs alone")] = 300
    batch_size: Annotated[int, AT_LEAST_1] = 128
    lr: Annotated[float, POSITIVE] = 2e-3
    weight_decay: Annotated[float, NON_NEGATIVE] = 1e-4
    modality_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.3
    pseudo_weight: Annotated[float, NON_NEGATIVE] = 1.0
    seed: Annotated[int, SEED] = 0

    def __post_init__(self) -> None:
        self.head = _head_spec(self.head)
        both = [m for m in self.views if m in self.inputs]
        if both:
            raise ConfigError(
                f"finetune.views {both} are also finetune.inputs; a view is a modality the "
                "classifier does not read: remove it from one of the two"
            )
        if len(set(self.views)) != len(self.views):
            raise ConfigError(f"finetune.views {self.views} names a modality twice")
        bad = [p for p in self.prompts if "{}" not in p]
        if bad:
            raise ConfigError(f"finetune.prompts: {bad} have no '{{}}' for the class name")
        PSEUDO_LABELERS.get(self.pseudo_label, "finetune.pseudo_label")
        PSEUDO_LABELERS.options(
            self.pseudo_label, self.pseudo_label_options, "finetune.pseudo_label_options"
        )
        THRESHOLDS.get(self.threshold_policy, "finetune.threshold_policy")
        THRESHOLDS.options(
            self.threshold_policy, self.threshold_options, "finetune.threshold_options"
        )

    def templates(self) -> list[str]:
        """Zero-shot prompt templates: ``prompts``, else generic ones for ``inputs``."""
        return list(self.prompts) or prompts_for(self.inputs, self.prompts_by_modality)

    def resolved(self) -> FinetuneConfig:
        """A copy with every strategy's options fully resolved (what bundles save)."""
        pl = PSEUDO_LABELERS.options(self.pseudo_label, self.pseudo_label_options, "")
        th = THRESHOLDS.options(self.threshold_policy, self.threshold_options, "")
        return dataclasses.replace(
            self,
            head=HeadSpec(self.head.kind, self.head.resolved()),
            pseudo_label_options=to_dict(pl),
            threshold_options=to_dict(th),
        )


def _head_spec(value: Any) -> HeadSpec:
    """``finetune.head`` as a :class:`HeadSpec`: from a spec, a mapping, or a bare kind name."""
    if isinstance(value, HeadSpec):
        return value
    if isinstance(value, str):  # the short form ``head: late``
        return HeadSpec(value)
    if isinstance(value, dict):
        return from_dict(HeadSpec, value, "finetune.head")
    raise ConfigError(
        f"finetune.head: expected a head kind (e.g. late) or {{kind: ..., options: {{...}}}}, "
        f"got {value!r}"
    )
