"""bf16 on CPUs with native bf16 instructions: route the training step off oneDNN.

On CPUs whose instruction set has native bf16 (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
``bf16``), PyTorch sends bf16 convolutions and matmuls under autocast to oneDNN's native-bf16
kernels. There, a tiny bf16 run gave different weights in fresh processes and often stopped with
``gradient norm became inf`` (cf. pytorch #163347), while with ``torch.backends.mkldnn`` off every
run was bit-identical and none diverged. A CPU without native bf16 never takes that path.

:func:`bf16_step_route` therefore turns oneDNN off for the training step (forward, backward,
update) of a bf16 run on such a CPU, so it runs PyTorch's own kernels (slower, reproducible).
The CPU is recognised by the flags it reports (``/proc/cpuinfo``), never by its model name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["NATIVE_BF16_FLAGS", "bf16_step_route", "cpu_flags", "has_native_bf16", "needs_route"]

# CPU feature flags (as /proc/cpuinfo spells them) that make oneDNN pick native-bf16 kernels.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (text of ``/proc/cpuinfo``; read from
    the system when None). x86 lists them under ``flags``, Arm under ``Features``. Empty where
    the file does not exist (non-Linux systems)."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def has_native_bf16() -> bool:
    """Whether this machine's CPU reports a native-bf16 instruction set flag."""
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def needs_route(
    device: torch.device, mixed_precision: str, native_bf16: bool | None = None
) -> bool:
    """True for a bf16 step on the CPU of a machine with native bf16 (``native_bf16``: the
    machine's answer, :func:`has_native_bf16`, unless given)."""
    if device.type != "cpu" or mixed_precision != "bf16":
        return False
    return has_native_bf16() if native_bf16 is None else native_bf16


@contextmanager
def bf16_step_route(device: torch.device, mixed_precision: str) -> Iterator[bool]:
    """Inside, a bf16 CPU step on a native-bf16 CPU runs without oneDNN (yields True then);
    elsewhere nothing changes (yields False). The flag is restored on exit, also on errors."""
    if not needs_route(device, mixed_precision):
        yield False
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # torch types the flag as its ContextProp; it is a bool
    try:
        yield True
    finally:
        torch.backends.mkldnn.enabled = before
