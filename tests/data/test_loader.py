"""The training loader: one DataLoader for a whole manifest run (workers start once and keep
their caches), exact resume from any position, and a run with the decoded-item cache equal to
one without it (augmentation on)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from modalign.config import load_config
from modalign.data.cache import MemoryCache
from modalign.data.dataset import EpochBatchSampler
from modalign.data.modality import ModalitySpec
from modalign.data.sources import open_stream
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus
from helpers.data import text_manifest


def test_endless_sampler_is_the_epoch_samplers_back_to_back() -> None:
    per_epoch = [
        list(EpochBatchSampler(10, 3, rank=1, world_size=2, seed=4, epoch=e)) for e in range(4)
    ]
    flat = [b for epoch in per_epoch for b in epoch]
    for start in (0, 1, 2, 5):
        it = iter(EpochBatchSampler.endless_from(10, 3, rank=1, world_size=2, seed=4, start=start))
        assert [next(it) for _ in range(len(flat) - start)] == flat[start:]


def _pid_spec() -> ModalitySpec:
    """A modality whose value is the id of the process that decoded it."""
    return ModalitySpec("pid", lambda v, t, r: torch.tensor([os.getpid()]), torch.zeros(1),
                        inline=True)  # fmt: skip


def test_manifest_stream_keeps_its_workers_across_epochs(tmp_path: Path) -> None:
    manifest = text_manifest(tmp_path, 8)
    rows = manifest.read_text().replace('"text"', '"pid"')
    manifest.write_text(rows)
    stream = open_stream(str(manifest), {"pid": _pid_spec()}, 2, num_workers=2)
    it = iter(stream)
    pids = {int(p) for _ in range(4 * 4) for p in next(it).inputs["pid"].flatten()}  # 4 epochs
    assert len(pids) == 2 and os.getpid() not in pids


def test_stream_with_workers_and_memory_cache_resumes_exactly(tmp_path: Path) -> None:
    from modalign.data.modality import ImagePreset, default_modalities

    from helpers.data import small_config

    cfg = small_config()
    cfg.image.hflip, cfg.audio.clip_seconds = 0.5, 0.3  # random flips, crops and audio windows
    specs = default_modalities(cfg, ImagePreset(input_size=16))
    manifest = write_tiny_corpus(tmp_path, n=12)

    def take(start: int, n: int, cache: MemoryCache | None, workers: int) -> list:
        it = iter(open_stream(str(manifest), specs, 4, seed=1, start=start, cache=cache,
                              num_workers=workers))  # fmt: skip
        return [next(it) for _ in range(n)]

    straight = take(0, 15, None, 0)  # 5 epochs of 3 batches
    resumed = take(4, 11, MemoryCache(), 2)
    for a, b in zip(straight[4:], resumed, strict=True):
        assert a.ids == b.ids
        for m in ("image", "audio"):
            assert torch.equal(a.inputs[m], b.inputs[m]), m
    # Each worker keeps its own memory cache: an item is decoded at most once per worker
    # (12 items x 2 modalities x 2 workers), not once per epoch (11 batches x 4 x 2 = 88).
    decoded = sum(b.counts.decoded for b in resumed)
    assert 2 * 12 <= decoded <= 2 * 12 * 2
    assert decoded + sum(b.counts.cache_hits for b in resumed) == 11 * 4 * 2


def _overrides(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(manifest, out, steps=4, batch=8),
        "model.modalities=[image,audio]",
        "data.image.hflip=0.5",  # augmentation on: flips, crops, audio windows, SpecAugment
        "data.image.train_scale_min=0.4",
        "data.audio.clip_seconds=0.3",
        "data.audio.spec_augment=true",
        "train.threads=1",
        *extra,
    ]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def test_training_with_the_cache_equals_training_without(tmp_path: Path) -> None:
    import shutil

    corpus = write_tiny_corpus(tmp_path / "corpus", n=16)  # 2 batches per epoch: 2 epochs
    plain, cached, resumed = tmp_path / "plain", tmp_path / "cached", tmp_path / "resumed"
    pretrain(load_config(None, _overrides(corpus, plain)))
    disk = ["data.cache.kind=disk", f"data.cache.options.dir={tmp_path / 'cache'}",
            "train.keep_checkpoints=0"]  # fmt: skip
    pretrain(load_config(None, _overrides(corpus, cached, *disk)))
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 2 * 16  # every image and clip decoded once, kept
    shutil.copytree(cached / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    pretrain(load_config(None, _overrides(corpus, resumed, "data.cache=memory")), resume="latest")
    want = _weights(plain)
    for run in (cached, resumed):
        got = _weights(run)
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (run.name, key)
    assert np.isfinite(sum(float(v.float().sum()) for v in want.values()))
