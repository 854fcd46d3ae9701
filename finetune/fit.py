"""The one head-training loop (:func:`fit_head`) and its RNG discipline.

Every caller (cached-embedding training :func:`train_head`, FixMatch self-training, end-to-end
training with unlocked towers) describes an epoch as an iterable of batches and a loss function;
``fit_head`` owns the optimizer steps, the schedule, train/eval modes and early stopping.

Randomness: callers draw batch order and modality-dropout masks from the ``torch.Generator`` that
:func:`local_rng` yields. Weight initialisation and ``nn.Dropout`` can only use torch's default
generator, so ``local_rng`` also forks it (seeded with the same seed) and restores it on exit:
results are deterministic for a given seed and the process RNG state is left as it was found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.head_base import FusionHead, modality_dropout

B = TypeVar("B")


@contextmanager
def local_rng(seed: int, device: torch.device | str | None = None) -> Iterator[torch.Generator]:
    """A seeded CPU generator; the default generators are forked, seeded, and restored on exit.

    ``device`` (a CUDA device) also forks and seeds that device's default generator, for dropout
    inside towers that run there. Only CPU (and that device) state is touched, never lazily queued
    CUDA seeding, so a process without CUDA initialised stays that way.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's CPU (and initialised CUDA), NumPy's and Python's global RNG states on exit.

    Public entry points wrap their work in it, so lower layers that still draw from the global
    generators (weight init before loading, ``DataLoader`` base seeds) cannot leak into the
    caller's process (issue 15). Nothing is seeded here.
    """
    import random

    import numpy as np

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def fit_head(
    head: FusionHead,
    epoch_batches: Callable[[int], Iterable[B]],
    loss_fn: Callable[[FusionHead, B], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    *,
    scheduler: Any = None,
    modules: Sequence[nn.Module] = (),
    score: Callable[[FusionHead], float] | None = None,
) -> FusionHead:
    """Train ``head`` for ``epochs`` epochs; returns it in eval mode.

    ``epoch_batches(epoch)`` yields the batches of one epoch; ``loss_fn(head, batch)`` returns the
    loss to minimise (it may also update towers in ``modules``, which are put in train mode with
    the head). ``scheduler.step()`` runs after every optimizer step. With ``score`` (higher is
    better, e.g. validation accuracy), it is called after each epoch and the best epoch's head
    weights are kept (ties keep the earlier epoch).
    """
    best, best_state = float("-inf"), None
    for epoch in range(epochs):
        for m in (head, *modules):
            m.train()
        for batch in epoch_batches(epoch):
            loss = loss_fn(head, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if score is not None:
            value = score(head)
            if value > best:
                best, best_state = value, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    for m in (head, *modules):
        m.eval()
    return head


def epochs_for(rows: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """``epochs``, raised so that ``rows`` in batches of ``batch_size`` get at least
    ``min_steps`` optimizer steps (``0`` = ``epochs`` alone)."""
    steps_per_epoch = max(1, (rows + batch_size - 1) // batch_size)
    return max(epochs, -(-min_steps // steps_per_epoch))


def cosine_adamw(
    params: Iterable[Any], lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a cosine schedule over ``total_steps`` (the fine-tuning default)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)


def train_cached(
    head: FusionHead,
    train: EmbeddedSet,
    weights: torch.Tensor,
    gen: torch.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    dropout: float,
    score: Callable[[FusionHead], float] | None = None,
    min_steps: int = 0,
) -> FusionHead:
    """Weighted cross-entropy on cached embeddings, shuffled with ``gen``, modality dropout.

    Trains for ``epochs`` epochs, or more when that would be fewer than ``min_steps`` optimizer
    steps (a few labels make one batch per epoch: :func:`epochs_for`)."""
    n = len(train)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    epochs = epochs_for(n, batch_size, epochs, min_steps)
    opt, sched = cosine_adamw(head.parameters(), lr, weight_decay, epochs * steps_per_epoch)

    def batches(epoch: int) -> Iterable[torch.Tensor]:
        return torch.randperm(n, generator=gen).split(batch_size)

    def loss_fn(h: FusionHead, idx: torch.Tensor) -> torch.Tensor:
        present = modality_dropout({m: p[idx] for m, p in train.present.items()}, dropout, gen)
        logits = h({m: v[idx] for m, v in train.x.items()}, present)
        ce = F.cross_entropy(logits, train.y[idx], reduction="none")
        return (ce * weights[idx]).sum() / weights[idx].sum()

    return fit_head(head, batches, loss_fn, opt, epochs, scheduler=sched, score=score)


__all__ = ["cosine_adamw", "epochs_for", "fit_head", "local_rng", "preserved_rng", "train_cached"]
