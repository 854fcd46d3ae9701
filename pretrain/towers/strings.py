"""String-input trunks (text towers) with a per-string output cache while frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class StringTrunk(nn.Module):
    """list[str] -> embeddings; while frozen, outputs are cached per string (pure function).

    A string missing from the cache is embedded *alone*: embedded among others it is padded to
    the longest of them and goes through differently shaped matrix products, which changes its
    last bits with the company it first came in. Alone, its cached output is the same whether it
    was first seen in epoch 1 of a straight run or right after a resume (empty cache) or a cache
    clear, so resuming stays bit-exact (issue 21 item 3). Each distinct string costs one small
    forward pass per process, once.
    """

    def __init__(self, cache_items: int = 200_000) -> None:
        super().__init__()
        self.cache_items = cache_items
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def locked(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not self.locked or self.cache_items <= 0:
            return self.embed(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            with torch.no_grad():  # one at a time: see the class docstring
                emb = torch.cat([self.embed([t]).detach() for t in missing])
            if len(self._cache) + len(missing) > self.cache_items:
                self._cache.clear()
            self._cache.update(zip(missing, emb))
        return torch.stack([self._cache[t] for t in texts])

    def _apply(self, fn, recurse=True):  # moving devices invalidates cached tensors
        self._cache = {}
        return super()._apply(fn, recurse)


def device_of(module: nn.Module) -> torch.device:
    """Device of ``module``'s first parameter (CPU for a parameterless module)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
