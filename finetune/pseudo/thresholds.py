"""Self-training confidence thresholds (FixMatch / FlexMatch / FreeMatch) and their registry.

A threshold policy is one registration in :data:`THRESHOLDS` (group ``modalign.thresholds``):
``THRESHOLDS.add(name, factory, OptionsDataclass)`` with
``factory(num_classes, num_unlabeled, tau, options) -> ConfidenceThreshold``. Config picks it
with ``finetune.threshold_policy`` and its options with ``finetune.threshold_options``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.config_io import Range
from modalign.core.errors import UserInputError
from modalign.core.registry import NoOptions, Registry
from modalign.finetune.pseudo.labels import NO_LABEL


class ConfidenceThreshold(ABC):
    """Decides which rows' weak-view predictions are confident enough to train on."""

    @abstractmethod
    def thresholds(self) -> Tensor:
        """Current per-class thresholds ``(C,)`` (a fixed threshold returns one value)."""

    def mask(self, probs: Tensor) -> Tensor:
        """``(B,)`` bool: rows whose max probability reaches the threshold of their argmax class."""
        conf, cls = probs.max(dim=1)
        cut = self.thresholds().to(probs.device)
        cut = cut[cls] if cut.numel() > 1 else cut.expand_as(conf)
        return conf >= cut

    def update(self, probs: Tensor, indices: Tensor | None = None) -> None:  # noqa: B027
        """Accumulate statistics from weak-view probabilities ``(B, C)`` of pool rows ``indices``.

        Optional hook (stateless by default); ``indices`` are dataset row indices, for policies
        that track each unlabeled row.
        """


class FixedThreshold(ConfidenceThreshold):
    """FixMatch: keep rows with max probability ``>= tau``."""

    def __init__(self, tau: float = 0.95) -> None:
        _check_tau(tau)
        self.tau = float(tau)

    def thresholds(self) -> Tensor:
        return torch.tensor([self.tau])


class FlexMatchThreshold(ConfidenceThreshold):
    """FlexMatch curriculum pseudo-labeling (Zhang et al. 2021).

    The learning effect of class ``c`` is ``sigma_c / max(max_c sigma, unused)`` (``unused`` only
    with ``warmup``), where ``sigma_c`` counts predictions of ``c`` with confidence above ``tau``.
    The class threshold is ``tau * M(beta_c)`` with the convex mapping ``M(x) = x / (2 - x)``, so
    classes the model is rarely confident about get lower thresholds.

    With ``num_unlabeled`` set and ``update(probs, indices)`` given dataset row indices, the last
    confident prediction of each unlabeled row is kept (as in the paper) and ``unused`` counts rows
    never confidently predicted. Without indices, counts accumulate over every update call and
    ``unused`` counts the unconfident predictions seen.
    """

    def __init__(
        self,
        num_classes: int,
        tau: float = 0.95,
        warmup: bool = True,
        num_unlabeled: int | None = None,
    ) -> None:
        _check_tau(tau)
        if num_classes < 1:
            raise UserInputError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.tau, self.warmup = num_classes, float(tau), warmup
        self._latest = None if num_unlabeled is None else torch.full((num_unlabeled,), NO_LABEL)
        self._counts = torch.zeros(num_classes)
        self._unused = 0.0

    def update(self, probs: Tensor, indices: Tensor | None = None) -> None:
        conf, cls = probs.detach().cpu().max(dim=1)
        confident = conf > self.tau
        if self._latest is not None:
            if indices is None:
                raise UserInputError(
                    "FlexMatchThreshold(num_unlabeled=...) needs update(probs, indices)"
                )
            indices = indices.cpu()
            self._latest[indices[confident]] = cls[confident]
            return
        self._counts += torch.bincount(cls[confident], minlength=self.num_classes).float()
        self._unused += float((~confident).sum())

    def learning_effect(self) -> Tensor:
        """Per-class learning effect ``beta`` in [0, 1]."""
        counts, unused = self._statistics()
        scale = max(float(counts.max()), unused if self.warmup else 0.0)
        if scale == 0:
            # Nothing seen yet: warm-up starts from zero effect, otherwise fall back to tau.
            return torch.zeros(self.num_classes) if self.warmup else torch.ones(self.num_classes)
        return counts / scale

    def thresholds(self) -> Tensor:
        beta = self.learning_effect()
        return self.tau * beta / (2.0 - beta)

    def _statistics(self) -> tuple[Tensor, float]:
        if self._latest is None:
            return self._counts, self._unused
        used = self._latest >= 0
        counts = torch.bincount(self._latest[used], minlength=self.num_classes).float()
        return counts, float((~used).sum())


