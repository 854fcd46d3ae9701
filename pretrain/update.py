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

__all__ = ["TrainingDiverged", "apply_update", "check_finite_weights", "clip_and_norm"]


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
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.core.loss.clamp_()


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
