"""Leave the process as found: one guard every public entry point can wrap.

Notebooks, ``modalign tune``, the server and the test suite call the library many times in one
Python process. Each call must behave as in a fresh process and leave nothing behind, also when
it raises. :func:`process_state_guard` snapshots every process-wide setting a run may touch and
restores it on exit:

* torch intra-op thread count, default dtype, grad mode, deterministic-algorithms flag;
* RNG states (python ``random``, numpy's global generator, torch CPU and CUDA);
* autocast: enabled flag and dtype per device, the cache flag, and the autocast weight cache
  (cleared: entries are keyed by tensor address and must never outlive the run that made them);
* Accelerate's process-wide singletons (``AcceleratorState``, ``GradientState``): the run starts
  from an empty state (as in a fresh process, so it may pick its own precision and device), and
  the caller's state is put back afterwards. ``PartialState`` (process group, device) is kept:
  it describes the launch, not the run;
* float32 matmul precision and the TF32 flags; whether oneDNN (``torch.backends.mkldnn``) is on;
* environment variables (libraries set e.g. ``KMP_INIT_AT_FORK`` or ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["ProcessState", "process_state_guard"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass
class ProcessState:
    """A snapshot of the process-wide settings a run may change (see module docstring)."""

    threads: int
    default_dtype: torch.dtype
    grad: bool
    deterministic: bool
    deterministic_warn_only: bool
    python_rng: Any
    numpy_rng: Any
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    autocast: dict[str, tuple[bool, torch.dtype]]
    autocast_cache: bool
    matmul: tuple[str, bool, bool]  # float32 matmul precision, cuda matmul / cudnn allow_tf32
    environ: dict[str, str]
    mkldnn: bool = True

    @classmethod
    def capture(cls) -> ProcessState:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(
            threads=torch.get_num_threads(),
            default_dtype=torch.get_default_dtype(),
            grad=torch.is_grad_enabled(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            deterministic_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
            python_rng=random.getstate(),
            numpy_rng=np.random.get_state(),
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if cuda else None,
            autocast={
                d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                for d in _AUTOCAST_DEVICES
            },
            autocast_cache=torch.is_autocast_cache_enabled(),
            matmul=(
                torch.get_float32_matmul_precision(),
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
            ),
            environ=dict(os.environ),
            mkldnn=torch.backends.mkldnn.enabled,  # type: ignore[arg-type]  # a bool (ContextProp)
        )

    def restore(self) -> None:
        """Put every captured setting back."""
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(self.grad)
        torch.use_deterministic_algorithms(
            self.deterministic, warn_only=self.deterministic_warn_only
        )
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        for device, (enabled, dtype) in self.autocast.items():
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_autocast_cache_enabled(self.autocast_cache)
        if self.matmul != (
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ):  # Accelerate turns TF32 on for dynamo fp32 runs on CUDA
            torch.set_float32_matmul_precision(self.matmul[0])
            torch.backends.cuda.matmul.allow_tf32 = self.matmul[1]
            torch.backends.cudnn.allow_tf32 = self.matmul[2]
        _restore_environ(self.environ)
        if torch.backends.mkldnn.enabled != self.mkldnn:
            torch.backends.mkldnn.enabled = self.mkldnn  # type: ignore[assignment]  # torch types the flag as its ContextProp; it is a bool

    def differences(self, other: ProcessState) -> list[str]:
        """Names of the settings that differ from ``other`` (for tests and diagnostics)."""
        out = []
        for name in ("threads", "default_dtype", "grad", "deterministic", "autocast", "matmul",
                     "mkldnn"):  # fmt: skip
            if getattr(self, name) != getattr(other, name):
                out.append(name)
        if self.autocast_cache != other.autocast_cache:
            out.append("autocast_cache")
        if self.environ != other.environ:
            out.append("environ")
        if not torch.equal(self.torch_rng, other.torch_rng):
            out.append("torch_rng")
        if self.python_rng != other.python_rng:
            out.append("python_rng")
        a, b = self.numpy_rng, other.numpy_rng
        if a[0] != b[0] or not np.array_equal(a[1], b[1]) or tuple(a[2:]) != tuple(b[2:]):
            out.append("numpy_rng")
        return out


def _restore_environ(saved: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _autocast_nesting() -> int:
    """Current autocast nesting depth (torch exposes it only through inc/dec)."""
    depth = torch.autocast_decrement_nesting()
    torch.autocast_increment_nesting()
    return depth + 1


@contextmanager
def _fresh_accelerate_state() -> Iterator[None]:
    """Empty Accelerate singletons inside, the caller's own ones (same dict objects) outside.

    Accelerate keeps ``AcceleratorState``/``GradientState`` in class-level dicts that every
    instance shares *by identity* (``self.__dict__ = _shared_state``); clearing them by hand
    mid-process mutates the state of every earlier Accelerator as well. Here the contents are
    set aside and put back into the same dict objects, so nothing outlives the run.
    """
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:  # accelerate is a dependency; without it there is nothing to guard
        yield
        return
    shared = [AcceleratorState._shared_state, GradientState._shared_state]
    saved = [dict(d) for d in shared]
    for d in shared:
        d.clear()
    try:
        yield
    finally:
        for d, before in zip(shared, saved):
            d.clear()
            d.update(before)


@contextmanager
def process_state_guard() -> Iterator[ProcessState]:
    """Run the body as in a fresh process and restore every process-wide setting afterwards.

    Yields the captured :class:`ProcessState`. Re-entrant (an inner guard restores to what the
    outer one left). Use around any public entry point::

        with process_state_guard():
            return _pretrain(cfg)
    """
    before = ProcessState.capture()
    outermost_autocast = _autocast_nesting() == 0
    try:
        with _fresh_accelerate_state():
            yield before
    finally:
        if outermost_autocast:
            # Cast weights cached by autocast regions of this run are keyed by tensor address;
            # a later run must never find them (torch clears only when a region exits to 0).
            torch.clear_autocast_cache()
        before.restore()
