"""Checkpoint directories: listing, resume resolution, pruning, the state file and its manifest.

``checkpoints/step-N/`` appears complete or not at all (:func:`modalign.core.artifact.atomic_dir`:
a temp dir beside it, fsynced, renamed). ``state.json`` is written last and lists the sha256 of
every other file (:func:`file_manifest`), which :func:`verify_checkpoint` checks before anything
is read. Format 2 (``format: modalign.checkpoint``) holds what ``accelerator.save_state`` writes;
format 1 (no ``format`` key, modalign <= 0.2 before engines) is still read by
:mod:`modalign.pretrain.checkpoint.v1`. Nothing is unpickled without a check: see
:mod:`modalign.pretrain.checkpoint.safe_pickle`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from modalign.core.artifact import sha256_file, verify_files
from modalign.core.errors import UserInputError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"
FORMAT = "modalign.checkpoint"
FORMAT_VERSION = 2  # 2: accelerator.save_state layout (+ engine, files); 1: modalign's own files


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
    """Delete all but the newest ``keep`` checkpoints (0 keeps all)."""
    for _, path in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """``path/state.json`` with ``format_version`` filled in (1 for the unversioned format).

    Unreadable, another format, or newer than this modalign reads -> :class:`UserInputError`.
    """
    file = Path(path) / STATE_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{file}: unreadable checkpoint state ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format", FORMAT) != FORMAT:
        raise UserInputError(f"{file}: not a modalign checkpoint state file ({FORMAT})")
    version = meta.setdefault("format_version", 1)
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise UserInputError(
            f"{file}: checkpoint format version {version!r} is not one this modalign reads "
            f"(1..{FORMAT_VERSION}); resume it with the modalign that wrote it, or upgrade"
        )
    return meta


def file_manifest(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``directory`` but the state file."""
    root = Path(directory)
    return {
        f.relative_to(root).as_posix(): sha256_file(f)
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.relative_to(root).as_posix() != STATE_FILE
    }


def verify_checkpoint(path: Path, meta: dict[str, Any]) -> None:
    """Every file the state file lists is there with its sha256 (torn or edited -> exit 2)."""
    verify_files(path, meta, "checkpoint")


def torch_load(path: Path) -> Any:
    """A torch file read with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
