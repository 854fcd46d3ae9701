"""Exact large-batch contrastive gradients over micro-batches (GradCache, Gao et al. 2021)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from modalign.core.world import world
from modalign.data.dataset import Batch
from modalign.pretrain.losses import LossOutput
from modalign.pretrain.model import ContrastiveTask


def cached_accumulation_step(
    core: ContrastiveTask, micro: list[Batch], accelerator: Any
) -> LossOutput:
    """Exact large-batch gradient over K micro-batches (GradCache, Gao et al. 2021).

    1) embed every micro-batch without grad, remembering the RNG state so dropout and
    augmentation replay identically; 2) loss on all features at once -> d loss / d features;
    3) re-embed each micro-batch with grad and backpropagate those feature gradients.
    Memory stays at one micro-batch of activations. Equal to the big batch for towers without
    batch statistics; BatchNorm normalises per micro-batch (as in GradCache/open_clip), and its
    running statistics are updated once per micro-batch, not twice.
    """
    mods = core.encoder.modalities
    states, feats = [], []
    with torch.no_grad(), frozen_batchnorm_stats(core):
        for b in micro:
            states.append(rng_snapshot())
            with accelerator.autocast():
                feats.append(core(b, features_only=True))
    cached = {m: torch.cat([f[m] for f in feats]).detach().requires_grad_(True) for m in mods}
    present = {m: torch.cat([b.present[m] for b in micro]) for m in mods}
    with accelerator.autocast():
        loss = core.loss(cached, present)
    accelerator.backward(loss.loss)
    offset = 0
    for b, state in zip(micro, states):
        n = len(b)
        rng_restore(state)
        with accelerator.autocast():
            f = core(b, features_only=True)
        grads = {m: g for m in mods if (g := cached[m].grad) is not None}  # no rows: no grad
        if grads:
            surrogate = sum(
                (f[m] * g[offset : offset + n].to(f[m].dtype)).sum() for m, g in grads.items()
            )
            cast(torch.Tensor, surrogate).backward()  # a sum of >= 1 tensors is a tensor
        offset += n
    average_gradients(core)
    return loss


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics afterwards (the no-grad pass must not count)."""
    saved = [
        (m, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


def rng_snapshot() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The torch CPU (and CUDA) generator states."""
    return torch.get_rng_state(), (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    )


def rng_restore(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def average_gradients(model: nn.Module) -> None:
    """DDP hooks are bypassed in the cached path; average gradients across processes by hand.

    Which parameters have gradients is the same on every process (a pair is skipped only when
    no process has rows for it), so every process issues the same all-reduces.
    """
    _, size = world()
    if size == 1:
        return
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= size
