"""Frozen towers in the loader: their trunk features computed in the DataLoader workers.

A frozen tower (``lock: all``: no trainable parameter, trunk in eval mode) is a pure function of
its (preprocessed) input, so its features can be computed before the step, in the loader
workers, while the main process runs the trainable towers. ``train.frozen_towers`` chooses:

* ``step``: every tower runs in the training step (the main process);
* ``loader``: frozen towers run in the loader (in its workers when ``data.num_workers > 0``;
  without workers in the main process, before the step, which is the same work);
* ``auto`` (default): ``loader`` when it can only help, else ``step``. It can help when the run
  is on the CPU in fp32, with loader workers and cores for them
  (``torch threads + data.num_workers <= CPU cores``), on an unsharded engine, without
  ``train.compile``; on a GPU the tower is faster on the device, so ``auto`` keeps it there.

What the workers compute is what the step computes: the same preprocessor (train mode, inside
the batch's item keys) and trunk (eval mode, no grad), in fp32. Results are bit-identical to
``step`` when the main process also runs one torch thread (workers run one); with more
threads they agree to float rounding (matrix products may sum in another order). A batch
without a modality (all rows absent) is filled in the step as before.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalign.data.batch import Batch
from modalign.data.item_keys import item_keys
from modalign.pretrain.engines import is_sharded
from modalign.pretrain.model import MultimodalEncoder
from modalign.pretrain.towers import is_frozen

log = logging.getLogger(__name__)

__all__ = ["FrozenTowersHook", "frozen_modalities", "loader_modalities"]


def frozen_modalities(encoder: MultimodalEncoder) -> list[str]:
    """Modalities whose trunk and preprocessor have no trainable parameter."""
    return [
        m
        for m in encoder.modalities
        if is_frozen(encoder.trunks[m]) and is_frozen(encoder.preprocessors[m])
    ]


def _auto_reason(
    device: torch.device, precision: str, num_workers: int, sharded: bool, compiled: bool
) -> str | None:
    """Why ``auto`` keeps frozen towers in the step (None: it moves them to the loader)."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device.type != "cpu":
        return f"training on {device.type}"
    if precision != "no":
        return f"mixed precision {precision}"
    if sharded:
        return "a sharded engine"
    if compiled:
        return "train.compile (each worker would compile the trunk again)"
    if num_workers < 1:
        return "data.num_workers is 0"
    if threads + num_workers > cores:
        return f"{threads} torch threads + {num_workers} workers > {cores} CPU cores"
    return None


def loader_modalities(
    policy: str,
    encoder: MultimodalEncoder,
    accelerator: Any,
    num_workers: int,
    compiled: bool = False,
) -> list[str]:
    """The frozen modalities ``train.frozen_towers`` (``policy``) computes in the loader
    (``compiled``: the run compiles its trunks, ``train.compile``)."""
    frozen = frozen_modalities(encoder)
    if policy == "step" or not frozen:
        return []
    if policy == "loader":  # refused up front under sharded engines (check_engine_options)
        return frozen
    reason = _auto_reason(
        accelerator.device,
        str(accelerator.mixed_precision),
        num_workers,
        is_sharded(accelerator),
        compiled,
    )
    if reason is not None:
        log.debug("frozen towers %s stay in the step: %s", frozen, reason)
        return []
    return frozen


class FrozenTowersHook:
    """Batch hook: ``batch.encoded[m] = trunk(preprocessor(inputs[m]))`` for frozen ``m``.

    Holds CPU copies of the frozen preprocessors and trunks (the training modules themselves
    when they are on the CPU already; forked workers get their own pages). Runs under
    ``torch.no_grad`` with the batch's item keys, preprocessors in train mode and trunks in
    eval mode, exactly as the training step would.
    """

    def __init__(self, encoder: MultimodalEncoder, modalities: Sequence[str]) -> None:
        self.modalities = list(modalities)
        self.preprocessors = {m: _on_cpu(encoder.preprocessors[m]) for m in self.modalities}
        self.trunks = {m: _on_cpu(encoder.trunks[m]) for m in self.modalities}

    def __call__(self, batch: Batch) -> Batch:
        encoded = dict(batch.encoded)
        with torch.no_grad(), item_keys(batch.keys):
            for m in self.modalities:
                if m in batch.inputs and m not in encoded:
                    pre, trunk = self.preprocessors[m], self.trunks[m]
                    pre.train()
                    trunk.eval()
                    encoded[m] = trunk(pre(batch.inputs[m])).detach()
        batch.encoded = encoded
        return batch


def _on_cpu(module: nn.Module) -> nn.Module:
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module
    return copy.deepcopy(module).cpu()
