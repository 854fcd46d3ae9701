"""Distributed engines: the one the user's Accelerate config asks for, and what it means here.

``accelerate config`` / ``accelerate launch --config_file F`` (or ``--use_fsdp``,
``--use_deepspeed``, ``--mixed_precision``) export the choice as ``ACCELERATE_*`` / ``FSDP_*``
environment variables, which ``Accelerator()`` reads. modalign passes only what the run's YAML
sets (``train.precision`` other than ``auto``, ``train.device``), so the rest of the user's
config is honoured. Two gaps of Accelerate 1.x are closed here instead of silently training
another way:

* on CPU (``train.device=cpu``, or no CUDA), Accelerate ignores an FSDP config and wraps the
  model in DDP; :func:`adopt_launch_engine` puts FSDP back (FSDP2 ``fully_shard`` runs on
  gloo), so ``accelerate launch --use_fsdp --fsdp_version 2`` shards on CPU as it does on GPUs;
* a DeepSpeed config on CPU would likewise be dropped: refused, naming the fix.

An engine is *sharded* (FSDP, DeepSpeed) when the processes hold parts of the train state and
``accelerator.save_state`` writes the engine's own checkpoint layout, one part per process;
full weights then exist only after a collective gather (:func:`full_model_state`).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from modalign.core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "SHARDED",
    "adopt_launch_engine",
    "check_engine_options",
    "engine_name",
    "full_model_state",
    "is_sharded",
    "requested_engine",
]

# Accelerate DistributedType values whose processes hold parts of the train state.
SHARDED = frozenset({"FSDP", "DEEPSPEED"})
# Launch flag (environment variable) -> the DistributedType it asks for.
_REQUESTS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}


def requested_engine() -> str | None:
    """The sharded engine the launch's Accelerate config asks for ("FSDP", "DEEPSPEED"), if any."""
    from accelerate.utils import parse_flag_from_env

    wanted = [engine for flag, engine in _REQUESTS.items() if parse_flag_from_env(flag)]
    return wanted[0] if wanted else None


def engine_name(accelerator: Any) -> str:
    """The engine this run trains with: Accelerate's ``DistributedType`` value (``NO``,
    ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``...)."""
    return str(accelerator.distributed_type.value)


def is_sharded(accelerator: Any) -> bool:
    """Whether the engine shards the train state and saves its own layout (FSDP, DeepSpeed)."""
    return engine_name(accelerator) in SHARDED


def check_engine_options(cfg: Any) -> None:
    """Refuse (exit 2, before any work) settings a sharded engine cannot run as tested."""
    wanted = requested_engine()
    if wanted is None:
        return
    if wanted == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "the Accelerate config asks for DeepSpeed, which is not installed (modalign does not "
            "depend on it): pip install deepspeed, or launch with another engine (FSDP, DDP)"
        )
    if cfg.train.accum_steps > 1:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps} with {wanted}: the cached-gradient "
            "accumulation reduces gradients by hand, which sharded parameters do not allow; "
            "use train.accum_steps=1 (raise train.batch_size or the number of processes)"
        )
    if cfg.train.val_every > 0:
        raise ConfigError(
            f"train.val_every={cfg.train.val_every} with {wanted}: validation runs the encoder "
            "on the main process only, and sharded weights need every process; set "
            "train.val_every=0 and run `modalign evaluate retrieval` on the bundle"
        )
    if cfg.train.frozen_towers == "loader":
        raise ConfigError(
            f"train.frozen_towers=loader with {wanted}: the loader workers need whole frozen "
            "towers, and this engine shards them; set train.frozen_towers=step (or auto)"
        )
    adapted = [m for m in cfg.model.modalities if cfg.model.towers[m].adapter.kind]
    if adapted:
        raise ConfigError(
            f"model.towers.{adapted[0]}.adapter with {wanted}: adapted towers (peft) are trained "
            "and saved unsharded only (a bundle stores just the adapter tensors, which a sharded "
            "state dict does not single out); drop the adapter or launch with DDP / one process "
            "(an adapter's train state is small enough not to need sharding)"
        )


