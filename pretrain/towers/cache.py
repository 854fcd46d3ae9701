"""Frozen-output caching for tensor-input trunks (a frozen pretrained image/audio tower).

A frozen trunk in eval mode is a pure function of its input, so :class:`CachedTrunk` keys each
row by a digest of its bytes (plus dtype and shape) and runs the trunk only on rows it has not
seen: a frozen image tower costs one forward per distinct input. The cache is *correct* in every
case (an augmented input is a different key) but only *useful* when the modality's input is a
pure function of the item: no train-time augmentation on that modality (random crops, flips,
SpecAugment), i.e. eval-mode transforms for frozen towers. Text towers keep their per-string
cache (:class:`~modalign.pretrain.towers.text.SentenceTransformerTrunk`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from modalign.pretrain.towers.api import TowerConfig


def _row_key(row: torch.Tensor) -> bytes:
    data = row.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.digest()


class CachedTrunk(nn.Module):
    """``inner`` with its outputs cached per input row while it has no trainable parameter."""

    def __init__(self, inner: nn.Module, cache_items: int = 100_000) -> None:
        super().__init__()
        self.inner = inner
        self.cache_items = cache_items
        self._cache: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.inner.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen or self.inner.training or self.cache_items <= 0:
            return self.inner(x)
        keys = [_row_key(r) for r in x]
        todo = [i for i, k in enumerate(dict.fromkeys(keys)) if k not in self._cache]
        unique = list(dict.fromkeys(keys))
        if todo:
            first = {k: keys.index(k) for k in unique}
            rows = torch.stack([x[first[unique[i]]] for i in todo])
            with torch.no_grad():
                out = self.inner(rows).detach()
            if len(self._cache) + len(todo) > self.cache_items:
                self._cache.clear()
            self._cache.update((unique[i], o) for i, o in zip(todo, out))
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([self._cache[k] for k in keys])

    def _apply(self, fn, recurse=True):  # moving devices / dtypes invalidates cached tensors
        self._cache = {}
        return super()._apply(fn, recurse)


def maybe_cached(trunk: nn.Module, cfg: TowerConfig) -> nn.Module:
    """Wrap ``trunk`` in a :class:`CachedTrunk` when the config freezes it (``lock: all``)."""
    if cfg.lock == "all" and cfg.cache_items > 0:
        return CachedTrunk(trunk, cfg.cache_items)
    return trunk
