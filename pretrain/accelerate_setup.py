"""Accelerate setup for a pretraining run: the Accelerator, BatchNorm conversion, compile.

The Accelerator is built inside :func:`modalign.pretrain.process_state.process_state_guard`,
which hands it an empty process-wide Accelerate state, so every run picks its own precision and
device as in a fresh process; nothing here resets Accelerate's singletons by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modalign.core.errors import ConfigError
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.distributed import convert_batchnorm
from modalign.pretrain.engines import adopt_launch_engine, check_engine_options
from modalign.pretrain.model import ContrastiveTask, MultimodalEncoder
from modalign.pretrain.multinode import group_timeout_handler

# train.precision -> Accelerate's mixed_precision name.
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def uses_cpu(cfg: PretrainConfig) -> bool:
    """Whether the run trains on CPU: ``train.device=cpu``, or for ``auto`` the user's
    Accelerate config (``use_cpu``, exported as ``ACCELERATE_USE_CPU``), else no CUDA."""
    from accelerate.utils import parse_flag_from_env

    device = cfg.train.device
    if device == "auto" and parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def resolved_precision(cfg: PretrainConfig) -> str:
    """``train.precision``, or for ``auto`` the mixed precision of the user's Accelerate config
    (``accelerate launch`` exports it as ``ACCELERATE_MIXED_PRECISION``), else ``fp32``."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    named = {v: k for k, v in PRECISIONS.items()}
    if launched not in named:
        raise ConfigError(
            f"the Accelerate config asks for mixed_precision={launched!r}, which modalign does "
            f"not support; set train.precision to one of {sorted(PRECISIONS)}"
        )
    return named[launched]


def check_precision(cfg: PretrainConfig) -> None:
    """Refuse settings Accelerate would silently change, or the launch's engine cannot run
    (:func:`~modalign.pretrain.engines.check_engine_options`); raised before any work starts."""
    check_engine_options(cfg)
    if uses_cpu(cfg) and resolved_precision(cfg) == "fp16":
        # Accelerate silently runs fp16 on CPU as fp32 (no autocast, no scaler): say so instead.
        raise ConfigError(
            "train.precision=fp16 needs a CUDA device (it uses a loss scaler); "
            "on CPU use train.precision=bf16 or fp32"
        )


def make_accelerator(cfg: PretrainConfig, trackers: Sequence[str] = ()) -> Any:
    """An Accelerator for ``cfg.train`` (precision, device; DDP tolerates unused parameters).

    Everything else comes from the user's Accelerate config (``accelerate launch`` exports it
    as ``ACCELERATE_*``/``FSDP_*`` variables): the engine (DDP, FSDP, DeepSpeed, see
    :mod:`~modalign.pretrain.engines`), ``mixed_precision`` while ``train.precision=auto``.
    ``trackers`` (checked by :func:`~modalign.pretrain.run_log.tracker_names`) log under
    ``output.dir`` (TensorBoard: ``output.dir/tensorboard``). ``train.dist_timeout`` is the
    process-group timeout (how long a collective waits for a hung peer).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    check_precision(cfg)
    # Rows may lack a modality for a whole batch; DDP must then tolerate unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    out = Path(cfg.output.dir)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))
    accelerator = Accelerator(
        cpu=uses_cpu(cfg),
        mixed_precision=PRECISIONS[resolved_precision(cfg)],
        kwargs_handlers=[ddp, group_timeout_handler(cfg.train.dist_timeout)],
        log_with=list(trackers) or None,
        project_config=project,
    )
    adopt_launch_engine(accelerator)
    return accelerator


def compile_trunks(encoder: MultimodalEncoder, compilable: Mapping[str, bool]) -> list[str]:
    """``torch.compile`` in place each trunk whose tower declared itself compilable.

    ``Module.compile`` keeps state-dict keys, so checkpoints and bundles stay interchangeable
    with uncompiled runs. Returns the compiled modalities.
    """
    done = []
    for m, trunk in encoder.trunks.items():
        if compilable.get(m, False):
            trunk.compile()
            done.append(m)
    return done


def sync_batchnorm(task: ContrastiveTask, device: torch.device) -> None:
    """Global batch statistics across processes, so N x B equals 1 x N*B."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        task.encoder = convert_sync_batchnorm(task.encoder)
    else:
        convert_batchnorm(task.encoder)
