"""Per-item augmentation keys: randomness drawn on the model side, keyed on (seed, epoch, item).

Augmentations in data workers draw from the item's own generator (seeded by (seed, epoch,
item) in :class:`~modalign.data.dataset.PairedDataset` and the shard sources). Augmentations
that run in the model on a batch (SpecAugment on the log-mel, or a plugin tower's own) would
otherwise draw from the process's RNG, so a batch split over N processes would be masked
differently from the same batch in one process. Each :class:`~modalign.data.batch.Sample`
therefore carries ``key``, a 63-bit integer derived from its item generator, and each
:class:`~modalign.data.batch.Batch` carries them as ``keys``. The layer that runs the model
sets them around the forward pass::

    with item_keys(batch.keys):
        features = encoder(inputs)

and a model-side augmentation draws row ``i``'s randomness from ``item_generators()[i]``. With
the keys set, N processes x B rows give exactly what 1 process x N*B rows give, and a resumed
run draws what the uninterrupted run drew. Without them (a caller that sets none)
:func:`current_item_keys` is None and the augmentation uses the process RNG, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import numpy as np
import torch

KEY_BITS = 63

_KEYS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "modalign_item_keys", default=None
)


def item_key(rng: np.random.Generator) -> int:
    """The item's augmentation key, from a child of its generator (``rng``'s own stream, which
    the decoders draw from, is left untouched)."""
    child = rng.spawn(1)[0]
    return int(child.integers(0, 2**KEY_BITS - 1))


@contextlib.contextmanager
def item_keys(keys: torch.Tensor | None) -> Iterator[None]:
    """Make ``keys`` (one int64 per batch row) the current items' keys inside the block."""
    token = _KEYS.set(None if keys is None else torch.as_tensor(keys, dtype=torch.long).cpu())
    try:
        yield
    finally:
        _KEYS.reset(token)


def current_item_keys() -> torch.Tensor | None:
    """The keys set by the innermost :func:`item_keys` block, or None."""
    return _KEYS.get()


def item_generators(keys: torch.Tensor, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per row, seeded by (key, ``salt``); ``salt`` tells augmentations apart
    so two of them on one row draw independent values."""
    mask = 2**KEY_BITS - 1
    return [torch.Generator().manual_seed((int(k) * 1_000_003 + salt) & mask) for k in keys]
