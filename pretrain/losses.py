"""Contrastive losses over modality pairs, in "local loss" form for many processes.

Each process scores its own B rows against all N gathered rows (a B x N slice). The local loss
is scaled by the world size so that DDP's gradient averaging yields exactly the gradient of the
single-process loss over the global batch; rows lacking a modality drop out of that pair (as
queries and as candidates).

Temperature: one learnable log-scale per pair, capped at ``loss.max_logit_scale`` (100, as in
CLIP). The forward value is capped with a straight-through estimator, so the gradient never
stops at the cap, and the trainer clamps the parameter in place after every optimizer step
(:meth:`ContrastiveLoss.clamp_`, as open_clip does). A plain ``clamp`` in forward would zero the
gradient at and above the cap: Adam momentum could then push the parameter past it and it could
never come back down.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modalign.pretrain.config import LossConfig
from modalign.pretrain.distributed import (
    all_sizes,
    gather_no_grad,
    gather_with_grad,
    rank_offset,
)


def select_pairs(
    modalities: Sequence[str], mode: str = "all", anchor: str = "image"
) -> list[tuple[str, str]]:
    """All unordered pairs, or (anchor, m) for every other modality (ImageBind-style binding)."""
    mods = sorted(modalities)
    if mode == "all":
        return list(itertools.combinations(mods, 2))
    if mode == "anchor":
        if anchor not in mods:
            raise ValueError(f"loss.anchor {anchor!r} is not one of the model modalities {mods}")
        return [(anchor, m) for m in mods if m != anchor]
    raise ValueError(f"loss.pairs must be 'all' or 'anchor', got {mode!r}")


def pair_key(a: str, b: str) -> str:
    return f"{a}__{b}"


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate (scaled for DDP averaging)
    value: torch.Tensor  # the global loss value of this process's share (detached, for logging)
    per_pair: dict[str, float] = field(default_factory=dict)
    logit_scale: dict[str, float] = field(default_factory=dict)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) or sigmoid (SigLIP) loss, one learnable temperature per pair."""

    def __init__(self, modalities: Sequence[str], cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pairs = select_pairs(modalities, cfg.pairs, cfg.anchor)
        init = (
            math.log(1.0 / cfg.init_temperature)
            if cfg.kind == "infonce"
            else math.log(cfg.siglip_init_scale)
        )
        self.log_scale = nn.ParameterDict(
            {
                pair_key(a, b): nn.Parameter(
                    torch.tensor(init), requires_grad=cfg.learn_temperature
                )
                for a, b in self.pairs
            }
        )
        self.bias = nn.ParameterDict(
            {
                pair_key(a, b): nn.Parameter(torch.tensor(cfg.siglip_init_bias))
                for a, b in self.pairs
            }
            if cfg.kind == "siglip"
            else {}
        )

    @property
    def max_log_scale(self) -> float:
        return math.log(self.cfg.max_logit_scale)

    def scale(self, key: str) -> torch.Tensor:
        """exp(log-scale) capped at ``max_logit_scale``; straight-through (see module doc)."""
        log_scale = self.log_scale[key]
        excess = (log_scale - self.max_log_scale).clamp(min=0).detach()
        return (log_scale - excess).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every log-scale at or below the cap (call after each optimizer step)."""
        for p in self.log_scale.values():
            p.clamp_(max=self.max_log_scale)

    def forward(
        self, features: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]
    ) -> LossOutput:
        """Mean over active pairs of each pair's loss on the global batch (see module doc).

        ``features[m]``: this process's (B, D) L2-normalised embeddings; ``present[m]``: (B,)
        bool, False where the row lacks modality ``m``.
        """
        first = next(iter(features.values()))
        sizes = all_sizes(first.shape[0], first.device)
        world_size, offset = len(sizes), rank_offset(sizes)
        gathered = {m: gather_with_grad(f, sizes) for m, f in features.items()}
        masks = {m: present[m].to(device=first.device, dtype=torch.bool) for m in features}
        all_masks = {m: gather_no_grad(masks[m], sizes) for m in features}
        total: torch.Tensor | None = None
        value = torch.zeros((), device=first.device, dtype=_upcast(first).dtype)
        active, per_pair, scales = 0, {}, {}
        # Keeps every temperature in the graph even when a pair has no rows (DDP needs all grads).
        anchor_zero = sum(p.sum() * 0.0 for p in self.parameters())
        for a, b in self.pairs:
            if a not in features or b not in features:
                continue
            key = pair_key(a, b)
            rows = masks[a] & masks[b]
            cols = all_masks[a] & all_masks[b]
            n_valid = int(cols.sum())
            if n_valid == 0:
                continue
            scale = self.scale(key)
            if self.cfg.kind == "infonce":
                pair_sum = _infonce_sum(
                    features[a], features[b], gathered[a], gathered[b], rows, cols, offset, scale
                )
                pair_loss = pair_sum / (2 * n_valid)
            else:
                pair_sum = _siglip_sum(
                    features[a], gathered[b], rows, cols, offset, scale, self.bias[key]
                )
                pair_loss = pair_sum / n_valid
            total = pair_loss if total is None else total + pair_loss
            value = value + pair_loss.detach()
            active += 1
            per_pair[key] = float(pair_loss.detach()) * world_size  # this share, rescaled
            scales[key] = float(scale.detach())
        if total is None:
            total = torch.zeros((), device=value.device)
        active = max(active, 1)
        loss = total * world_size / active + anchor_zero
        return LossOutput(loss=loss, value=value / active, per_pair=per_pair, logit_scale=scales)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Softmax/sigmoid in at least float32 (autocast gives bf16/fp16); float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _masked_logits(logits: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~cols.unsqueeze(0), float("-inf"))


def _infonce_sum(
    fa: torch.Tensor,
    fb: torch.Tensor,
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Sum over this process's valid rows of CE(a->b) + CE(b->a); targets on the diagonal."""
    targets = torch.arange(fa.shape[0], device=fa.device) + offset
    logits_ab = _masked_logits(scale * fa @ all_b.T, cols)[rows]
    logits_ba = _masked_logits(scale * fb @ all_a.T, cols)[rows]
    t = targets[rows]
    return F.cross_entropy(_upcast(logits_ab), t, reduction="sum") + F.cross_entropy(
        _upcast(logits_ba), t, reduction="sum"
    )


def _siglip_sum(
    fa: torch.Tensor,
    all_b: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    offset: int,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Sum of -log sigmoid(z * logit) over this process's rows x all valid columns."""
    logits = _upcast(scale * fa @ all_b.T + bias)
    labels = -torch.ones_like(logits)
    idx = torch.arange(fa.shape[0], device=fa.device)
    labels[idx, idx + offset] = 1.0
    valid = rows.unsqueeze(1) & cols.unsqueeze(0)
    return -F.logsigmoid(labels * logits)[valid].sum()
