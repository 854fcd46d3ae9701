"""The engine's part of a checkpoint: ``accelerator.save_state`` / ``load_state`` on every process.

What each engine writes into the checkpoint's temp dir (format 2):

* every engine: ``optimizer.bin`` (or FSDP's below), ``random_states_<rank>.pkl`` (python, numpy,
  torch, CUDA RNG; one per process), ``scaler.pt`` with fp16 -- Accelerate's ``torch.save``
  files, which it reads back with ``torch.load(weights_only=True)``;
* single process and DDP: ``model.safetensors``, written by modalign through Accelerate's
  save-state hook (the keys of format 1: ``encoder.*`` without referenced external trunks,
  ``loss.*``), so checkpoints stay world-size independent and small;
* FSDP: ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` (``SHARDED_STATE_DICT``: torch DCP
  folders, one shard file per process, checked by :mod:`.safe_pickle` before loading) or
  ``pytorch_model_fsdp_0.bin`` / ``optimizer_0.bin`` (``FULL_STATE_DICT``, ``weights_only``);
* DeepSpeed: its own ``pytorch_model/`` folder (``model.save_checkpoint``), not tested here.

The LR schedule is not prepared by Accelerate (its wrapper steps once per process); modalign
writes it as ``scheduler.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modalign.core.errors import UserInputError

MODEL_FILE = "model.safetensors"
SCHEDULER_FILE = "scheduler.json"

__all__ = ["load_engine_state", "load_model_file", "save_engine_state", "scheduler_state"]


def save_engine_state(state: Any, tmp: Path) -> None:
    """Every process: ``accelerator.save_state(tmp)`` (each writes its own files into ``tmp``)."""
    accelerator = state.accelerator
    handle = accelerator.register_save_state_pre_hook(_model_writer(state))
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        handle.remove()


def load_engine_state(state: Any, path: Path) -> None:
    """Every process: ``accelerator.load_state(path)`` (model, optimizer, scaler, its RNG)."""
    accelerator = state.accelerator
    handle = accelerator.register_load_state_pre_hook(_model_reader(state, path))
    try:
        accelerator.load_state(str(path))
    finally:
        handle.remove()
    state.scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text("utf-8")))


def scheduler_state(scheduler: Any) -> str:
    """The LR schedule's state as strict JSON (numbers round-trip exactly)."""
    return json.dumps(scheduler.state_dict(), allow_nan=False)


def _model_writer(state: Any) -> Any:
    """Save-state hook: unsharded engines hand over the model state dicts; write modalign's
    ``model.safetensors`` instead (main process) and take them off Accelerate's list."""

    def hook(models: list, weights: list, output_dir: str) -> None:
        if weights and state.accelerator.is_main_process:
            from safetensors.torch import save

            # Bytes through a Python file: a full disk is an OSError (errno kept), where
            # safetensors' own file writer can fail silently.
            (Path(output_dir) / MODEL_FILE).write_bytes(save(model_weights(state.core)))
        weights.clear()

    return hook


def _model_reader(state: Any, path: Path) -> Any:
    """Load-state hook: unsharded engines read modalign's ``model.safetensors``."""

    def hook(models: list, input_dir: str) -> None:
        if models:
            load_model_file(state.core, path / MODEL_FILE)
            models.clear()

    return hook


def model_weights(core: Any) -> dict[str, torch.Tensor]:
    """``encoder.*`` (without referenced external trunks) and ``loss.*`` tensors, on CPU."""
    from modalign.pretrain.bundle import encoder_state

    weights = {f"encoder.{k}": v for k, v in encoder_state(core.encoder).items()}
    weights.update(
        {f"loss.{k}": v.detach().cpu().contiguous() for k, v in core.loss.state_dict().items()}
    )
    return weights


def load_model_file(core: Any, file: Path) -> None:
    """Load ``model_weights``' file into ``core``; every stored key must fit (exit 2 if not)."""
    from safetensors.torch import load_file

    if not file.is_file():
        raise UserInputError(
            f"{file}: missing; this checkpoint was written by a sharded engine (FSDP/DeepSpeed): "
            "resume it with the same Accelerate config"
        )
    weights = load_file(str(file))
    own = {f"encoder.{k}": v for k, v in core.encoder.state_dict().items()}
    own.update({f"loss.{k}": v for k, v in core.loss.state_dict().items()})
    bad = sorted(k for k, v in weights.items() if k not in own or own[k].numel() != v.numel())
    bad += sorted(f"{k} (missing)" for k in model_weights(core).keys() - weights.keys())
    if bad:
        raise UserInputError(f"{file}: tensors that do not fit this model: {', '.join(bad[:5])}")
    with torch.no_grad():
        for key, value in weights.items():  # 0-d temperatures of format 1 fit the 1-d ones
            own[key].copy_(value.reshape(own[key].shape))
