"""Atomic checkpoints: ``checkpoints/step-N/`` appears complete or not at all.

Written into a temp dir beside it, fsynced, then renamed; the previous checkpoint stays valid
if the process dies mid-write. Nothing is unpickled on load: weights are safetensors, the
optimizer/RNG state is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.core.errors import UserInputError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a state file), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """``resume`` = "latest" (None if the run has no checkpoint yet) or a checkpoint path."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserInputError(f"--resume {resume}: not a complete checkpoint dir (no {STATE_FILE})")
    return path


def remove_stale_temp_dirs(run_dir: Path) -> list[Path]:
    """Delete half-written temp dirs left by a run killed mid-write (call before training).

    They are never mistaken for checkpoints (``list_checkpoints`` only lists ``step-N`` with a
    state file), but would pile up on disk. Returns what was removed.
    """
    removed = []
    for parent in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not parent.is_dir():
            continue
        for d in parent.iterdir():
            if d.is_dir() and d.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step touches, as tensors/lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{path / STATE_FILE}: unreadable checkpoint state ({exc})") from None


def torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)
