"""``finetune.min_steps``: a few labels make one batch per epoch, so a head trained by epochs
alone got 60 optimizer steps (issue 20's confounder); the schedule raises epochs to reach
``min_steps`` steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modalign.core.config_io import from_dict
from modalign.core.errors import ConfigError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.evaluate import predict
from modalign.finetune.fit import epochs_for
from modalign.finetune.pipeline import train_head


def test_epochs_for_reaches_min_steps_only_when_epochs_fall_short() -> None:
    assert epochs_for(40, 128, 60, 300) == 300  # one batch per epoch
    assert epochs_for(300, 128, 60, 300) == 100  # three batches per epoch
    assert epochs_for(4000, 128, 60, 300) == 60  # 32 batches x 60 epochs already
    assert epochs_for(40, 128, 60, 0) == 60
    assert FinetuneConfig().min_steps == 300
    with pytest.raises(ConfigError, match=r"finetune\.min_steps=-1 is out of range"):
        from_dict(FinetuneConfig, {"min_steps": -1}, "finetune")


def test_train_head_takes_at_least_min_steps() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(12) % 3
    x = torch.randn(3, 16, generator=gen)[y] + 0.3 * torch.randn(12, 16, generator=gen)
    rows = EmbeddedSet([str(i) for i in range(12)], {"image": x},
                       {"image": torch.ones(12, dtype=torch.bool)}, y)  # fmt: skip

    def loss(min_steps: int) -> float:
        cfg = FinetuneConfig(inputs=["image"], epochs=2, lr=1e-3, min_steps=min_steps)
        head = train_head(rows, torch.ones(12), 3, cfg)
        return float(F.cross_entropy(predict(head, rows), y))

    assert loss(60) < loss(0) - 0.05  # 60 steps fit the labels; 2 steps barely move
