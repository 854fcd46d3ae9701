"""Pseudo-labeling algorithms: zero-shot and kNN label propagation.

Every labeler returns :class:`PseudoLabels`. A row that cannot be labeled at all (no modality
present, or cut off from every labeled row in the kNN graph) gets label :data:`NO_LABEL` (-1) and
confidence 0, so no threshold or selection can pick it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.finetune.pseudo.labels import NO_LABEL, PseudoLabels, check_seed_rows, from_probs
from modalign.finetune.pseudo.selection import balance_classes, pseudo_label_report
from modalign.finetune.pseudo.thresholds import (
    ConfidenceThreshold,
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    self_training_loss,
)

# Exponent on kNN similarities (Iscen et al. 2019): sharpens affinities toward close neighbours.
_GAMMA = 3.0


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
    total: Tensor | None = None
    count: Tensor | None = None
    for name, x in embeddings.items():
        rows = _rows_present(name, x, present, text.shape[1])
        x = torch.where(
            rows[:, None], x.float().to(text.device), torch.zeros((), device=text.device)
        )
        probs = torch.softmax(x @ text.T / temperature, dim=1)
        contribution = torch.where(rows[:, None], probs, torch.zeros_like(probs))
        total = contribution if total is None else total + contribution
        count = rows.long() if count is None else count + rows.long()
    if total is None or count is None:  # unreachable: embeddings is not empty (checked above)
        raise UserInputError("zero_shot needs at least one modality's embeddings")
    labeled = count > 0
    probs = total / count.clamp(min=1)[:, None].to(total.dtype)
    uniform = torch.full_like(probs, 1.0 / probs.shape[1])
    probs = torch.where(labeled[:, None], probs, uniform)
    return from_probs(probs, labeled, probs.max(dim=1).values, "zero_shot")


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


DEFAULT_PROMPTS: tuple[str, ...] = ("{}",)
"""Zero-shot default: the class name itself (no domain-specific wording)."""

GENERIC_PROMPTS: dict[str, tuple[str, ...]] = {
    "image": ("{}", "a photo of a {}"),
    "audio": ("{}", "the sound of a {}"),
    "text": ("{}",),
}
"""Generic templates per input modality; configs override them per modality."""


def prompts_for(
    modalities: Sequence[str], per_modality: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """Prompt templates for a zero-shot pool of ``modalities``: the configured ones per modality
    (else :data:`GENERIC_PROMPTS`, else :data:`DEFAULT_PROMPTS`), merged in order, unique."""
    table = {**GENERIC_PROMPTS, **{k: tuple(v) for k, v in (per_modality or {}).items()}}
    out: list[str] = []
    for m in modalities:
        out.extend(table.get(m, DEFAULT_PROMPTS))
    out = list(dict.fromkeys(out or DEFAULT_PROMPTS))
    bad = [p for p in out if "{}" not in p]
    if bad:
        raise UserInputError(f"zero-shot prompts {bad} have no '{{}}' for the class name")
    return out


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
    propagated = _propagate(neighbours, sims, seeds, alpha, iterations)[n_lab:]
    scores = torch.from_numpy(np.clip(propagated, 0.0, None)).float().to(unlabeled.device)
    mass = scores.sum(dim=1, keepdim=True)
    reached = mass.squeeze(1) > 0
    uniform = torch.full_like(scores, 1.0 / num_classes)
    probs = torch.where(reached[:, None], scores / mass.clamp(min=1e-12), uniform)
    return from_probs(probs, reached, _entropy_confidence(probs), "knn_propagate")


def _check_propagation_args(
    unlabeled: Tensor,
    labeled: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int,
    alpha: float,
    iterations: int,
) -> None:
    check_seed_rows("knn_propagate", unlabeled, labeled, labels, num_classes)
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
    affinity = _affinity(neighbours, sims, neighbours.shape[0])
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


# --------------------------------------------------------------------------------------------
# Label propagation (Zhou et al., NIPS 2004) with class-mass normalisation (Zhu et al. 2003)
# --------------------------------------------------------------------------------------------


def label_propagation(
    unlabeled: Tensor,
    labeled: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int = 10,
    alpha: float = 0.99,
    iterations: int = 50,
    class_mass: bool = True,
    center: bool = True,
) -> PseudoLabels:
    """Zhou et al.'s closed form ``F = (I - alpha S)^-1 Y`` on a kNN graph, then class-mass
    normalisation; labels every unlabeled row connected to a labeled one.

    The graph is the one :func:`knn_propagate` builds (FAISS inner product on L2-normalised rows,
    affinities ``max(s, 0) ** 3``, symmetric, ``S = D^-1/2 W D^-1/2``). The linear system is
    solved by conjugate gradient (``iterations`` steps; ``I - alpha S`` is symmetric positive
    definite), so even ``alpha`` near 1 converges, unlike ``iterations`` rounds of the
    fixed-point map. Class-mass normalisation rescales each class column so the classes' total
    scores over the unlabeled rows follow the labeled rows' class proportions, which stops one
    dense class from swallowing the pool. ``probs`` are the row-normalised scores; confidence is
    the largest of them (rank rows with it; it is not a calibrated probability). A row cut off
    from every labeled row gets :data:`NO_LABEL`. ``center`` subtracts the mean of all rows
    before L2-normalising (SimpleShot's CL2N), so a direction every embedding shares does not
    make all rows look alike.
    """
    _check_propagation_args(unlabeled, labeled, labels, num_classes, k, alpha, iterations)
    rows = torch.cat([labeled, unlabeled]).float()
    if center:
        rows = F.normalize(rows, dim=1)
        rows = rows - rows.mean(dim=0, keepdim=True)
    feats = F.normalize(rows, dim=1).cpu().numpy()
    n_lab, total = labeled.shape[0], feats.shape[0]
    neighbours, sims = _knn(feats, min(k, total - 1))
    seeds = _seed_matrix(labels.cpu(), n_lab, total, num_classes)
    affinity = _affinity(neighbours, sims, total)
    scores = _conjugate_gradient(affinity, seeds, alpha, iterations)[n_lab:]
    scores = np.clip(scores, 0.0, None)
    if class_mass:
        prior = np.bincount(labels.cpu().numpy(), minlength=num_classes).astype(np.float64)
        mass = scores.sum(axis=0)
        scale = np.where(mass > 0, prior / np.maximum(mass, 1e-300), 0.0)
        scores = scores * scale[None, :]
    out = torch.from_numpy(scores).float().to(unlabeled.device)
    row_mass = out.sum(dim=1, keepdim=True)
    reached = row_mass.squeeze(1) > 0
    uniform = torch.full_like(out, 1.0 / num_classes)
    probs = torch.where(reached[:, None], out / row_mass.clamp(min=1e-30), uniform)
    return from_probs(probs, reached, probs.max(dim=1).values, "label_propagation")


def _affinity(neighbours: np.ndarray, sims: np.ndarray, total: int) -> Any:
    """``S = D^-1/2 W D^-1/2`` of the symmetrised kNN graph, ``W = max(s, 0) ** gamma``."""
    k = neighbours.shape[1]
    rows = np.repeat(np.arange(total), k)
    weights = np.clip(sims.reshape(-1).astype(np.float64), 0.0, None) ** _GAMMA
    valid = neighbours.reshape(-1) >= 0  # FAISS pads with -1 when it finds fewer than k
    return _sparse_normalised(rows[valid], neighbours.reshape(-1)[valid], weights[valid], total)


def _conjugate_gradient(
    affinity: Any, rhs: np.ndarray, alpha: float, iterations: int
) -> np.ndarray:
    """Solve ``(I - alpha S) X = rhs`` column-wise by conjugate gradient (``iterations`` steps)."""

    def apply(v: np.ndarray) -> np.ndarray:
        return v - alpha * np.asarray(affinity @ v)

    x = np.zeros_like(rhs)
    r = rhs.copy()
    p = r.copy()
    rs = (r * r).sum(axis=0)
    for _ in range(iterations):
        if float(rs.max(initial=0.0)) < 1e-20:
            break
        ap = apply(p)
        denom = (p * ap).sum(axis=0)
        step = np.where(denom > 0, rs / np.maximum(denom, 1e-300), 0.0)
        x += step[None, :] * p
        r -= step[None, :] * ap
        rs_new = (r * r).sum(axis=0)
        beta = np.where(rs > 0, rs_new / np.maximum(rs, 1e-300), 0.0)
        p = r + beta[None, :] * p
        rs = rs_new
    return x


def _entropy_confidence(probs: Tensor) -> Tensor:
    if probs.shape[1] == 1:
        return torch.ones(probs.shape[0], device=probs.device)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(dim=1)
    return 1.0 - entropy / math.log(probs.shape[1])


__all__ = [
    "DEFAULT_PROMPTS",
    "GENERIC_PROMPTS",
    "NO_LABEL",
    "ConfidenceThreshold",
    "FixedThreshold",
    "FlexMatchThreshold",
    "FreeMatchThreshold",
    "PseudoLabels",
    "balance_classes",
    "class_prompt_embeddings",
    "knn_propagate",
    "label_propagation",
    "prompts_for",
    "pseudo_label_report",
    "self_training_loss",
    "zero_shot",
]
