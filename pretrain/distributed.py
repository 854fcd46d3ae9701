"""Collectives for contrastive losses across processes.

``accelerator.gather`` (and ``dist.all_gather``) carry no gradient, so features from other
processes would act as constants and the loss would differ from the single-process one. The
autograd all-gather below sums the incoming gradients in backward, which makes the multi-process
loss and gradients equal to one process holding the whole global batch.

Processes may hold different numbers of rows (a bad item dropped at collation on one rank):
every gather first exchanges the row counts and pads to the largest, so no collective ever sees
mismatched shapes.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist

from modalign.core.world import world


def all_sizes(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """Row count of every process, in rank order (``[rows]`` for one process)."""
    _, size = world()
    if size == 1:
        return [rows]
    local = torch.tensor([rows], dtype=torch.long, device=device)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local)
    return [int(p.item()) for p in parts]


def rank_offset(sizes: list[int]) -> int:
    """Index of this process's first row in the gathered (rank-ordered) batch."""
    rank, _ = world()
    return sum(sizes[:rank])


def _all_gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate ``x`` (this rank's ``sizes[rank]`` rows) from all ranks, in rank order."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.lo = rank_offset(sizes)
        ctx.hi = ctx.lo + x.shape[0]
        return _all_gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every process used all rows; a row's gradient is the sum over processes. all_reduce
        # works on every backend (gloo has no reduce_scatter).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.lo : ctx.hi], None


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0, differentiably.

    ``sizes`` (every rank's row count, from :func:`all_sizes`) saves one collective when known.
    """
    _, size = world()
    if size == 1:
        return x
    sizes = sizes if sizes is not None else all_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from all processes along dim 0 (masks, counts)."""
    _, size = world()
    if size == 1:
        return x
    sizes = sizes if sizes is not None else all_sizes(x.shape[0], x.device)
    if x.dtype == torch.bool:  # gloo cannot all_gather bool tensors
        return _all_gather_padded(x.to(torch.uint8), sizes).to(torch.bool)
    return _all_gather_padded(x, sizes)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over processes (for logging only)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / size


def all_reduce_min(value: int, device: torch.device | str = "cpu") -> int:
    """Smallest of an integer over processes (e.g. "does every rank have rows?").

    ``device``: where the collective runs (NCCL needs CUDA tensors).
    """
    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # y = sum_p x_p is used by every process's loss, so dL/dx_r = sum_p dL_p/dy.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes whose backward matches the local-loss form (see module doc)."""
    return _AllReduceSumWithGrad.apply(x) if world()[1] > 1 else x


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all processes (any backend, CPU included).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; without synchronised statistics,
    2 processes x B would not equal 1 process x 2B. Two-pass mean/variance with differentiable
    all-reduces, computed in at least float32; running statistics are updated
    exactly as ``nn.BatchNorm`` would with the global batch. Also carries timm's
    ``BatchNormAct2d`` dropout and activation.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world()[1] > 1):
            return super().forward(x)  # timm BatchNormAct2d applies its act/drop in there
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Statistics in at least float32: bf16/fp16 sums lose digits; float64 stays float64.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        local_count = torch.tensor(float(x.numel() // x.shape[1]), dtype=xf.dtype, device=x.device)
        count = all_reduce_sum_with_grad(local_count)
        mean = all_reduce_sum_with_grad(xf.sum(dim=dims)) / count
        centred = xf - mean.view(shape)
        var = all_reduce_sum_with_grad(centred.square().sum(dim=dims)) / count
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return self._post(y.to(x.dtype))

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        if (
            self.num_batches_tracked is None
            or self.running_mean is None
            or self.running_var is None
        ):
            raise RuntimeError("GlobalBatchNorm: running statistics need track_running_stats=True")
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * count / (count - 1).clamp(min=1)  # nn.BatchNorm stores unbiased var
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        # timm BatchNormAct2d: normalise, then drop, then act (same order as its forward).
        if hasattr(self, "drop"):
            y = cast(torch.nn.Module, self.drop)(y)
        if hasattr(self, "act"):
            y = cast(torch.nn.Module, self.act)(y)
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
