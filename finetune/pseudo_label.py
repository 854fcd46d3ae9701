"""Pseudo-labels for unlabeled rows: zero-shot, kNN label propagation, self-training thresholds.

Every labeler returns :class:`PseudoLabels`. A row that cannot be labeled at all (no modality
present, or cut off from every labeled row in the kNN graph) gets label :data:`NO_LABEL` (-1) and
confidence 0, so no threshold or selection can pick it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError

NO_LABEL = -1
# Exponent on kNN similarities (Iscen et al. 2019): sharpens affinities toward close neighbours.
_GAMMA = 3.0


@dataclass
class PseudoLabels:
    """Per-row pseudo-labels.

    ``labels`` (N,) long, ``NO_LABEL`` where no prediction is possible; ``confidence`` (N,) in
    [0, 1]; ``method`` names the labeler; ``probs`` (N, C) are the class probabilities when the
    labeler has them.
    """

    labels: Tensor
    confidence: Tensor
    method: str
    probs: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Zero-shot
# --------------------------------------------------------------------------------------------


def zero_shot(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor] | None,
    class_text_embeddings: Tensor,
    temperature: float = 0.01,
) -> PseudoLabels:
    """Label rows by cosine similarity to class text embeddings in the shared space.

    Inputs are expected L2-normalised. Each modality gives ``softmax(x @ T.T / temperature)``;
    these probabilities are averaged over the modalities present in each row (absent rows' values
    are never read). Confidence is the max averaged probability.
    """
    if temperature <= 0:
        raise UserInputError(f"zero-shot temperature must be > 0, got {temperature!r}")
    if class_text_embeddings.dim() != 2 or class_text_embeddings.shape[0] < 1:
        raise UserInputError("class_text_embeddings must have shape (C, D) with C >= 1")
    if not embeddings:
        raise UserInputError("zero_shot needs at least one modality's embeddings")
    present = present or {}
    text = class_text_embeddings.float()
    total, count = None, None
    for name, x in embeddings.items():
        rows = _rows_present(name, x, present, text.shape[1])
        x = torch.where(
            rows[:, None], x.float().to(text.device), torch.zeros((), device=text.device)
        )
        probs = torch.softmax(x @ text.T / temperature, dim=1)
        contribution = torch.where(rows[:, None], probs, torch.zeros_like(probs))
        total = contribution if total is None else total + contribution
        count = rows.long() if count is None else count + rows.long()
    labeled = count > 0
    probs = total / count.clamp(min=1)[:, None].to(total.dtype)
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    probs = torch.where(labeled[:, None], probs, uniform)
    return _from_probs(probs, labeled, probs.max(dim=1).values, "zero_shot")


def _rows_present(name: str, x: Tensor, present: Mapping[str, Tensor], dim: int) -> Tensor:
    if x.dim() != 2 or x.shape[1] != dim:
        raise UserInputError(
            f"modality {name!r}: embeddings of shape {tuple(x.shape)} do not match the class "
            f"text embedding dim {dim}"
        )
    rows = present.get(name)
    if rows is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if tuple(rows.shape) != (x.shape[0],):
        raise UserInputError(
            f"modality {name!r}: present mask shape {tuple(rows.shape)} != ({x.shape[0]},)"
        )
    return rows.to(torch.bool)


def _from_probs(probs: Tensor, labeled: Tensor, confidence: Tensor, method: str) -> PseudoLabels:
    labels = torch.where(
        labeled, probs.argmax(dim=1), torch.full_like(labeled, NO_LABEL, dtype=torch.long)
    )
    confidence = torch.where(labeled, confidence.clamp(0.0, 1.0), torch.zeros_like(confidence))
    return PseudoLabels(labels=labels, confidence=confidence, method=method, probs=probs)


def class_prompt_embeddings(
    encode_text: Callable[[list[str]], Tensor], class_names: list[str], templates: list[str]
) -> Tensor:
    """Class embeddings ``(C, D)`` from prompt ensembling.

    Each template (e.g. ``"a photo of the digit {}"``) is filled with every class name; the
    normalised prompt embeddings are averaged over templates and re-normalised (CLIP-style).
    """
    if not class_names:
        raise UserInputError("class_prompt_embeddings needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise UserInputError("templates must be a non-empty list of strings containing '{}'")
    prompts = [t.format(name) for t in templates for name in class_names]
    emb = encode_text(prompts)
    if emb.dim() != 2 or emb.shape[0] != len(prompts):
        raise UserInputError(
            f"encode_text returned shape {tuple(emb.shape)} for {len(prompts)} prompts; "
            "expected (num_prompts, D)"
        )
    emb = F.normalize(emb.float(), dim=1).reshape(len(templates), len(class_names), -1)
    return F.normalize(emb.mean(dim=0), dim=1)


# --------------------------------------------------------------------------------------------
# kNN label propagation (Iscen et al., CVPR 2019)
# --------------------------------------------------------------------------------------------


def knn_propagate(
    unlabeled: Tensor,
    labeled: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int = 10,
    alpha: float = 0.99,
    iterations: int = 20,
) -> PseudoLabels:
    """Propagate ``labels`` from ``labeled`` rows to ``unlabeled`` rows over a kNN graph.

    Builds a kNN graph (FAISS inner product on L2-normalised features) over all rows, with
    affinities ``max(s, 0) ** 3``, symmetrises and normalises it to ``S = D^-1/2 W D^-1/2``, then
    iterates ``F <- alpha S F + (1 - alpha) Y``. ``Y`` gives each labeled row ``1 / n_c`` for its
    class, so classes with more labels do not dominate. Confidence is ``1 - H(p) / log C`` of the
    row-normalised scores ``p``.
    """
    _check_propagation_args(unlabeled, labeled, labels, num_classes, k, alpha, iterations)
    feats = F.normalize(torch.cat([labeled, unlabeled]).float(), dim=1).cpu().numpy()
    n_lab, total = labeled.shape[0], feats.shape[0]
    neighbours, sims = _knn(feats, min(k, total - 1))
    seeds = _seed_matrix(labels.cpu(), n_lab, total, num_classes)
    scores = _propagate(neighbours, sims, seeds, alpha, iterations)[n_lab:]
    scores = torch.from_numpy(np.clip(scores, 0.0, None)).float().to(unlabeled.device)
    mass = scores.sum(dim=1, keepdim=True)
    reached = mass.squeeze(1) > 0
    uniform = torch.full_like(scores, 1.0 / num_classes)
    probs = torch.where(reached[:, None], scores / mass.clamp(min=1e-12), uniform)
    return _from_probs(probs, reached, _entropy_confidence(probs), "knn_propagate")


def _check_propagation_args(
    unlabeled: Tensor,
    labeled: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int,
    alpha: float,
    iterations: int,
) -> None:
    if unlabeled.dim() != 2 or labeled.dim() != 2 or unlabeled.shape[1] != labeled.shape[1]:
        raise UserInputError(
            f"knn_propagate: need (N, D) and (L, D) features, got {tuple(unlabeled.shape)} "
            f"and {tuple(labeled.shape)}"
        )
    if labeled.shape[0] < 1 or tuple(labels.shape) != (labeled.shape[0],):
        raise UserInputError("knn_propagate: need at least one labeled row and one label per row")
    if num_classes < 1 or labels.min() < 0 or labels.max() >= num_classes:
        raise UserInputError(f"knn_propagate: labels must lie in [0, {num_classes})")
    if k < 1 or not 0.0 < alpha < 1.0 or iterations < 1:
        raise UserInputError(
            f"knn_propagate: need k >= 1, 0 < alpha < 1, iterations >= 1 "
            f"(got k={k}, alpha={alpha}, iterations={iterations})"
        )


def _knn(feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and similarities of each row's ``k`` nearest other rows, shape (N, k)."""
    import faiss  # deferred: only label propagation needs it

    n = feats.shape[0]
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    index = faiss.IndexFlatIP(feats.shape[1])
    index.add(np.ascontiguousarray(feats, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(feats, dtype=np.float32), k + 1)
    # Drop each row's self-match; duplicates can push it out of first place or off the list.
    keep = ids != np.arange(n)[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return ids[keep].reshape(n, k), sims[keep].reshape(n, k)


def _seed_matrix(labels: Tensor, n_lab: int, total: int, num_classes: int) -> np.ndarray:
    seeds = np.zeros((total, num_classes), dtype=np.float64)
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    lab = labels.numpy()
    seeds[np.arange(n_lab), lab] = 1.0 / counts[lab]
    return seeds


def _propagate(
    neighbours: np.ndarray, sims: np.ndarray, seeds: np.ndarray, alpha: float, iterations: int
) -> np.ndarray:
    total, k = neighbours.shape
    rows = np.repeat(np.arange(total), k)
    weights = np.clip(sims.reshape(-1).astype(np.float64), 0.0, None) ** _GAMMA
    valid = neighbours.reshape(-1) >= 0  # FAISS pads with -1 when it finds fewer than k
    rows, cols, weights = rows[valid], neighbours.reshape(-1)[valid], weights[valid]
    affinity = _sparse_normalised(rows, cols, weights, total)
    scores = seeds.copy()
    for _ in range(iterations):
        scores = alpha * (affinity @ scores) + (1.0 - alpha) * seeds
    return np.asarray(scores)


def _sparse_normalised(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n: int) -> Any:
    """``D^-1/2 (A + A^T) D^-1/2`` as a scipy sparse matrix, or a torch sparse fallback."""
    try:
        import scipy.sparse as sp
    except ImportError:
        return _TorchSparse(rows, cols, weights, n)
    adj = sp.csr_matrix((weights, (rows, cols)), shape=(n, n))
    sym = adj + adj.T
    degree = np.asarray(sym.sum(axis=1)).ravel()
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-300)), 0.0)
    scale = sp.diags(inv_sqrt)
    return (scale @ sym @ scale).tocsr()