class FreeMatchThreshold(ConfidenceThreshold):
    """FreeMatch self-adaptive thresholds (Wang et al. 2023).

    A global threshold ``tau`` tracks the EMA of the mean max-probability, a local vector ``p``
    tracks the EMA of the mean class probabilities; the class threshold is
    ``tau * p_c / max(p)``. Both start at ``1 / C``, so early training keeps most rows and the
    thresholds rise as the model grows confident.
    """

    def __init__(self, num_classes: int, ema: float = 0.999) -> None:
        if num_classes < 1 or not 0.0 <= ema < 1.0:
            raise UserInputError(
                f"FreeMatchThreshold needs num_classes >= 1 and 0 <= ema < 1 "
                f"(got {num_classes}, {ema})"
            )
        self.num_classes, self.ema = num_classes, float(ema)
        self.global_threshold = torch.tensor(1.0 / num_classes)
        self.class_probs = torch.full((num_classes,), 1.0 / num_classes)

    def update(self, probs: Tensor, indices: Tensor | None = None) -> None:
        probs = probs.detach().float().cpu()
        if probs.shape[0] == 0:
            return
        m = self.ema
        self.global_threshold = m * self.global_threshold + (1 - m) * probs.max(dim=1).values.mean()
        self.class_probs = m * self.class_probs + (1 - m) * probs.mean(dim=0)

    def thresholds(self) -> Tensor:
        return self.global_threshold * self.class_probs / self.class_probs.max()


def _check_tau(tau: float) -> None:
    if not 0.0 <= tau <= 1.0:
        raise UserInputError(f"confidence threshold tau must be in [0, 1], got {tau!r}")


def self_training_loss(
    logits_strong: Tensor, probs_weak: Tensor, threshold: ConfidenceThreshold | float
) -> tuple[Tensor, Tensor]:
    """FixMatch-style unlabeled loss: returns ``(loss, mask)``.

    Hard pseudo-labels come from the (detached) weak-view ``probs_weak``; cross-entropy on the
    strong-view logits counts only where ``threshold.mask`` holds, averaged over the whole batch
    (as in FixMatch, so the loss shrinks when few rows pass). Call ``threshold.update`` yourself.
    """
    if not isinstance(threshold, ConfidenceThreshold):
        threshold = FixedThreshold(float(threshold))
    probs_weak = probs_weak.detach()
    mask = threshold.mask(probs_weak)
    if logits_strong.shape[0] == 0:
        return logits_strong.sum() * 0.0, mask
    ce = F.cross_entropy(logits_strong, probs_weak.argmax(dim=1), reduction="none")
    loss = torch.where(mask, ce, torch.zeros_like(ce)).sum() / ce.shape[0]
    return loss, mask


# The last argument is an instance of the options dataclass the policy registered with.
ThresholdFactory = Callable[[int, int, float, Any], ConfidenceThreshold]
THRESHOLDS: Registry[ThresholdFactory] = Registry("threshold policy", "modalign.thresholds")


@dataclass(frozen=True)
class FlexMatchOptions:
    warmup: bool = True  # count never-confident rows as "unused" (the paper's warm-up)


@dataclass(frozen=True)
class FreeMatchOptions:
    ema: Annotated[float, Range(gt=0, lt=1)] = 0.999


@THRESHOLDS.register("fixed", NoOptions)
def _fixed(num_classes: int, num_unlabeled: int, tau: float, opts: object) -> ConfidenceThreshold:
    """FixMatch: one fixed cut ``tau``."""
    return FixedThreshold(tau)


@THRESHOLDS.register("flexmatch", FlexMatchOptions)
def _flexmatch(
    num_classes: int, num_unlabeled: int, tau: float, opts: FlexMatchOptions
) -> ConfidenceThreshold:
    """FlexMatch: per-class curriculum thresholds below ``tau``."""
    return FlexMatchThreshold(num_classes, tau=tau, warmup=opts.warmup, num_unlabeled=num_unlabeled)


@THRESHOLDS.register("freematch", FreeMatchOptions)
def _freematch(
    num_classes: int, num_unlabeled: int, tau: float, opts: FreeMatchOptions
) -> ConfidenceThreshold:
    """FreeMatch: self-adaptive global x local thresholds."""
    return FreeMatchThreshold(num_classes, ema=opts.ema)


def make_threshold(
    policy: str, num_classes: int, num_unlabeled: int, tau: float, options: object = None
) -> ConfidenceThreshold:
    """Build threshold policy ``policy`` (options: a mapping or its options dataclass)."""
    entry = THRESHOLDS.get(policy, "finetune.threshold_policy")
    opts = THRESHOLDS.options(policy, options, "finetune.threshold_options")
    return entry.factory(num_classes, num_unlabeled, tau, opts)


__all__ = [
    "THRESHOLDS",
    "ConfidenceThreshold",
    "FixedThreshold",
    "FlexMatchOptions",
    "FlexMatchThreshold",
    "FreeMatchOptions",
    "FreeMatchThreshold",
    "make_threshold",
    "self_training_loss",
]
