"""Train state on disk: save and restore ``checkpoints/step-N`` (one protocol: ``atomic_dir``).

Save (every process calls :func:`save_checkpoint`): the main process opens the atomic temp dir
beside ``checkpoints/step-N`` and sends its path to the others; every process writes its part
with ``accelerator.save_state`` (:mod:`.engine_state`: shards, its RNG state); all processes
agree that each part was written; the main process adds ``scheduler.json``, ``run_config.yaml``
and, last, ``state.json`` (format 2: step, data position in micro-batches, world size, engine,
config, sha256 of every other file), then fsyncs and renames the dir into place. A failure on
any process fails every process and removes the temp dir; the previous checkpoint stays valid.

Load: the main process checks every file against ``state.json`` and the pickles of DCP folders
(:mod:`.safe_pickle`), then every process reads its part with ``accelerator.load_state``.
Format 1 checkpoints are read by :mod:`.checkpoint_v1`. Step-dir helpers (listing, resume
resolution, pruning) live in :mod:`.checkpoint`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.artifact import ArtifactWriteError, atomic_dir
from modalign.core.config_io import dump_yaml
from modalign.core.errors import ModalignError, UserInputError
from modalign.core.world import world
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.checkpoint.engine import (
    SCHEDULER_FILE,
    load_engine_state,
    save_engine_state,
    scheduler_state,
)
from modalign.pretrain.checkpoint.safe_pickle import check_dcp_pickles
from modalign.pretrain.checkpoint.v1 import load_v1
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.engines import engine_name, is_sharded
from modalign.pretrain.model import ContrastiveTask

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The mutable objects a checkpoint saves and restores."""

    core: ContrastiveTask
    optimizer: Any
    scheduler: Any
    accelerator: Any


@dataclass
class Restored:
    """Where a restored run continues."""

    step: int
    position: int  # data position in micro-batches


def save_checkpoint(
    state: TrainState, out_dir: Path, cfg: PretrainConfig, step: int, position: int
) -> Path:
    """Write ``out_dir/checkpoints/step-<step>`` (every process calls it; see module doc)."""
    final = Path(out_dir) / "checkpoints" / f"step-{step}"
    main = state.accelerator.is_main_process
    failure: Exception | None = None
    try:
        with atomic_dir(final) if main else nullcontext() as staged:
            tmp = Path(from_main(str(staged) if main else ""))
            agree(attempt(_write_state_files, state, tmp, cfg), final)
            if main:
                _write_meta(state, tmp, cfg, step, position)
    except Exception as exc:  # every process must hear of it, or the others would wait
        failure = exc
    agree(failure, final)
    if main:
        ckpt.prune_checkpoints(out_dir, cfg.train.keep_checkpoints)
    state.accelerator.wait_for_everyone()
    return final


def _write_state_files(state: TrainState, tmp: Path, cfg: PretrainConfig) -> None:
    """Every process: its ``save_state`` files; the main process: the LR schedule."""
    try:
        save_engine_state(state, tmp)
    except RuntimeError as exc:  # torch's file writer reports a full disk without an errno
        # An OSError: atomic_dir names the checkpoint and says nothing was replaced.
        raise ArtifactWriteError(
            f"accelerator.save_state failed: {exc}; torch's file writer keeps no OS error, "
            "a full disk looks like this"
        ) from exc
    if state.accelerator.is_main_process:
        (tmp / SCHEDULER_FILE).write_text(scheduler_state(state.scheduler), encoding="utf-8")


def _write_meta(
    state: TrainState, tmp: Path, cfg: PretrainConfig, step: int, position: int
) -> None:
    (tmp / "run_config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    meta = {
        "format": ckpt.FORMAT,
        "format_version": ckpt.FORMAT_VERSION,
        "step": step,
        "micro_batches": position,
        "world_size": world()[1],
        "engine": engine_name(state.accelerator),
        "sharded": is_sharded(state.accelerator),
        "config": dump_yaml(cfg),
        "files": ckpt.file_manifest(tmp),
    }
    # Written last: a checkpoint without its state file is never listed as complete.
    (tmp / ckpt.STATE_FILE).write_text(json.dumps(meta), encoding="utf-8")


