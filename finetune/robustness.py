"""Robustness of a classifier on raw inputs: noise curves and L-inf attacks on one modality.

Both run the full model (tower + fusion head) on decoded inputs, perturbing one modality while
the others stay clean. Noise comes from the modality's own
:meth:`~modalign.data.modality.ModalitySpec.perturb` (units are the spec's: built-in images in
the tower's normalised input space, audio relative to each clip's RMS, level 1.0 = 0 dB SNR);
attack epsilons are in the modality's input units. Any source (manifest or shards) works.

The attacks (:func:`fgsm`, :func:`pgd`) take any differentiable ``forward(x) -> logits``
callable, so they work on raw inputs and on embeddings alike. They never touch model parameters'
``.grad`` and do not change train/eval mode: put the model in eval mode first if dropout should
be off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modalign.core.errors import UserInputError
from modalign.data.batch import Batch
from modalign.data.sources import open_eval_source
from modalign.finetune.pipeline import Classifier
from modalign.finetune.pseudo.algorithms import NO_LABEL


def _batches(
    clf: Classifier, src: str, batch_size: int, max_items: int | None
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Labeled rows of any source (manifest or shards), in order, as batches + class indices."""
    specs = {m: s for m, s in clf.model.modality_specs().items() if m in clf.inputs}
    source = open_eval_source(src, specs)
    index: dict[str | None, int] = {c: i for i, c in enumerate(clf.class_names)}
    seen = 0
    for batch in source.batches(batch_size):
        if max_items is not None and seen >= max_items:
            break
        rows = [i for i, lab in enumerate(batch.labels) if lab is not None]
        if max_items is not None:
            rows = rows[: max_items - seen]
        if not rows:
            continue
        seen += len(rows)
        batch = _take(batch, torch.tensor(rows, dtype=torch.long))
        yield batch, torch.tensor([index.get(lab, NO_LABEL) for lab in batch.labels])
    if seen == 0:
        raise UserInputError(f"{src}: no labeled rows to evaluate robustness on")


def _take(batch: Batch, rows: torch.Tensor) -> Batch:
    """The rows ``rows`` of ``batch`` (tensor inputs indexed, list inputs picked)."""
    picked = rows.tolist()
    inputs = {
        m: v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in picked]
        for m, v in batch.inputs.items()
    }
    return dataclasses.replace(
        batch,
        inputs=inputs,
        present={m: p[rows] for m, p in batch.present.items()},
        ids=[batch.ids[i] for i in picked],
        labels=[batch.labels[i] for i in picked],
        index=batch.index[rows],
        bad=[],
    )


def _logits(clf: Classifier, batch: Batch, modality: str, x: Any) -> torch.Tensor:
    enc = clf.model.encoder
    emb = {
        m: enc.encode(m, x if m == modality else v)
        for m, v in batch.inputs.items()
        if m in clf.inputs
    }
    return clf.head(emb, {m: batch.present[m] for m in emb})


def _check(clf: Classifier, modality: str) -> None:
    if modality not in clf.inputs:
        raise UserInputError(
            f"{modality!r}: this classifier never had that modality; its inputs are {clf.inputs}"
        )


