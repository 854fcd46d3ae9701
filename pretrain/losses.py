"""Contrastive losses over modality pairs, in "local loss" form for many processes.

Each process scores its own B rows against all N gathered rows (a B x N slice). The local loss
is scaled by the world size so that DDP's gradient averaging yields exactly the gradient of the
single-process loss over the global batch; rows lacking a modality drop out of that pair (as
queries and as candidates).

Adding a loss is one registration: ``LOSSES.add(name, factory, OptionsDataclass)`` where
``factory(loss_cfg, options) -> PairLoss`` (options from ``loss.options``); pair policies
(``loss.pairs``) live in :data:`PAIR_POLICIES`. Plugins use the ``modalign.losses`` group.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from modalign.core.config_io import POSITIVE, Range
from modalign.core.registry import NoOptions, Registry
from modalign.pretrain.distributed import (
    all_sizes,
    gather_no_grad,
    gather_with_grad,
    rank_offset,
)


@dataclass
class LossConfig:
    """``kind``: a registered contrastive loss (``modalign.pretrain.losses.LOSSES``: infonce,
    siglip, plugins), its own options in ``options``; ``pairs``: a registered pair policy
    (``PAIR_POLICIES``: all, anchor). Names and options are checked when the config is built."""

    kind: str = "infonce"
    pairs: str = "all"  # "anchor": bind every modality to `anchor` (ImageBind)
    anchor: str = "image"
    init_temperature: Annotated[float, POSITIVE] = 0.07
    max_logit_scale: Annotated[float, POSITIVE] = 100.0
    learn_temperature: bool = True
    siglip_init_scale: Annotated[float, POSITIVE] = 10.0
    siglip_init_bias: Annotated[float, Range()] = -10.0
    options: dict[str, Any] = field(default_factory=dict)  # the loss kind's own options

    def __post_init__(self) -> None:
        LOSSES.get(self.kind, "loss.kind")
        LOSSES.options(self.kind, self.options, "loss.options")
        PAIR_POLICIES.get(self.pairs, "loss.pairs")


PairPolicy = Callable[[Sequence[str], str], list[tuple[str, str]]]
PAIR_POLICIES: Registry[PairPolicy] = Registry("pair policy", "modalign.pair_policies")


@PAIR_POLICIES.register("all")
def all_pairs(mods: Sequence[str], anchor: str) -> list[tuple[str, str]]:
    """Every unordered pair of modalities."""
    return list(itertools.combinations(mods, 2))


@PAIR_POLICIES.register("anchor")
def anchor_pairs(mods: Sequence[str], anchor: str) -> list[tuple[str, str]]:
    """(anchor, m) for every other modality (ImageBind-style binding)."""
    if anchor not in mods:
        raise ValueError(f"loss.anchor {anchor!r} is not one of the model modalities {list(mods)}")
    return [(anchor, m) for m in mods if m != anchor]


def select_pairs(
    modalities: Sequence[str], mode: str = "all", anchor: str = "image"
) -> list[tuple[str, str]]:
    """The modality pairs of policy ``mode`` (a :data:`PAIR_POLICIES` name) over ``modalities``."""
    if mode not in PAIR_POLICIES:
        raise ValueError(
            f"loss.pairs must be one of {', '.join(PAIR_POLICIES.names())}, got {mode!r}"
        )
    return PAIR_POLICIES.get(mode).factory(sorted(modalities), anchor)


def pair_key(a: str, b: str) -> str:
    return f"{a}__{b}"


@dataclass
class PairBatch:
    """One modality pair's inputs to a pair loss (this process's rows vs all gathered rows).

    ``fa``/``fb``: local (B, D) features; ``all_a``/``all_b``: gathered (N, D); ``rows``: local
    rows with both modalities; ``cols``: gathered rows with both; ``offset``: this process's first
    global row; ``scale``: capped logit scale; ``bias``: the pair's bias (None without one).
    """

    fa: torch.Tensor
    fb: torch.Tensor
    all_a: torch.Tensor
    all_b: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    offset: int
    scale: torch.Tensor
    bias: torch.Tensor | None
    n_valid: int


@dataclass(frozen=True)
class PairLoss:
    """A registered contrastive loss: initial log-scale (and bias), and the per-pair loss.

    ``loss(p)`` returns this process's share of the pair's global loss (summed over its rows,
    divided by the global normaliser, so shares add up to the single-process loss).
    """

    init_log_scale: float
    loss: Callable[[PairBatch], torch.Tensor]
    init_bias: float | None = None  # a learnable per-pair bias starting here (SigLIP); None: none


LossFactory = Callable[[LossConfig, Any], PairLoss]
LOSSES: Registry[LossFactory] = Registry("contrastive loss", "modalign.losses")


@LOSSES.register("infonce", NoOptions)
def infonce(cfg: LossConfig, opts: object) -> PairLoss:
    """Symmetric InfoNCE (CLIP); temperature starts at ``loss.init_temperature``."""

    def loss(p: PairBatch) -> torch.Tensor:
        pair_sum = _infonce_sum(p.fa, p.fb, p.all_a, p.all_b, p.rows, p.cols, p.offset, p.scale)
        return pair_sum / (2 * p.n_valid)

    return PairLoss(math.log(1.0 / cfg.init_temperature), loss)


@LOSSES.register("siglip", NoOptions)
def siglip(cfg: LossConfig, opts: object) -> PairLoss:
    """Sigmoid loss (SigLIP); scale/bias start at ``loss.siglip_init_scale``/``_bias``."""

    def loss(p: PairBatch) -> torch.Tensor:
        assert p.bias is not None
        return _siglip_sum(p.fa, p.all_b, p.rows, p.cols, p.offset, p.scale, p.bias) / p.n_valid

    return PairLoss(math.log(cfg.siglip_init_scale), loss, init_bias=cfg.siglip_init_bias)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate (scaled for DDP averaging)
    value: torch.Tensor  # the global loss value of this process's share (detached, for logging)
    per_pair: dict[str, float] = field(default_factory=dict)
    logit_scale: dict[str, float] = field(default_factory=dict)


class ContrastiveLoss(nn.Module):
    """The configured pair loss (:data:`LOSSES`) over the configured pairs
    (:data:`PAIR_POLICIES`), one learnable temperature per pair."""

    def __init__(self, modalities: Sequence[str], cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pairs = select_pairs(modalities, cfg.pairs, cfg.anchor)
        entry = LOSSES.get(cfg.kind, "loss.kind")
        self.pair_loss = entry.factory(cfg, LOSSES.options(cfg.kind, cfg.options, "loss.options"))
        keys = [pair_key(a, b) for a, b in self.pairs]
        init, bias = self.pair_loss.init_log_scale, self.pair_loss.init_bias
        # One-element vectors, not 0-d scalars: FSDP2 (fully_shard) cannot shard 0-d parameters.
        self.log_scale = nn.ParameterDict(
            {
                k: nn.Parameter(torch.tensor([init]), requires_grad=cfg.learn_temperature)
                for k in keys
            }
        )
        self.bias = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor([bias])) for k in keys} if bias is not None else {}
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
            pair_loss = self.pair_loss.loss(
                PairBatch(
                    features[a], features[b], gathered[a], gathered[b], rows, cols, offset,
                    scale, self.bias[key] if key in self.bias else None, n_valid,
                )
            )  # fmt: skip
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
