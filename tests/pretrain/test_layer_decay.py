"""``optim.layer_decay``: layer-wise learning rates for pretrained trunks (issue 20, item 4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.pretrain import LossConfig, TowerConfig
from modalign.pretrain.config import OptimConfig
from modalign.pretrain.losses import ContrastiveLoss
from modalign.pretrain.model import ContrastiveTask, MultimodalEncoder
from modalign.pretrain.optim import make_optimizer, make_scheduler, param_groups
from modalign.pretrain.towers import TowerParts, apply_lock
from modalign.pretrain.towers.timm import build_timm_image


class Layered(nn.Module):
    """A transformer-like trunk: ``embed`` then ``body.layer.0..2`` (numbered layer groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.body = nn.Module()  # names body.layer.<i>.*, as in transformers models
        self.body.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.body.layer:
            x = layer(x)
        return x


def _task() -> ContrastiveTask:
    parts = {
        "a": TowerParts(nn.Identity(), Layered(), 4),
        "b": TowerParts(nn.Identity(), Layered(), 4),
    }
    apply_lock(parts["b"], TowerConfig(lock="all"))
    encoder = MultimodalEncoder(parts, 2, {})
    return ContrastiveTask(encoder, ContrastiveLoss(["a", "b"], LossConfig()))


def _lr_of(opt: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}


def test_layer_decay_scales_each_group_and_keeps_heads_at_lr() -> None:
    task = _task()
    enc = task.encoder
    opt = make_optimizer(task, OptimConfig(lr=1.0, layer_decay=0.5, weight_decay=0.1))
    lr = _lr_of(opt)
    trunk = enc.trunks["a"]
    # groups: [embed (rest first), layer.0, layer.1, layer.2] -> 0.5**4 .. 0.5**1
    assert lr[id(trunk.embed.weight)] == pytest.approx(0.5**4)
    assert [lr[id(trunk.body.layer[i].weight)] for i in range(3)] == pytest.approx(
        [0.5**3, 0.25, 0.5]
    )
    assert lr[id(trunk.body.layer[2].bias)] == pytest.approx(0.5)  # no-decay params scaled too
    assert all(lr[id(p)] == 1.0 for p in enc.heads.parameters())
    assert all(lr[id(p)] == 1.0 for p in task.loss.parameters())
    assert not any(id(p) in lr for p in enc.trunks["b"].parameters())  # locked: not optimised
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert (
        decay[id(trunk.body.layer[2].weight)] == 0.1 and decay[id(trunk.body.layer[2].bias)] == 0.0
    )
    # the schedule multiplies every group's own lr: ratios hold through warmup and decay
    sched = make_scheduler(opt, OptimConfig(lr=1.0, layer_decay=0.5, warmup_steps=4))
    opt.step()
    sched.step()
    lr = _lr_of(opt)
    assert lr[id(trunk.body.layer[1].weight)] / lr[id(enc.heads["a"].weight)] == pytest.approx(0.25)


def test_layer_decay_off_is_the_plain_groups() -> None:
    task = _task()
    opt = make_optimizer(task, OptimConfig(lr=0.1, layer_decay=1.0))
    plain = param_groups(task, OptimConfig().weight_decay)
    assert len(opt.param_groups) == len(plain) == 2
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_layer_decay_on_a_timm_trunk_is_monotone() -> None:
    """timm's coarse groups (stem, stages, head): earlier groups never learn faster."""
    parts = build_timm_image(
        TowerConfig(kind="timm_image", arch="test_resnet", input_size=16), DataConfig()
    )
    groups = parts.groups()
    assert len(groups) >= 3
    task = ContrastiveTask(
        MultimodalEncoder({"image": parts}, 4, {}), ContrastiveLoss(["image"], LossConfig())
    )
    lr = _lr_of(make_optimizer(task, OptimConfig(lr=1.0, layer_decay=0.7)))
    per_group = [max(lr[id(p)] for p in g) for g in groups]
    assert per_group == sorted(per_group) and per_group[-1] == pytest.approx(0.7)
    assert all(id(p) in lr for p in parts.trunk.parameters())


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_layer_decay_out_of_range_is_a_config_error(value: float) -> None:
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        load_config(None, [f"optim.layer_decay={value}"])