@torch.no_grad()
def noise_curve(
    clf: Classifier,
    src: str,
    modality: str,
    levels: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
    batch_size: int = 64,
    seed: int = 0,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Accuracy vs Gaussian noise level on ``modality`` (others clean), and the curve's area."""
    _check(clf, modality)
    correct = torch.zeros(len(levels))
    total = 0
    spec = clf.model.modality_specs()[modality]
    for batch, y in _batches(clf, src, batch_size, max_items):
        if modality not in batch.inputs:
            continue
        keep = batch.present[modality] & (y != NO_LABEL)
        for i, level in enumerate(levels):
            gen = torch.Generator().manual_seed(seed + i)
            x = spec.perturb(batch.inputs[modality], level, gen)
            pred = _logits(clf, batch, modality, x).argmax(1)
            correct[i] += (pred[keep] == y[keep]).sum()
        total += int(keep.sum())
    acc = (correct / max(total, 1)).tolist()
    return {
        "levels": list(levels),
        "accuracy": acc,
        "auc": robustness_auc(levels, acc),
        "items": total,
    }


def adversarial(
    clf: Classifier,
    src: str,
    modality: str,
    eps: Sequence[float] = (0.0, 0.01, 0.03, 0.1),
    attack: str = "fgsm",
    steps: int = 10,
    batch_size: int = 64,
    max_items: int | None = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy under FGSM or PGD (L-inf) on ``modality``'s input at each epsilon.

    Adversarial inputs are clamped to the modality's valid input range
    (:meth:`~modalign.data.modality.ModalitySpec.clamp`: pixels in [0, 1], audio full scale).
    """
    _check(clf, modality)
    if attack not in ("fgsm", "pgd"):
        raise UserInputError(f"attack {attack!r}: valid attacks are fgsm, pgd")
    clf.head.eval()
    clf.model.encoder.eval()
    correct = torch.zeros(len(eps))
    total = 0
    gen = torch.Generator().manual_seed(seed)
    clamp = clf.model.modality_specs()[modality].clamp
    for batch, y in _batches(clf, src, batch_size, max_items):
        if modality not in batch.inputs:
            continue
        keep = batch.present[modality] & (y != NO_LABEL)
        if not bool(keep.any()):
            continue
        sub = _take(batch, keep.nonzero().flatten())
        x, target = sub.inputs[modality], y[keep]

        def forward(inp: torch.Tensor, sub: Batch = sub) -> torch.Tensor:
            return _logits(clf, sub, modality, inp)

        for i, e in enumerate(eps):
            if e == 0:
                adv = x
            elif attack == "fgsm":
                adv = fgsm(forward, x, target, e, clamp=clamp)
            else:
                alpha = 2.5 * e / steps
                adv = pgd(forward, x, target, e, alpha, steps, generator=gen, clamp=clamp)
            with torch.no_grad():
                correct[i] += (forward(adv).argmax(1) == target).sum()
        total += int(keep.sum())
    return {
        "attack": attack,
        "eps": list(eps),
        "accuracy": (correct / max(total, 1)).tolist(),
        "items": total,
    }


# -- attacks and the noise-curve summary ------------------------------------------------


def robustness_auc(levels: Sequence[float], accuracies: Sequence[float]) -> float:
    """Normalised area under the accuracy-vs-noise-level curve (trapezoid rule).

    The area is divided by the level range, so a flat curve scores its accuracy and the result is
    comparable across level grids. A single point returns its accuracy.
    """
    x, y = np.asarray(levels, dtype=np.float64), np.asarray(accuracies, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise UserInputError("robustness_auc needs equally long, non-empty levels and accuracies")
    if x.size == 1:
        return float(y[0])
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span <= 0:
        raise UserInputError("robustness_auc needs at least two distinct noise levels")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / span


# ------------------------------------------------------------------------------ attacks


def _loss_grad(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy at ``x`` and its gradient w.r.t. ``x`` only."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        losses = F.cross_entropy(forward(x), y, reduction="none")
        # Sum, not mean: each row's gradient is then independent of the batch size.
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def _check_attack(x: Tensor, y: Tensor, eps: float) -> None:
    if eps < 0:
        raise UserInputError(f"attack budget eps must be >= 0, got {eps}")
    if x.shape[0] != y.shape[0]:
        raise UserInputError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")


def _identity(x: Tensor) -> Tensor:
    return x


def fgsm(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    clamp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size ``eps``.

    Returns a detached ``x_adv`` with ``|x_adv - x|_inf <= eps`` that raises the cross-entropy,
    projected by ``clamp`` onto the valid input range (e.g. ``ModalitySpec.clamp``) when given.
    """
    _check_attack(x, y, eps)
    _, grad = _loss_grad(forward, x, y)
    return (clamp or _identity)(x.detach() + eps * grad.sign()).detach()


def pgd(
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    clamp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) within the L-inf ball of radius ``eps``.

    ``steps`` signed-gradient steps of size ``alpha``, each projected back onto the ball, from a
    uniform random start when ``random_start``. Every iterate (the start included) is also
    projected by ``clamp`` onto the valid input range when given; the intersection of the ball
    and a box is a box, so clamping after the ball projection is the exact projection. Per row,
    the iterate with the highest loss seen is returned, so the attack never ends weaker than one
    of its own steps.
    """
    _check_attack(x, y, eps)
    if alpha <= 0 or steps < 1:
        raise UserInputError(
            f"pgd needs alpha > 0 and steps >= 1 (got alpha={alpha}, steps={steps})"
        )
    x = x.detach()
    adv = x.clone()
    if random_start and eps > 0:
        noise = torch.rand(x.shape, generator=generator, device=_rand_device(x, generator))
        adv = x + (2 * noise.to(device=x.device, dtype=x.dtype) - 1) * eps
    project = clamp or _identity
    adv = project(adv)
    best, best_loss = adv.clone(), torch.full((x.shape[0],), -torch.inf, device=x.device)
    for _ in range(steps):
        loss, grad = _loss_grad(forward, adv, y)
        best, best_loss = _keep_best(best, best_loss, adv, loss)
        adv = project(x + (adv + alpha * grad.sign() - x).clamp(-eps, eps))
    with torch.no_grad():
        final_loss = F.cross_entropy(forward(adv), y, reduction="none")
    best, _ = _keep_best(best, best_loss, adv, final_loss)
    return best.detach()


def _rand_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else x.device


def _keep_best(
    best: Tensor, best_loss: Tensor, cand: Tensor, loss: Tensor
) -> tuple[Tensor, Tensor]:
    better = loss > best_loss
    rows = better.view(-1, *([1] * (cand.dim() - 1)))
    return torch.where(rows, cand, best), torch.where(better, loss, best_loss)
