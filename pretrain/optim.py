"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from modalign.core.errors import ConfigError
from modalign.pretrain.config import OptimConfig
from modalign.pretrain.model import ContrastiveTask, MultimodalEncoder


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, temperatures and other 0/1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim < 2
            or "log_scale" in name
            or "bias" in name.split(".")[-1]
            or "norm" in name.lower()
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def layer_lr_scales(encoder: MultimodalEncoder, decay: float) -> dict[int, float]:
    """``id(parameter) -> lr multiplier`` for layer-wise decay over every trainable trunk.

    A trunk of ``N`` layer groups (:meth:`MultimodalEncoder.layer_groups`, input first) gets
    ``decay ** (N - i)`` on group ``i``: its last group learns at ``lr * decay`` and its first
    at ``lr * decay ** N``; a trunk parameter outside every group is treated as part of the
    first one. Parameters not listed (projection heads, temperatures) keep multiplier 1.
    """
    scales: dict[int, float] = {}
    for m in encoder.modalities:
        trunk = encoder.trunks[m]
        if not any(p.requires_grad for p in trunk.parameters()):
            continue
        groups = encoder.layer_groups(m)
        n = len(groups)
        for p in trunk.parameters():
            scales[id(p)] = decay**n
        for i, group in enumerate(groups):
            for p in group:
                scales[id(p)] = decay ** (n - i)
    return scales


def _encoder_of(model: nn.Module) -> MultimodalEncoder:
    if isinstance(model, MultimodalEncoder):
        return model
    if isinstance(model, ContrastiveTask):
        return model.encoder
    raise ConfigError(
        f"optim.layer_decay needs a modalign encoder or contrastive task, got "
        f"{type(model).__name__}; set optim.layer_decay=1"
    )


def layered_param_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """:func:`param_groups` split further by layer-wise lr multiplier (``lr_scale`` per group,
    applied to ``lr``); ``decay == 1`` gives exactly :func:`param_groups`."""
    if decay == 1.0:
        return param_groups(model, weight_decay)
    scales = layer_lr_scales(_encoder_of(model), decay)
    out: list[dict] = []
    for base in param_groups(model, weight_decay):
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in base["params"]:
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
        for scale in sorted(by_scale, reverse=True):
            out.append({**base, "params": by_scale[scale], "lr_scale": scale})
    return out


def make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`layered_param_groups`; ``optim.fused`` picks PyTorch's fused kernel."""
    groups = layered_param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),  # OptimConfig checks: two numbers
        eps=cfg.eps,
        fused=cfg.fused or None,
    )


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup, then cosine decay over ``decay_steps`` (0 = constant after warmup).

    The horizon is a config value, not ``train.steps``, so extending a run with ``--resume``
    and a larger ``train.steps`` follows the same curve as running the longer run straight.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
