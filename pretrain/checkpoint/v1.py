"""Reading format-1 checkpoints (written before checkpoints went through ``save_state``).

Layout: ``model.safetensors`` (``encoder.*``, ``loss.*``), ``optimizer.pt``, ``scheduler.pt``,
``scaler.pt`` (fp16), ``rng-<rank>.pt`` (python/numpy/torch/CUDA RNG), all torch files read with
``weights_only=True``; ``state.json`` without ``format``. They hold full, unsharded state, so
they resume under single-process and DDP runs; sharded engines refuse them (exit 2).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.core.world import world
from modalign.pretrain.checkpoint import torch_load

log = logging.getLogger(__name__)


def load_v1(path: Path, state: Any) -> None:
    """Restore weights, optimizer, schedule, scaler and this process's RNG from ``path``."""
    from modalign.pretrain.checkpoint.engine import load_model_file

    load_model_file(state.core, path / "model.safetensors")
    state.optimizer.load_state_dict(torch_load(path / "optimizer.pt"))
    _fit_moments(state.optimizer)
    state.scheduler.load_state_dict(torch_load(path / "scheduler.pt"))
    scaler = state.accelerator.scaler
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch_load(path / "scaler.pt"))
    rank, _ = world()
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch_load(rng_file))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed); reseeding", path, rank)


def _fit_moments(optimizer: Any) -> None:
    """Format 1 had 0-d temperatures (now 1-element vectors): reshape their optimizer state."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            entries = optimizer.state.get(p, {})
            for key, value in entries.items():
                fits = torch.is_tensor(value) and value.numel() == p.numel() and key != "step"
                if fits and value.shape != p.shape:
                    entries[key] = value.reshape(p.shape)


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the RNG states of a format-1 ``rng-<rank>.pt``."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
