"""Pretraining configuration sections: model, loss, optim, train, output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from modalign.core.config_io import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Range,
    check_ranges,
)
from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.pretrain.losses import LossConfig
from modalign.pretrain.towers.api import TowerConfig


def _default_towers() -> dict[str, TowerConfig]:
    return {
        "image": TowerConfig(kind="timm_image", arch="resnet18"),
        "audio": TowerConfig(kind="timm_audio", arch="resnet18", in_chans=1),
        "text": TowerConfig(kind="sentence_transformer", arch="", lock="all"),
    }


@dataclass
class ModelConfig:
    modalities: list[str] = field(default_factory=lambda: ["image", "audio", "text"])
    embed_dim: Annotated[int, AT_LEAST_1] = 256
    towers: dict[str, TowerConfig] = field(default_factory=_default_towers)

    def __post_init__(self) -> None:
        missing = [m for m in self.modalities if m not in self.towers]
        if missing:
            raise ValueError(
                f"model.modalities lists {missing} but model.towers has no entry for it; "
                f"towers defined: {sorted(self.towers)}"
            )
        for m, tower in self.towers.items():  # adapter kind and options, named per tower
            tower.adapter.check(f"model.towers.{m}", tower.lock)


def _require(key: str, value: object, ok: bool, want: str) -> None:
    """Raise (exit 2) naming ``key`` unless ``ok``; checked when the config is loaded."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: must be {want} (--set {key}=...)")


@dataclass
class OptimConfig:
    lr: Annotated[float, POSITIVE] = 5e-4
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    betas: list[Annotated[float, Range(ge=0, lt=1)]] = field(default_factory=lambda: [0.9, 0.98])
    eps: Annotated[float, POSITIVE] = 1e-6
    warmup_steps: Annotated[int, NON_NEGATIVE] = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    decay_steps: Annotated[int, Range(ge=0, note="0 = no decay")] = (
        0  # cosine horizon in steps (independent of train.steps); 0 = no decay
    )
    min_lr_ratio: Annotated[float, FRACTION] = 0.0
    grad_clip: Annotated[float, Range(ge=0, note="0 = off")] = 1.0  # max global grad norm; 0 = off
    # One fused AdamW kernel over all parameters (CPU and CUDA; same update as the per-parameter
    # loop up to float rounding, ~5x faster step on CPU). false = PyTorch's per-parameter loop.
    fused: bool = True
    # Layer-wise lr decay for trainable trunks (BEiT/ELECTRA style): the trunk's last layer group
    # (timm's coarse groups, transformer layers) learns at lr * layer_decay, each earlier group
    # at one more factor of it; projection heads and temperatures at lr. 1.0 = off.
    layer_decay: Annotated[float, Range(gt=0, le=1, note="1 = off")] = 1.0

    def __post_init__(self) -> None:
        check_ranges(self, "optim")  # ranges are declared on the fields
        ok = len(self.betas) == 2
        _require("optim.betas", self.betas, ok, "two numbers in [0, 1), e.g. [0.9, 0.98]")


@dataclass
class TrainConfig:
    steps: Annotated[int, AT_LEAST_1] = 1000
    batch_size: Annotated[int, AT_LEAST_1] = 64  # per process (as in open_clip and Accelerate)
    accum_steps: Annotated[int, AT_LEAST_1] = (
        1  # exact large-batch contrastive gradient over accum_steps micro-batches
    )
    seed: Annotated[int, SEED] = 0
    # auto: the user's Accelerate config (`accelerate config` / launch --mixed_precision), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: Annotated[int, Range(ge=0, note="0 = off")] = 500
    keep_checkpoints: Annotated[int, Range(ge=0, note="0 = keep all")] = 2
    log_every: Annotated[int, AT_LEAST_1] = 10
    val_every: Annotated[int, Range(ge=0, note="0 = off")] = (
        0  # steps between validation retrieval runs (needs data.val); 0 = off
    )
    threads: Annotated[int, Range(ge=0, note="0 = torch default")] = (
        0  # torch intra-op threads; 0 = torch default
    )
    # torch.compile each tensor-input trunk (towers declare ``compilable``). Off by default: on a
    # 2-core CPU, compiling resnet18 (64 px, batch 64) took 21-175 s and its fwd+bwd step was
    # no faster than eager (1.62 s vs 1.39 s CPU, 1 thread); worth measuring for long GPU runs.
    compile: bool = False
    # Where frozen towers (lock: all) run: in the loader workers, overlapped with the step
    # (loader), in the step (step), or auto: loader on CPU/fp32 with workers and cores to spare
    # (modalign.pretrain.towers.in_loader says exactly when).
    frozen_towers: Literal["auto", "loader", "step"] = "auto"
    deterministic: bool = False
    progress: bool = True
    tensorboard: bool = False  # alias of report_to: [tensorboard]
    # Accelerate trackers (tensorboard, wandb, mlflow, ...; each must be installed)
    report_to: list[str] = field(default_factory=list)
    # Model selection (modalign.pretrain.best): a QUERY->GALLERY/METRIC validation figure, e.g.
    # text->image/recall@5; the bundle keeps the weights of its best validation ("" = last step)
    keep_best: str = ""
    # stop after this many validations in a row without a better keep_best figure; 0 = off
    early_stop: Annotated[int, Range(ge=0, note="0 = off")] = 0
    # Seconds a process waits for the others in one collective (torch.distributed's process-group
    # timeout): bounds how long a hung machine stalls the others; a dead one fails them at once
    dist_timeout: Annotated[int, AT_LEAST_1] = 1800
    # Seconds each process waits to see every process's marker in output.dir before refusing a
    # launch whose machines do not share it (modalign.pretrain.multinode)
    shared_fs_wait: Annotated[float, NON_NEGATIVE] = 60.0

    def __post_init__(self) -> None:
        # ranges are declared on the fields; checked here too for configs built in Python
        check_ranges(self, "train")
        if self.keep_best:
            from modalign.pretrain.best import parse_metric

            parse_metric(self.keep_best)
        ok = self.early_stop == 0 or bool(self.keep_best)
        _require("train.early_stop", self.early_stop, ok, "0 unless train.keep_best names a figure")


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

    def __post_init__(self) -> None:
        mods = list(self.model.modalities)
        if len(set(mods)) < 2 or len(set(mods)) != len(mods):
            raise ConfigError(
                f"model.modalities={mods!r}: contrastive pretraining aligns two or more distinct "
                "modalities (one modality has nothing to be aligned with); list at least two, "
                "e.g. --set model.modalities=[image,audio]"
            )
