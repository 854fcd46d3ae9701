"""Collectives for contrastive losses across processes.

``accelerator.gather`` (and ``dist.all_gather``) carry no gradient, so features from other
processes would act as constants and the loss would differ from the single-process one. The
autograd all-gather below sums the incoming gradients in backward, which makes the multi-process
loss and gradients equal to one process holding the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every process used all rows; a row's gradient is the sum over processes. all_reduce
        # works on every backend (gloo has no reduce_scatter).
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0 (equal sizes), differentiably."""
    _, size = world()
    if size == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0 (masks, counts)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over processes (for logging only)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / size


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSumWithGrad.apply(x) if world()[1] > 1 else x


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all processes (any backend, CPU included).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; without synchronised statistics,
    2 processes x B would not equal 1 process x 2B. Two-pass mean/variance with differentiable
    all-reduces; also carries timm's ``BatchNormAct2d`` activation and dropout.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world()[1] > 1):
            return super().forward(x)  # timm BatchNormAct2d applies its act/drop in there
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local_count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype)
        count = all_reduce_sum_with_grad(local_count)
        mean = all_reduce_sum_with_grad(x.sum(dim=dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum_with_grad(centred.square().sum(dim=dims)) / count
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return self._post(y)

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "drop"):
            y = self.drop(y)
        if hasattr(self, "act"):
            y = self.act(y)
        return y


def convert_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every BatchNorm for :class:`GlobalBatchNorm` in place (keeps state, act, drop)."""
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            bn, GlobalBatchNorm
        ):
            original = type(bn)
            bn.__class__ = type(f"Global{original.__name__}", (GlobalBatchNorm, original), {})
    return module
