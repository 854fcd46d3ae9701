"""``train.accum_steps=K`` (GradCache) gives the gradient and weights of the K-times larger batch.

Exact for towers without batch statistics (here: conv + GroupNorm + dropout). Dropout masks
match because each micro-batch's RNG state is replayed in the gradient pass. BatchNorm towers
normalise per micro-batch (as in GradCache/open_clip); their running statistics must still be
updated once per micro-batch, not twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modalign.data.batch import Batch
from modalign.data.config import DataConfig
from modalign.pretrain import LossConfig, TowerConfig
from modalign.pretrain.accumulation import cached_accumulation_step
from modalign.pretrain.losses import ContrastiveLoss
from modalign.pretrain.model import ContrastiveTask, MultimodalEncoder
from modalign.pretrain.towers import AudioFrontEnd, TowerParts

from helpers.corpus import tiny_overrides, write_tiny_corpus

WIDTH = 8


class TinyTrunk(nn.Module):
    """Per-sample CNN: conv -> GroupNorm (or BatchNorm) -> GELU -> dropout -> global pool."""

    def __init__(self, drop: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm2d(WIDTH) if batchnorm else nn.GroupNorm(2, WIDTH)
        self.net = nn.Sequential(
            nn.Conv2d(1, WIDTH, 3, padding=1),
            norm,
            nn.GELU(),
            nn.Dropout(drop),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_image_tower(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    return TowerParts(nn.Identity(), TinyTrunk(cfg.drop_rate), WIDTH)


def tiny_audio_tower(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    return TowerParts(AudioFrontEnd(data_cfg), TinyTrunk(cfg.drop_rate), WIDTH)


def _core(drop: float, batchnorm: bool = False) -> ContrastiveTask:
    torch.manual_seed(0)
    parts = {m: TowerParts(nn.Identity(), TinyTrunk(drop, batchnorm), WIDTH) for m in ("a", "b")}
    encoder = MultimodalEncoder(parts, 4, {})
    return ContrastiveTask(encoder, ContrastiveLoss(["a", "b"], LossConfig())).double()


def _micro_batches(k: int = 2, n: int = 4) -> list[Batch]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(k):
        present = {m: torch.ones(n, dtype=torch.bool) for m in ("a", "b")}
        present["b"][i] = False  # a row lacking a modality in every micro-batch
        inputs = {
            "a": torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64),
            "b": torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64),
        }
        out.append(
            Batch(
                inputs=inputs,
                present=present,
                ids=[f"{i}-{j}" for j in range(n)],
                labels=[None] * n,
                index=torch.arange(n),
            )
        )
    return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _cached_grads(core: ContrastiveTask, micro: list[Batch], seed: int) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    core.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    cached_accumulation_step(core, micro, Accelerator(cpu=True))
    return _grads(core)


def _full_graph_grads(core: ContrastiveTask, micro: list[Batch], seed: int) -> dict:
    """The big batch: every micro-batch forwarded with its graph kept, one loss, one backward."""
    core.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    feats = [core(b, features_only=True) for b in micro]
    cat = {m: torch.cat([f[m] for f in feats]) for m in ("a", "b")}
    present = {m: torch.cat([b.present[m] for b in micro]) for m in ("a", "b")}
    core.loss(cat, present).loss.backward()
    return _grads(core)


def test_cached_gradient_equals_big_batch_gradient_with_dropout() -> None:
    core, micro = _core(drop=0.5).train(), _micro_batches()
    cached = _cached_grads(core, micro, seed=7)
    full = _full_graph_grads(core, micro, seed=7)
    assert set(cached) == set(full) and len(full) > 4
    for name, g in full.items():
        torch.testing.assert_close(cached[name], g, atol=1e-10, rtol=0, msg=name)
    other = _full_graph_grads(core, micro, seed=8)  # dropout is live: other masks, other grads
    assert any(not torch.allclose(other[n], g) for n, g in full.items())


def test_batchnorm_running_stats_updated_once_per_micro_batch() -> None:
    core, micro = _core(drop=0.0, batchnorm=True).train(), _micro_batches()
    reference = _core(drop=0.0, batchnorm=True).train()
    with torch.no_grad():
        for b in micro:
            reference(b, features_only=True)
    _cached_grads(core, micro, seed=0)
    want = dict(reference.named_buffers())
    for name, buf in core.named_buffers():
        torch.testing.assert_close(buf, want[name], atol=1e-12, rtol=0, msg=name)


def _train(manifest: Path, out: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    overrides = [
        *tiny_overrides(manifest, out, steps=2, batch=batch),
        f"train.accum_steps={accum}",
        "train.checkpoint_every=0",
        "train.threads=1",
        "model.modalities=[image,audio]",
        "model.towers.image.kind=tiny_image",
        "model.towers.audio.kind=tiny_audio",
    ]
    builders = {"tiny_image": tiny_image_tower, "tiny_audio": tiny_audio_tower}
    pretrain(load_config(None, overrides), tower_builders=builders)
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("accum"), n=32)


def test_trainer_accumulation_matches_big_batch_weights(corpus: Path, tmp_path: Path) -> None:
    """2 optimizer steps of 2 x 8 micro-batches == 2 steps of 16 (same items, same order)."""
    big = _train(corpus, tmp_path / "big", batch=16, accum=1)
    accumulated = _train(corpus, tmp_path / "accum", batch=8, accum=2)
    for key, w in big.items():
        torch.testing.assert_close(accumulated[key], w, atol=1e-5, rtol=1e-5, msg=key)
    small = _train(corpus, tmp_path / "small", batch=8, accum=1)  # the test can tell batches apart
    assert any(not torch.allclose(small[k], w, atol=1e-5) for k, w in big.items())
