"""Issue 10 (13): model-side augmentation (SpecAugment) keyed on (seed, epoch, item).

A row must be masked the same whether it is in a batch of 16 in one process or a batch of 8
in either of two processes, and differently in another epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modalign.data.audio import SpecAugment
from modalign.data.dataset import EpochBatchSampler, PairedDataset, make_loader
from modalign.data.item_keys import current_item_keys, item_key, item_keys
from modalign.data.manifest import read_manifest

from helpers.corpus import write_tiny_corpus
from helpers.data import small_specs


def _keys(manifest: Path, rank: int, world: int, batch: int, epoch: int = 0) -> torch.Tensor:
    specs = small_specs()
    ds = PairedDataset.from_manifest(read_manifest(manifest, specs), specs, train=True, seed=5)
    sampler = EpochBatchSampler(len(ds), batch, rank=rank, world_size=world, seed=5, epoch=epoch)
    return next(iter(make_loader(ds, sampler))).keys


def test_batch_keys_follow_the_item_not_the_process_layout(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=16)
    one = _keys(manifest, 0, 1, 16)
    two = torch.cat([_keys(manifest, r, 2, 8) for r in (0, 1)])
    assert one.dtype == torch.long and len(set(one.tolist())) == 16
    assert torch.equal(one, two)
    assert not torch.equal(_keys(manifest, 0, 1, 16, epoch=1).sort().values, one.sort().values)


def test_item_key_leaves_the_decoders_stream_alone() -> None:
    a, b = np.random.default_rng([1, 2, 3]), np.random.default_rng([1, 2, 3])
    key = item_key(a)
    assert a.integers(0, 2**31, 4).tolist() == b.integers(0, 2**31, 4).tolist()
    assert key == item_key(np.random.default_rng([1, 2, 3]))
    assert key != item_key(np.random.default_rng([1, 2, 4]))


def test_spec_augment_masks_per_item_whatever_the_batch() -> None:
    spec = torch.randn(16, 1, 32, 50)
    keys = torch.arange(16, dtype=torch.long) * 7919 + 3
    aug = SpecAugment(freq_mask=8, time_mask=10).train()
    with item_keys(keys):
        full = aug(spec)
    halves = torch.cat([aug(spec[:8], keys[:8]), aug(spec[8:], keys[8:])])
    assert torch.equal(full, halves)
    swapped = aug(spec.flip(0), keys.flip(0)).flip(0)  # row order does not matter either
    assert torch.equal(full, swapped)
    assert not torch.equal(full, spec)
    masked = (full != spec).flatten(1).any(1)
    assert masked.sum() >= 12  # widths may be 0 for some rows, not for most
    other = aug(spec, keys + 1)
    assert not torch.equal(other, full)  # another key (epoch) -> another mask
    assert current_item_keys() is None
    assert torch.equal(aug.eval()(spec, keys), spec)


def test_spec_augment_without_keys_still_masks() -> None:
    spec = torch.randn(4, 1, 32, 50)
    torch.manual_seed(0)
    out = SpecAugment(8, 10).train()(spec)
    assert out.shape == spec.shape and not torch.equal(out, spec)
