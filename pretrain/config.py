"""Pretraining configuration sections: model, loss, optim, train, output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig


@dataclass
class TowerConfig:
    """One modality's tower. ``kind`` names a registered tower builder (see ``towers.py``);
    ``options`` are that kind's own typed options (checked against its options dataclass)."""

    kind: str = "timm_image"
    arch: str = "resnet18"  # timm model name, or sentence-transformers path ("" = bundled MiniLM)
    weights: str = ""  # local weights file (.safetensors or timm/torch checkpoint); "" = scratch
    lock: Literal["none", "all", "partial"] = "none"  # "partial": LiT-style, last groups train
    unlocked_groups: int = 0
    input_size: int = 0  # image side in pixels; 0 = the tower's pretrained config (timm: 224)
    in_chans: int = 0  # image tower input channels; 0 = data.image.channels
    drop_rate: float = 0.0
    head: Literal["linear", "mlp"] = "linear"
    grad_checkpointing: bool = False
    cache_items: int = 100_000  # frozen (lock: all) towers: cached outputs kept; 0 = no cache
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own options

    def __post_init__(self) -> None:
        from modalign.pretrain.towers import TOWERS

        _require("lock", self.lock, self.lock in ("none", "all", "partial"), "none|all|partial")
        if self.kind in TOWERS:  # plugins passed as tower_builders= check their own options
            TOWERS.options(self.kind, self.options, f"model.towers({self.kind}).options")


def _default_towers() -> dict[str, TowerConfig]:
    return {
        "image": TowerConfig(kind="timm_image", arch="resnet18"),
        "audio": TowerConfig(kind="timm_audio", arch="resnet18", in_chans=1),
        "text": TowerConfig(kind="sentence_transformer", arch="", lock="all"),
    }


@dataclass
class ModelConfig:
    modalities: list[str] = field(default_factory=lambda: ["image", "audio", "text"])
    embed_dim: int = 256
    towers: dict[str, TowerConfig] = field(default_factory=_default_towers)

    def __post_init__(self) -> None:
        missing = [m for m in self.modalities if m not in self.towers]
        if missing:
            raise ValueError(
                f"model.modalities lists {missing} but model.towers has no entry for it; "
                f"towers defined: {sorted(self.towers)}"
            )


@dataclass
class LossConfig:
    """``kind``: a registered contrastive loss (``modalign.pretrain.losses.LOSSES``: infonce,
    siglip, plugins), its own options in ``options``; ``pairs``: a registered pair policy
    (``PAIR_POLICIES``: all, anchor). Names and options are checked when the config is built."""

    kind: str = "infonce"
    pairs: str = "all"  # "anchor": bind every modality to `anchor` (ImageBind)
    anchor: str = "image"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    siglip_init_scale: float = 10.0
    siglip_init_bias: float = -10.0
    options: dict[str, Any] = field(default_factory=dict)  # the loss kind's own options

    def __post_init__(self) -> None:
        from modalign.pretrain.losses import LOSSES, PAIR_POLICIES

        LOSSES.get(self.kind, "loss.kind")
        LOSSES.options(self.kind, self.options, "loss.options")
        PAIR_POLICIES.get(self.pairs, "loss.pairs")


def _require(key: str, value: object, ok: bool, want: str) -> None:
    """Raise (exit 2) naming ``key`` unless ``ok``; checked when the config is loaded."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: must be {want} (--set {key}=...)")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    decay_steps: int = 0  # cosine horizon in steps (independent of train.steps); 0 = no decay
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # One fused AdamW kernel over all parameters (CPU and CUDA; same update as the per-parameter
    # loop up to float rounding, ~5x faster step on CPU). false = PyTorch's per-parameter loop.
    fused: bool = True

    def __post_init__(self) -> None:
        _require("optim.lr", self.lr, math.isfinite(self.lr) and self.lr > 0, "a number > 0")
        _require("optim.weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        _require("optim.betas", self.betas, ok, "two numbers in [0, 1), e.g. [0.9, 0.98]")
        _require("optim.eps", self.eps, self.eps > 0, "> 0")
        _require("optim.warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        _require("optim.decay_steps", self.decay_steps, self.decay_steps >= 0, ">= 0 (0 = none)")
        ok = 0 <= self.min_lr_ratio <= 1
        _require("optim.min_lr_ratio", self.min_lr_ratio, ok, "in [0, 1]")
        _require("optim.grad_clip", self.grad_clip, self.grad_clip >= 0, ">= 0 (0 = off)")


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # per process (as in open_clip and Accelerate)
    accum_steps: int = 1  # exact large-batch contrastive gradient over accum_steps micro-batches
    seed: int = 0
    # auto: the user's Accelerate config (`accelerate config` / launch --mixed_precision), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    val_every: int = 0  # steps between validation retrieval runs (needs data.val); 0 = off
    threads: int = 0  # torch intra-op threads; 0 = torch default
    # torch.compile each tensor-input trunk (towers declare ``compilable``). Off by default: on a
    # 2-core CPU, compiling resnet18 (64 px, batch 64) took 21-175 s and its fwd+bwd step was
    # no faster than eager (1.62 s vs 1.39 s CPU, 1 thread); worth measuring for long GPU runs.
    compile: bool = False
    # Where frozen towers (lock: all) run: in the loader workers, overlapped with the step
    # (loader), in the step (step), or auto: loader on CPU/fp32 with workers and cores to spare
    # (modalign.pretrain.loader_towers says exactly when).
    frozen_towers: Literal["auto", "loader", "step"] = "auto"
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = False  # alias of report_to: [tensorboard]
    # Accelerate trackers (tensorboard, wandb, mlflow, ...; each must be installed)
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "accum_steps", "log_every"):
            value = getattr(self, key)
            _require(f"train.{key}", value, value >= 1, "an integer >= 1")
        for key in ("checkpoint_every", "keep_checkpoints", "val_every", "threads"):
            value = getattr(self, key)
            _require(f"train.{key}", value, value >= 0, "an integer >= 0 (0 = off/default)")


@dataclass
class OutputConfig:
    dir: str = "runs/pretrain"


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
