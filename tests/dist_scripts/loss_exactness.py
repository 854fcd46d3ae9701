"""2 processes x B vs 1 process x 2B: loss, gradients and BatchNorm statistics.

Run ``torchrun --standalone --nproc_per_node 2 loss_exactness.py OUT.pt`` (CPU, gloo); rank 0
saves every case's results to OUT.pt. ``tests/system/test_distributed.py`` imports this module to
compute the same cases in one process and compares. Each rank holds its contiguous slice of the
global batch (``row_split``), as the trainer's sampler does; the towers' BatchNorms are swapped
for :class:`GlobalBatchNorm` and the model is wrapped in DDP, as in the trainer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from modalign.pretrain import LossConfig
from modalign.pretrain.distributed import all_reduce_mean, convert_batchnorm, world
from modalign.pretrain.losses import ContrastiveLoss
from modalign.pretrain.towers.adapters import AdapterConfig, freeze_norm_statistics, inject_adapter

MODS = ["audio", "image", "text"]
IN_DIM, HIDDEN, EMBED = 6, 8, 4


@dataclass
class Case:
    name: str
    loss: LossConfig
    dtype: torch.dtype = torch.float64
    n: int = 8  # global batch
    split: tuple[int, ...] = (4, 4)  # rows per rank
    absent: dict[str, list[int]] = field(default_factory=dict)  # global rows lacking a modality
    adapter: bool = False  # LoRA on the image tower (its base and BatchNorm statistics frozen)


def cases() -> list[Case]:
    masks = {"audio": [1, 6], "text": [3]}
    return [
        Case("infonce_all_f64", LossConfig(kind="infonce"), absent=masks),
        Case("infonce_f32", LossConfig(kind="infonce"), dtype=torch.float32, absent=masks),
        Case("siglip_anchor_f64", LossConfig(kind="siglip", pairs="anchor"), absent=masks),
        Case("siglip_f32", LossConfig(kind="siglip"), dtype=torch.float32, absent=masks),
        Case("uneven_split_f64", LossConfig(kind="infonce"), split=(3, 5), absent=masks),
        # audio absent everywhere: its pairs drop out, DDP must tolerate unused parameters
        Case(
            "audio_absent_everywhere", LossConfig(kind="infonce"), absent={"audio": list(range(8))}
        ),
        # audio absent on rank 1 only: rank 1's audio rows are placeholders
        Case("audio_absent_on_rank1", LossConfig(kind="infonce"), absent={"audio": [4, 5, 6, 7]}),
        # a peft LoRA adapter on the image tower's conv and linear layers (issue 25)
        Case("lora_image_f64", LossConfig(kind="infonce"), absent=masks, adapter=True),
    ]


class ToyTask(nn.Module):
    """Per modality: a tower with BatchNorm (1-D, 2-D, and timm's BatchNormAct2d) -> L2 norm."""

    def __init__(self, loss: LossConfig) -> None:
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.towers = nn.ModuleDict(
            {
                "audio": nn.Sequential(
                    nn.Linear(IN_DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                    nn.Linear(HIDDEN, EMBED),
                ),
                "image": nn.Sequential(
                    nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 3, 2, padding=1),
                    BatchNormAct2d(3), nn.Flatten(), nn.Linear(3 * 3 * 4, EMBED),
                ),
                "text": nn.Sequential(
                    nn.Unflatten(1, (2, 3)), nn.Conv1d(2, 2, 1), nn.BatchNorm1d(2, momentum=None),
                    nn.Flatten(), nn.Linear(6, EMBED),
                ),
            }
        )  # fmt: skip
        self.loss = ContrastiveLoss(MODS, loss)

    def forward(self, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor]):
        feats = {m: F.normalize(self.towers[m](inputs[m]), dim=-1) for m in MODS}
        return self.loss(feats, present)


def adapt_image_tower(model: ToyTask) -> None:
    """LoRA (rank 2) on the image tower's conv and linear layers, B moved off zero so every
    adapter tensor gets a gradient."""
    tower = model.towers["image"]
    inject_adapter(tower, AdapterConfig("lora", {"r": 2}), ["1", "4"], "model.towers.image")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in tower.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def global_batch(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(case.n, IN_DIM, generator=gen, dtype=case.dtype) for m in MODS}
    present = {m: torch.ones(case.n, dtype=torch.bool) for m in MODS}
    for m, rows in case.absent.items():
        present[m][rows] = False
        inputs[m][rows] = 0.0  # what a placeholder holds
    return inputs, present


def row_split(case: Case, rank: int, world_size: int) -> slice:
    if world_size == 1:
        return slice(0, case.n)
    lo = sum(case.split[:rank])
    return slice(lo, lo + case.split[rank])


def run_case(case: Case) -> dict[str, Any]:
    """Loss (global value), parameter gradients and BN buffers for one step of ``case``."""
    rank, world_size = world()
    torch.manual_seed(0)
    model = ToyTask(case.loss)
    if case.adapter:
        adapt_image_tower(model)
    model = model.to(case.dtype)
    if world_size > 1:
        convert_batchnorm(model)
    if case.adapter:
        freeze_norm_statistics(model.towers["image"])  # as MultimodalEncoder.train does
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    inputs, present = global_batch(case)
    rows = row_split(case, rank, world_size)
    out = model({m: x[rows] for m, x in inputs.items()}, {m: p[rows] for m, p in present.items()})
    out.loss.backward()
    core = model.module if world_size > 1 else model
    return {
        "loss": float(all_reduce_mean(out.value) * world_size),
        "grads": {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in core.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in core.named_buffers()},
    }


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    results = {case.name: run_case(case) for case in cases()}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
