"""Train state on disk: save and restore ``checkpoints/step-N`` (one protocol: ``atomic_dir``).

A checkpoint holds the weights (safetensors), optimizer / schedule / loss-scaler state and every
process's RNG state (``torch.load(weights_only=True)``-readable), ``run_config.yaml`` and, written
last, ``state.json`` (step, data position in micro-batches, world size, config). Step-dir
helpers (listing, resume resolution, pruning, RNG capture) live in
:mod:`modalign.pretrain.checkpoint`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_dir
from modalign.core.config_io import dump_yaml
from modalign.core.world import world
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.bundle import encoder_state
from modalign.pretrain.config import PretrainConfig
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
    """Write ``out_dir/checkpoints/step-<step>`` on the main process (all processes call it)."""
    final = Path(out_dir) / "checkpoints" / f"step-{step}"
    _rank, world_size = world()
    # Every rank's RNG state is needed to replay augmentation; gather them to the main process.
    rng_all = gather_objects(ckpt.rng_state())
    if state.accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            _write_state_files(state, tmp, cfg, rng_all)
            (tmp / "run_config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
            # Written last: a checkpoint without its state file is never listed as complete.
            (tmp / ckpt.STATE_FILE).write_text(
                json.dumps(
                    {
                        "step": step,
                        "micro_batches": position,
                        "world_size": world_size,
                        "config": dump_yaml(cfg),
                    }
                )
            )
        ckpt.prune_checkpoints(out_dir, cfg.train.keep_checkpoints)
    state.accelerator.wait_for_everyone()
    return final


def _write_state_files(state: TrainState, tmp: Path, cfg: PretrainConfig, rng_all: list) -> None:
    from safetensors.torch import save as safetensors_bytes

    weights = {f"encoder.{k}": v for k, v in encoder_state(state.core.encoder).items()}
    weights.update(
        {
            f"loss.{k}": v.detach().cpu().contiguous()
            for k, v in state.core.loss.state_dict().items()
        }
    )
    # Every file goes through a Python file object: a full disk or an I/O error is then an
    # OSError (errno kept), which atomic_dir reports naming the checkpoint, instead of
    # torch's "inline_container.cc ... unexpected pos" or a silent safetensors failure.
    (tmp / "model.safetensors").write_bytes(safetensors_bytes(weights))
    _save_torch(state.optimizer.state_dict(), tmp / "optimizer.pt")
    _save_torch(state.scheduler.state_dict(), tmp / "scheduler.pt")
    if state.accelerator.scaler is not None:
        _save_torch(state.accelerator.scaler.state_dict(), tmp / "scaler.pt")
    for r, state_r in enumerate(rng_all):
        _save_torch(state_r, tmp / f"rng-{r}.pt")


def _save_torch(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process (a one-element list in a single process)."""
    _rank, size = world()
    if size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def load_checkpoint(path: Path, state: TrainState, accum_steps: int) -> Restored:
    """Restore weights, optimizer, schedule, scaler and this process's RNG from ``path``."""
    from safetensors.torch import load_file

    meta = ckpt.read_state(path)
    weights = load_file(str(path / "model.safetensors"))
    enc = {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}
    loss = {k.removeprefix("loss."): v for k, v in weights.items() if k.startswith("loss.")}
    state.core.encoder.load_state_dict(enc, strict=False)
    state.core.loss.load_state_dict(loss)
    state.optimizer.load_state_dict(ckpt.torch_load(path / "optimizer.pt"))
    state.scheduler.load_state_dict(ckpt.torch_load(path / "scheduler.pt"))
    scaler = state.accelerator.scaler
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(ckpt.torch_load(path / "scaler.pt"))
    rank, _ = world()
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        ckpt.set_rng_state(ckpt.torch_load(rng_file))
    else:
        log.warning("%s has no RNG state for rank %d (world size changed); reseeding", path, rank)
    step = int(meta["step"])
    return Restored(step, int(meta.get("micro_batches", step * accum_steps)))


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
