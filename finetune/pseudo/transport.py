"""Class-balanced transductive labelling on cached embeddings: soft k-means whose assignments are
an optimal-transport plan with a fixed class marginal (PT-MAP, Hu et al. 2021, "Leveraging the
feature distribution in transfer-based few-shot learning"), used by the ``balanced_kmeans``
labeler.

Every step is label-free apart from the labeled rows (the seeds), deterministic (nothing is
drawn) and vectorised in torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.finetune.pseudo.labels import PseudoLabels, check_seed_rows, from_probs

MARGINALS = ("uniform", "labels", "none")
"""The class marginals :func:`balanced_kmeans` knows (``none``: no transport, an ablation)."""


def sinkhorn(logits: Tensor, class_mass: Tensor, iterations: int = 100) -> Tensor:
    """The transport plan ``P`` (``(N, C)``, rows summing to 1) closest to ``softmax(logits)``
    whose column sums are ``class_mass`` (Sinkhorn-Knopp in the log domain, ``iterations``
    alternating column / row normalisations; ``class_mass`` must sum to ``N``)."""
    log_p = logits.double()
    log_col = class_mass.double().clamp(min=1e-300).log()
    for _ in range(iterations):
        log_p = log_p - (torch.logsumexp(log_p, dim=0) - log_col)[None, :]
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
    return log_p.exp().float()


def transform_features(
    rows: Tensor, power: float = 0.5, dims: int = 64, whiten: bool = True
) -> Tensor:
    """PT-MAP's preprocessing, label-free: a signed power transform ``sign(x) |x| ** power``
    (``1`` = off), L2 norm, centring on the mean of ``rows``, then optionally PCA to ``dims``
    components (``0`` = keep all) fitted on ``rows``, whitened if ``whiten``, and a final L2
    norm. ``rows`` are every row being labelled (labeled + unlabeled)."""
    x = rows.double()
    if power != 1.0:
        x = x.sign() * x.abs().pow(power)
    x = F.normalize(x, dim=1)
    x = x - x.mean(dim=0, keepdim=True)
    if dims > 0:
        keep = min(dims, x.shape[1], max(1, x.shape[0] - 1))
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        x = x @ vh[:keep].T
        if whiten:
            scale = s[:keep] / math.sqrt(max(1, x.shape[0] - 1))
            x = x / scale.clamp(min=1e-12 * float(scale.max().clamp(min=1e-300)))[None, :]
    return F.normalize(x, dim=1).float()


def balanced_kmeans(
    unlabeled: Tensor,
    labeled: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    power: float = 0.5,
    dims: int = 64,
    whiten: bool = True,
    sharpness: float = 100.0,
    step: float = 0.2,
    iterations: int = 30,
    marginal: str = "uniform",
    sinkhorn_iterations: int = 100,
) -> PseudoLabels:
    """Soft pseudo-labels of ``unlabeled`` from class prototypes refined on the whole pool.

    Rows go through :func:`transform_features` (fitted on labeled + unlabeled rows); the
    prototypes start as the labeled rows' class means. Each of ``iterations`` rounds assigns the
    unlabeled rows by :func:`sinkhorn` on ``-sharpness * ||x - prototype||^2`` with column sums
    ``N_u / C`` (``marginal="uniform"``) or ``N_u`` times the labeled rows' class shares
    (``marginal="labels"``), then moves each prototype ``step`` of the way to the mean of its
    labeled rows (weight 1) and assigned rows (weight = assignment). ``probs`` are the final
    plan's rows, confidence their largest entry (for ranking; not a calibrated probability).
    Every class needs at least one labeled row; an unlabeled row with no modality present (all
    zeros) gets :data:`NO_LABEL` and takes no part.
    """
    check_seed_rows("balanced_kmeans", unlabeled, labeled, labels, num_classes)
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if bool((counts == 0).any()):  # labels lie in [0, num_classes): check_seed_rows
        missing = (counts == 0).nonzero().flatten().tolist()
        raise UserInputError(
            f"balanced_kmeans needs at least one labeled row in each of the {num_classes} "
            f"classes; classes {missing} have none (add labels, or use pseudo_label=propagation)"
        )
    if marginal not in MARGINALS:
        raise UserInputError(
            f"balanced_kmeans: marginal must be one of {MARGINALS}, got {marginal!r}"
        )
    # a row with no modality present (an all-zero fused embedding) cannot be placed: NO_LABEL
    reached = unlabeled.detach().abs().sum(dim=1).cpu() > 0
    probs = torch.full((unlabeled.shape[0], num_classes), 1.0 / num_classes)
    n_lab, n_unl = labeled.shape[0], int(reached.sum())
    if n_unl == 0:
        return _labels(probs, reached, unlabeled.device)
    rows = torch.cat([labeled.cpu(), unlabeled.cpu()[reached]])
    feats = transform_features(rows, power, dims, whiten)
    lab, unl = feats[:n_lab], feats[n_lab:]
    y = labels.cpu()
    mass: Tensor | None = None  # "none": plain soft k-means (no transport), the ablation
    if marginal == "uniform":
        mass = torch.full((num_classes,), n_unl / num_classes)
    elif marginal == "labels":
        mass = counts.double() / counts.sum() * n_unl
    seeds = F.one_hot(y, num_classes).float()
    protos = seeds.T @ lab / counts[:, None].float()
    plan = _assign(unl, protos, sharpness, mass, sinkhorn_iterations)
    for _ in range(iterations):
        weights = torch.cat([seeds, plan])
        target = weights.T @ feats / weights.sum(dim=0)[:, None].clamp(min=1e-12)
        protos = protos + step * (target - protos)
        plan = _assign(unl, protos, sharpness, mass, sinkhorn_iterations)
    probs[reached] = plan
    return _labels(probs, reached, unlabeled.device)


def _labels(probs: Tensor, reached: Tensor, device: torch.device) -> PseudoLabels:
    probs, reached = probs.to(device), reached.to(device)
    return from_probs(probs, reached, probs.max(dim=1).values, "balanced_kmeans")


def _assign(
    rows: Tensor, protos: Tensor, sharpness: float, mass: Tensor | None, iterations: int
) -> Tensor:
    if mass is None:
        return torch.softmax(-sharpness * torch.cdist(rows, protos).pow(2), dim=1)
    return sinkhorn(-sharpness * torch.cdist(rows, protos).pow(2), mass, iterations)


__all__ = ["MARGINALS", "balanced_kmeans", "sinkhorn", "transform_features"]