def adopt_launch_engine(accelerator: Any) -> None:
    """Make ``accelerator`` train with the engine the launch asked for, or refuse (exit 2).

    Accelerate drops an FSDP or DeepSpeed config on CPU and trains with DDP instead; FSDP is put
    back here (torch FSDP2 runs on gloo), DeepSpeed is refused.
    """
    wanted = requested_engine()
    actual = engine_name(accelerator)
    if wanted == "FSDP" and actual in ("MULTI_CPU", "FSDP") and accelerator.device.type == "cpu":
        _cpu_fsdp(accelerator)  # also when an earlier run in this process left FSDP behind
    elif wanted is not None and actual == "NO":
        log.warning(
            "the Accelerate config asks for %s but this run has one process not started by "
            "`accelerate launch`; training without %s",
            wanted,
            wanted,
        )
    elif wanted is not None and actual != wanted:
        raise ConfigError(
            f"the Accelerate config asks for {wanted}, but Accelerate set up {actual} on "
            f"{accelerator.device.type} ({wanted} is not available there); use a CUDA device, "
            "or launch without it (`accelerate launch --multi_gpu ...` gives DDP on CPU too)"
        )
    if engine_name(accelerator) == "FSDP":
        _build_on_every_process(accelerator.state.fsdp_plugin)


def _build_on_every_process(plugin: Any) -> None:
    """Turn off ``cpu_ram_efficient_loading`` (``accelerate launch``'s default).

    It loads weights on rank 0 only and broadcasts them; modalign builds every tower on every
    process from the same seed and weight files, so it changes nothing here, and Accelerate
    1.15's FSDP2 version of it fails on models with BatchNorm buffers ("'Tensor' object has no
    attribute 'device_mesh'").
    """
    if plugin.cpu_ram_efficient_loading:
        log.info("FSDP: cpu_ram_efficient_loading off (every process builds the towers itself)")
        plugin.cpu_ram_efficient_loading = False


def _cpu_fsdp(accelerator: Any) -> None:
    """FSDP on CPU processes: the launch's FSDP plugin settings (``FSDP_*``), gloo."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* settings
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"fsdp_version={plugin.fsdp_version} on CPU: only FSDP2 (fully_shard) runs on "
            "CPU processes; set fsdp_version: 2 in the Accelerate config "
            "(accelerate launch --fsdp_version 2)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    # Every AcceleratorState() refreshes distributed_type from PartialState's, which Accelerate
    # itself sets to the engine of the last Accelerator made (so does the GPU FSDP path).
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.info("FSDP%d on CPU processes (gloo), as the Accelerate config asks", plugin.fsdp_version)


def check_shardable(accelerator: Any, model: Any) -> None:
    """Refuse, before training, parameters FSDP2 cannot shard (non-contiguous ones, e.g. conv
    weights a tower keeps channels-last), naming the towers and the fix."""
    if engine_name(accelerator) != "FSDP":
        return
    bad = [name for name, p in model.named_parameters() if not p.is_contiguous()]
    if not bad:
        return
    towers = sorted({n.split("trunks.", 1)[1].split(".", 1)[0] for n in bad if "trunks." in n})
    fix = ", ".join(f"model.towers.{m}.options.channels_last=false" for m in towers)
    raise ConfigError(
        f"FSDP shards contiguous parameters only, and {len(bad)} are not (e.g. {bad[0]}): "
        f"these towers keep channels-last weights; set {fix or 'contiguous weights'} under FSDP"
    )


def full_model_state(accelerator: Any, model: Any, prefix: str = "") -> dict[str, Any]:
    """The prepared model's full state dict, on CPU: the entries under ``prefix`` (which is
    removed from the keys). A collective under sharded engines: every process calls it, the
    main process gets the tensors."""
    state = accelerator.get_state_dict(model)
    return {
        k.removeprefix(prefix): v.detach().cpu().contiguous()
        for k, v in state.items()
        if k.startswith(prefix)
    }
