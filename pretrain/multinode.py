"""A run over several machines: the shared output folder, the process-group timeout, a lost peer.

Who writes what (every process runs the same trainer; "rank" is the *global* rank that
``torchrun``/``accelerate launch`` hand out, ``RANK``; the machine-local rank, ``LOCAL_RANK``, only
picks the process's GPU and decides no write):

* global rank 0 (``accelerator.is_main_process``): the ``output.dir`` lock, ``metrics*.jsonl``,
  each checkpoint's staging folder with the weights, optimizer, schedule and ``state.json``
  (written last), the model bundle, ``best/``, ``run_config.yaml``, tracker logs;
* every rank: its own ``random_states_<rank>.pkl`` (and its shard files under FSDP/DeepSpeed)
  into the checkpoint folder rank 0 staged, and one marker for :func:`check_shared_output`.

So ``output.dir`` must be *one* folder that every machine sees (NFS, Lustre, GPFS, a cloud
file system mounted at the same path): a checkpoint holds files from every rank, and a resume
reads all of them on every machine. There is no mode for machines without a shared file system:
per-machine checkpoint halves could not be resumed or checked as a whole, so such a launch is
refused up front (:func:`check_shared_output`, exit 2) rather than failing at the first
checkpoint or, worse, at the resume.

A peer that dies closes its sockets and the others fail at their next collective, at once; a
peer that hangs (frozen machine, network partition) is waited for ``train.dist_timeout``
seconds, the process-group timeout handed to ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError, ModalignError
from modalign.core.world import world

__all__ = [
    "MARKER_PREFIX",
    "DistributedRunFailed",
    "check_shared_output",
    "group_timeout_handler",
    "run_failed",
]

MARKER_PREFIX = ".tmp-fs-check-"
"""Marker names (a temp prefix: a killed check's leftovers are removed by the next run)."""


class DistributedRunFailed(ModalignError):
    """One process of a multi-process run failed (often: a peer died, hung or lost the network)."""


def group_timeout_handler(seconds: int) -> Any:
    """Accelerate's ``InitProcessGroupKwargs`` setting the process-group timeout to ``seconds``.

    ``backend=None`` keeps Accelerate's own backend choice. ``InitProcessGroupKwargs.to_kwargs``
    passes on only values that differ from its defaults (600 s, the NCCL default), so a
    600 s request would silently become torch's gloo default of 1800 s: it is nudged by 1 ms.
    """
    from accelerate.utils import InitProcessGroupKwargs

    timeout = timedelta(seconds=seconds)
    if timeout == InitProcessGroupKwargs().timeout:
        timeout += timedelta(milliseconds=1)
    return InitProcessGroupKwargs(backend=None, timeout=timeout)


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def check_shared_output(
    out_dir: Path, wait_s: float, key: str = "output.dir", wait_key: str = "train.shared_fs_wait"
) -> None:
    """Every process of the launch must see the same ``out_dir`` (call it on every process,
    after global rank 0 has created and locked the folder; nothing happens in one process).

    Each rank writes a marker named by a nonce from rank 0 and its rank, then waits up to
    ``wait_s`` seconds (network file systems cache directory listings) until it sees every
    rank's marker. If any rank misses one, every rank raises :class:`ConfigError` (exit 2)
    naming the folder, ``key``, the ranks and hosts that disagree, and ``wait_key``.
    """
    rank, size = world()
    if size == 1:
        return
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    nonce = _broadcast(uuid.uuid4().hex if rank == 0 else None)
    mine = out_dir / f"{MARKER_PREFIX}{nonce}-{rank}"
    wanted = {f"{MARKER_PREFIX}{nonce}-{r}" for r in range(size)}
    deadline = time.monotonic() + wait_s
    seen: set[str] = set()
    written = False
    try:
        while True:
            if not written and out_dir.is_dir():
                mine.write_text(socket.gethostname(), encoding="utf-8")
                written = True
            if written:
                seen = wanted & set(os.listdir(out_dir))
            if seen == wanted or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        report = _gather((socket.gethostname(), str(out_dir.resolve()), written, sorted(seen)))
    finally:
        if written:
            mine.unlink(missing_ok=True)
    blind = [(r, host, path, ok, len(s)) for r, (host, path, ok, s) in enumerate(report)
             if len(s) < size]  # fmt: skip
    if blind:
        detail = "; ".join(
            f"rank {r} on {host} ({path}) "
            + (f"saw {n} of {size} markers" if ok else "found no folder")
            for r, host, path, ok, n in blind
        )
        raise ConfigError(
            f"{key}={out_dir}: not one folder shared by every machine of the launch ({detail}). "
            f"Set {key} to a path on a file system that every machine mounts at the same place "
            "(NFS, Lustre, ...): checkpoints hold files written by every rank and a resume reads "
            "them all, so modalign has no mode for machines without a shared file system. "
            f"If the file system is shared but slow to show new files, raise {wait_key} "
            f"(now {wait_s:g} s)."
        )


def run_failed(exc: BaseException, timeout_s: int, out_dir: Path) -> DistributedRunFailed:
    """The error one process of a multi-process run raises when its step loop failed with
    ``exc`` (torch's collectives raise plain ``RuntimeError``, also when a peer is gone)."""
    from modalign.pretrain.checkpoint import list_checkpoints

    rank, size = world()
    done = list_checkpoints(out_dir) if rank == 0 or Path(out_dir).is_dir() else []
    resume = (
        f"the last complete checkpoint is {done[-1][1]}" if done else "no checkpoint is complete"
    )
    first = str(exc).splitlines()[0] if str(exc) else ""
    return DistributedRunFailed(
        f"process {rank} of {size} failed: {type(exc).__name__}: {first}. In a run of several "
        "processes this is usually another process that died (its sockets closed), hung (it is "
        f"waited for train.dist_timeout={timeout_s} s) or lost the network: see the other "
        f"machines' logs. {resume}; restart every machine's launch with --resume latest."
    )
