"""Float tolerances that follow from the computation, not from one machine's kernels.

Two kernels for the same network (channels-last vs plain, oneDNN vs PyTorch's own, another
CPU's SIMD width) sum each dot product in another order. Each layer with fan-in ``K`` then
differs by rounding of about ``sqrt(K) * u * |x|`` (``u``: unit roundoff, Higham & Mary's
probabilistic bound), with a confidence factor ``lambda`` (the bound fails with probability
below ``2 exp(-lambda**2 / 2)`` per dot product). Through a stack of (normalised) layers the
per-layer errors add up, so a whole network's outputs differ by at most
``lambda * u * sum_l sqrt(K_l) * max|out|``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

CONFIDENCE = 8.0  # lambda: P(a dot product exceeds the bound) < 2 exp(-32) ~ 3e-14


def fan_ins(module: nn.Module) -> list[int]:
    """Dot-product length of every weighted layer (conv: C_in/groups * kh * kw; linear: C_in)."""
    return [
        int(m.weight[0].numel())
        for m in module.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]


def rounding_tolerance(module: nn.Module, reference: torch.Tensor) -> dict[str, Any]:
    """``rtol``/``atol`` for :func:`torch.testing.assert_close` between two kernel paths of
    ``module`` whose reference output is ``reference`` (size and magnitude of the computation)."""
    u = torch.finfo(reference.dtype).eps / 2
    rel = CONFIDENCE * u * sum(math.sqrt(k) for k in fan_ins(module))
    scale = float(reference.detach().abs().max())
    return {"rtol": rel, "atol": rel * max(scale, torch.finfo(reference.dtype).tiny)}