def load_checkpoint(path: Path, state: TrainState, accum_steps: int) -> Restored:
    """Restore weights, optimizer, schedule, scaler and this process's RNG from ``path``."""
    meta = ckpt.read_state(path)
    main = state.accelerator.is_main_process
    agree(attempt(_check_readable, path, meta, state) if main else None, path)
    _LOADERS[meta["format_version"]](Path(path), meta, state)
    step = int(meta["step"])
    return Restored(step, int(meta.get("micro_batches", step * accum_steps)))


def _check_readable(path: Path, meta: dict[str, Any], state: TrainState) -> None:
    """Hashes, pickles and engine of ``path`` fit this run (main process; exit 2 if not)."""
    ckpt.verify_checkpoint(path, meta)
    check_dcp_pickles(path)
    was = meta.get("engine", "NO") if meta.get("sharded", False) else "an unsharded engine"
    if bool(meta.get("sharded", False)) != is_sharded(state.accelerator):
        raise UserInputError(
            f"--resume {path}: written by {was}, but this run uses "
            f"{engine_name(state.accelerator)}; resume with the Accelerate config it was "
            "written with (the same engine)"
        )


def _load_v2(path: Path, meta: dict[str, Any], state: TrainState) -> None:
    rank, _ = world()
    if not (path / f"random_states_{rank}.pkl").is_file():
        log.warning("%s has no RNG state for rank %d (world size changed); reseeding", path, rank)
    load_engine_state(state, path)


def _load_v1(path: Path, meta: dict[str, Any], state: TrainState) -> None:
    load_v1(path, state)


# format_version -> reader
_LOADERS: dict[int, Callable[[Path, dict[str, Any], TrainState], None]] = {
    1: _load_v1,
    2: _load_v2,
}


def attempt(fn: Callable[..., Any], *args: Any) -> Exception | None:
    """Run ``fn(*args)``; the exception it raised, or None."""
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def agree(failure: Exception | None, what: Path) -> None:
    """Raise on every process if any process failed (its own error where it failed)."""
    errors = gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, error = failed[0]
        raise ModalignError(f"{what}: process {rank} failed ({error}); see its log")


def from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    _rank, size = world()
    if size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process (a one-element list in a single process)."""
    _rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


# Settings a checkpoint cannot be resumed under: they change which parameters exist.
FIXED_ON_RESUME = ("model.modalities", "model.embed_dim", "model.towers", "loss.kind", "loss.pairs")


def config_changes(path: Path, cfg: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (checkpoint value, new value)}`` for every setting that differs."""
    import yaml

    from modalign.core.config_io import to_dict

    old = yaml.safe_load(ckpt.read_state(path).get("config") or "{}") or {}
    return {
        k: (v_old, v_new)
        for k, v_old, v_new in _diff(_flatten(old), _flatten(to_dict(cfg)))
        if not k.startswith("output.")
    }


def check_resume_config(path: Path, cfg: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """Refuse (exit 2) a resume whose config changes what the checkpoint holds; warn, naming
    each key, about changes that can be resumed (``optim.lr``, ``train.steps``...)."""
    from modalign.core.errors import UserInputError

    changes = config_changes(path, cfg)
    fixed = {k: v for k, v in changes.items() if k.startswith(FIXED_ON_RESUME)}
    if fixed:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(fixed.items()))
        raise UserInputError(
            f"--resume {path}: the config changes what this checkpoint holds ({what}); "
            "resume with the checkpoint's settings, or start a new run in another output.dir"
        )
    for k, (a, b) in sorted(changes.items()):
        log.warning("resuming %s with %s changed: %r -> %r", path, k, a, b)
    return changes


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [
        (k, old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    ]
