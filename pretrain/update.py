"""One optimizer update, guarded: clip, check the loss and gradient norm are finite, step.

Nothing is applied when the loss or gradient norm is NaN/inf (:class:`TrainingDiverged` names
the step, the per-pair losses and the last good checkpoint), and non-finite weights are never
written over a good checkpoint or bundle.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from modalign.core.errors import ModalignError
from modalign.pretrain.losses import LossOutput

__all__ = [
    "TrainingDiverged",
    "align_layouts",
    "apply_update",
    "check_finite_weights",
    "clip_and_norm",
]


class TrainingDiverged(ModalignError):
    """The loss or gradient became NaN/inf; the last good checkpoint is kept."""


def apply_update(run: Any, out: LossOutput, loss_value: float, step: int) -> None:
    """Clip, check for divergence, then step optimizer and schedule (nothing applied on NaN)."""
    if not math.isfinite(loss_value):
        diverged(run, f"loss became {loss_value}", step, out)
    norm = clip_and_norm(run)
    # With fp16 the loss scaler owns overflow: it skips that step and lowers the scale.
    if run.accelerator.scaler is None and norm is not None and not math.isfinite(norm):
        diverged(run, f"gradient norm became {norm}", step, out)
    align_layouts(run.optimizer)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.core.loss.clamp_()


def align_layouts(optimizer: Any) -> int:
    """Give every gradient and moment tensor its parameter's memory layout (strides).

    PyTorch's fused AdamW reads parameter, gradient and moments as flat memory. A channels-last
    conv weight (``TimmOptions.channels_last``) next to a contiguous gradient or moment (a
    checkpoint written with the other layout, a backward kernel that returns another layout)
    is refused on CUDA and, on CPU, updated wrong without an error. A copy in the parameter's
    layout costs nothing when the layouts already agree. Returns the tensors re-laid.
    """
    fixed = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = _laid_like(p, p.grad)
                fixed += 1
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == p.shape
                    and value.stride() != p.stride()
                ):
                    state[key] = _laid_like(p, value)
                    fixed += 1
    return fixed


def _laid_like(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype, device=value.device)
    return out.copy_(value)


def clip_and_norm(run: Any) -> float | None:
    """Clip to ``optim.grad_clip`` (0 = off) and return the global gradient norm."""
    params = [p for p in run.core.parameters() if p.requires_grad]
    if run.cfg.optim.grad_clip > 0:
        # Accelerate unscales fp16 gradients before clipping; gradients are already synced.
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.optim.grad_clip)
        return None if norm is None else float(norm)
    if run.accelerator.scaler is not None:
        return None
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def diverged(run: Any, what: str, step: int, out: LossOutput) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    pairs = ", ".join(f"{k}={v:.4g}" for k, v in out.per_pair.items()) or "none"
    raise TrainingDiverged(
        f"{what} at step {step} (per-pair losses: {pairs}); the update was not applied and no "
        f"checkpoint was written for this step. Last good checkpoint: "
        f"{run.last_ckpt or 'none (no checkpoint yet)'}. Lower optim.lr, raise "
        "optim.warmup_steps, use train.precision=fp32, or check the data; then resume with "
        "--resume latest"
    )


def check_finite_weights(run: Any, step: int) -> None:
    """Never write non-finite weights over a good checkpoint or bundle."""
    bad = [n for n, p in run.core.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(
            f"weights became non-finite by step {step} ({', '.join(bad[:3])}...); nothing was "
            f"saved for this step. Last good checkpoint: {run.last_ckpt or 'none'}. Lower optim.lr"
        )