class _TorchSparse:
    """Minimal ``matrix @ dense`` stand-in for scipy, built with torch sparse COO."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n: int) -> None:
        idx = torch.from_numpy(
            np.stack([np.concatenate([rows, cols]), np.concatenate([cols, rows])])
        )
        vals = torch.from_numpy(np.concatenate([weights, weights]))
        sym = torch.sparse_coo_tensor(idx, vals, (n, n), check_invariants=True).coalesce()
        degree = torch.sparse.sum(sym, dim=1).to_dense()
        inv_sqrt = torch.where(
            degree > 0, degree.clamp(min=1e-300).rsqrt(), torch.zeros_like(degree)
        )
        i, v = sym.indices(), sym.values()
        self.matrix = torch.sparse_coo_tensor(
            i, v * inv_sqrt[i[0]] * inv_sqrt[i[1]], (n, n), check_invariants=True
        )

    def __matmul__(self, dense: np.ndarray) -> np.ndarray:
        return torch.sparse.mm(self.matrix, torch.from_numpy(np.asarray(dense))).numpy()


def _entropy_confidence(probs: Tensor) -> Tensor:
    if probs.shape[1] == 1:
        return torch.ones(probs.shape[0], device=probs.device)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
    return 1.0 - entropy / math.log(probs.shape[1])


# --------------------------------------------------------------------------------------------
# Self-training confidence thresholds (FixMatch / FlexMatch / FreeMatch)
# --------------------------------------------------------------------------------------------


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

    def update(self, probs: Tensor) -> None:  # noqa: B027 - optional hook, stateless by default
        """Accumulate statistics from a batch of weak-view probabilities ``(B, C)``."""


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

    def update(self, probs: Tensor) -> None:
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


# --------------------------------------------------------------------------------------------
# Selection and reporting
# --------------------------------------------------------------------------------------------


def balance_classes(
    pl: PseudoLabels,
    num_classes: int,
    max_per_class: int | None = None,
    ratio: float | None = 1.0,
    eligible: Tensor | None = None,
) -> Tensor:
    """Select the most confident rows of each class so no class dominates; returns ``(N,)`` bool.

    Candidates are rows with a label (and ``eligible``, e.g. a threshold mask, when given). Each
    class keeps at most ``min(max_per_class, floor(ratio * n_min))`` rows, where ``n_min`` is the
    candidate count of the smallest non-empty class; a ``None`` limit is ignored. Ties in
    confidence go to the lower row index.
    """
    if max_per_class is not None and max_per_class < 0:
        raise UserInputError(f"max_per_class must be >= 0, got {max_per_class}")
    if ratio is not None and ratio <= 0:
        raise UserInputError(f"ratio must be > 0, got {ratio}")
    labels, conf = pl.labels, pl.confidence
    candidates = (labels >= 0) & (labels < num_classes)
    if eligible is not None:
        candidates &= eligible.to(torch.bool)
    counts = torch.bincount(labels[candidates], minlength=num_classes)
    cap = _class_cap(counts, max_per_class, ratio)
    selected = torch.zeros_like(candidates)
    for c in range(num_classes):
        rows = torch.nonzero(candidates & (labels == c)).squeeze(1)
        if rows.numel() == 0 or cap == 0:
            continue
        order = torch.argsort(conf[rows], descending=True, stable=True)
        selected[rows[order[:cap]]] = True
    return selected


def _class_cap(counts: Tensor, max_per_class: int | None, ratio: float | None) -> int:
    nonempty = counts[counts > 0]
    cap = int(counts.max()) if nonempty.numel() else 0
    if ratio is not None and nonempty.numel():
        cap = min(cap, max(1, math.floor(ratio * int(nonempty.min()))))
    if max_per_class is not None:
        cap = min(cap, max_per_class)
    return cap


def pseudo_label_report(
    pl: PseudoLabels,
    selected: Tensor,
    true_labels: Tensor | None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Summarise a selection of pseudo-labels (plain Python values, JSON-ready).

    Keys: ``num_rows``, ``num_selected``, ``coverage`` (fraction selected), ``accuracy`` of selected
    rows against ``true_labels`` (rows with a negative true label are unknown and skipped; ``None``
    when no selected row has a known true label), ``mean_confidence`` of selected rows (``None``
    when empty), ``per_class_counts`` (selected rows per pseudo-class).
    """
    selected = selected.to(torch.bool)
    if tuple(selected.shape) != tuple(pl.labels.shape):
        raise UserInputError(
            f"selected mask shape {tuple(selected.shape)} != labels {tuple(pl.labels.shape)}"
        )
    n, chosen = pl.labels.shape[0], selected & (pl.labels >= 0)
    if num_classes is None:
        num_classes = _infer_num_classes(pl)
    counts = torch.bincount(pl.labels[chosen], minlength=num_classes)
    return {
        "method": pl.method,
        "num_rows": n,
        "num_selected": int(chosen.sum()),
        "coverage": float(chosen.sum()) / n if n else 0.0,
        "accuracy": _selected_accuracy(pl.labels, chosen, true_labels),
        "mean_confidence": float(pl.confidence[chosen].mean()) if chosen.any() else None,
        "per_class_counts": counts.tolist(),
    }


def _infer_num_classes(pl: PseudoLabels) -> int:
    if pl.probs is not None:
        return int(pl.probs.shape[1])
    return int(pl.labels.max()) + 1 if pl.labels.numel() else 0


def _selected_accuracy(labels: Tensor, chosen: Tensor, true_labels: Tensor | None) -> float | None:
    if true_labels is None:
        return None
    true_labels = true_labels.to(labels.device)
    known = chosen & (true_labels >= 0)
    if not known.any():
        return None
    return float((labels[known] == true_labels[known]).float().mean())


__all__ = [
    "NO_LABEL",
    "ConfidenceThreshold",
    "FixedThreshold",
    "FlexMatchThreshold",
    "FreeMatchThreshold",
    "PseudoLabels",
    "balance_classes",
    "class_prompt_embeddings",
    "knn_propagate",
    "pseudo_label_report",
    "self_training_loss",
    "zero_shot",
]
