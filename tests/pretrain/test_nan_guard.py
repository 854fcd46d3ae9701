"""A NaN/inf loss or gradient stops training with ``TrainingDiverged``: clear message, the
failing update not applied, no checkpoint or bundle written for it, earlier checkpoints intact."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from modalign.config import load_config
from modalign.data.config import DataConfig
from modalign.pretrain import TowerConfig
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.towers import AudioFrontEnd, TowerParts
from modalign.pretrain.trainer import TrainingDiverged, pretrain

from helpers.corpus import tiny_overrides

WIDTH = 8


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full_like(grad, float("nan"))


class FaultyTrunk(nn.Module):
    """Small CNN that injects a fault on its ``fail_at``-th training forward (1-based)."""

    def __init__(self, fail_at: int = 0, fault: str = "output") -> None:
        super().__init__()
        self.fail_at, self.fault, self.calls = fail_at, fault, 0
        self.net = nn.Sequential(
            nn.Conv2d(1, WIDTH, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        if not self.training:
            return y
        self.calls += 1
        if self.calls == self.fail_at:
            return y * float("nan") if self.fault == "output" else _NaNGrad.apply(y)
        return y


def _builders(fail_at: int = 0, fault: str = "output") -> dict:
    def image(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
        return TowerParts(nn.Identity(), FaultyTrunk(fail_at, fault), WIDTH)

    def audio(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
        return TowerParts(AudioFrontEnd(data_cfg), FaultyTrunk(), WIDTH)

    return {"faulty_image": image, "small_audio": audio}


def _cfg(manifest: Path, out: Path, steps: int = 5, *extra: str):
    return load_config(
        None,
        [
            *tiny_overrides(manifest, out, steps=steps, batch=8),
            "model.modalities=[image,audio]",
            "model.towers.image.kind=faulty_image",
            "model.towers.audio.kind=small_audio",
            "train.threads=1",
            "train.keep_checkpoints=5",
            *extra,
        ],
    )


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow  # three training runs
def test_nan_loss_at_step_3_stops_and_keeps_checkpoint_2(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as err:
        pretrain(_cfg(corpus, out), tower_builders=_builders(fail_at=3))
    message = str(err.value)
    assert "loss became nan at step 3" in message
    assert str(out / "checkpoints" / "step-2") in message
    assert "Lower optim.lr" in message
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert not (out / "model.safetensors").exists(), "no bundle from a diverged run"
    kept = _checkpoint_weights(out / "checkpoints" / "step-2")
    assert all(torch.isfinite(w).all() for w in kept.values())

    # The kept checkpoint is exactly what a clean 2-step run ends with, and it resumes.
    clean = tmp_path / "clean"
    pretrain(_cfg(corpus, clean, steps=2), tower_builders=_builders())
    for key, w in _checkpoint_weights(clean / "checkpoints" / "step-2").items():
        assert torch.equal(kept[key], w), key
    result = pretrain(_cfg(corpus, out, steps=3), resume="latest", tower_builders=_builders())
    assert math.isfinite(result.final_loss) and (out / "model.safetensors").exists()


def test_nan_gradient_with_finite_loss_is_caught(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="gradient norm became nan at step 2"):
        pretrain(
            _cfg(corpus, out, 3, "optim.grad_clip=0"),
            tower_builders=_builders(fail_at=2, fault="grad"),
        )
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]


def test_huge_learning_rate_diverges_cleanly(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="Last good checkpoint") as err:
        pretrain(
            _cfg(corpus, out, 6, "optim.lr=1.0e+30", "optim.grad_clip=0"),
            tower_builders=_builders(),
        )
    assert "step" in str(err.value)
    for _, path in ckpt.list_checkpoints(out):
        assert all(torch.isfinite(w).all() for w in _checkpoint_weights(path).values())
