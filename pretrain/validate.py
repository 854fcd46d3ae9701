"""Validation during pretraining: the loop calls an ``evaluate`` callback from the layer above.

``pretrain`` sits below ``retrieval`` in the import order, so it does not score anything
itself: the caller passes ``evaluate(view, step) -> dict`` (as open_clip passes ``evaluate`` into
its loop), typically :func:`modalign.retrieval.evaluate.make_validator`, which embeds
``data.val`` with the shared embedding loop and scores it exactly like ``evaluate retrieval``.

:class:`EncoderView` is the live encoder as that callback sees it: it has the embedding-model
interface (``modalities``, ``embed_dim``, ``modality_specs()``, ``encode_batch(batch)``) that
``modalign.retrieval.embed`` loops over, like a loaded bundle.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modalign.data.modality import ModalitySpec
from modalign.pretrain.model import MultimodalEncoder


@dataclass
class EncoderView:
    """A live encoder with the embedding-model interface (eval-mode use only)."""

    encoder: MultimodalEncoder
    specs: Mapping[str, ModalitySpec]
    device: torch.device

    @property
    def modalities(self) -> list[str]:
        return list(self.encoder.modalities)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.embed_dim)

    def modality_specs(self) -> dict[str, ModalitySpec]:
        return {m: self.specs[m] for m in self.modalities if m in self.specs}

    @torch.no_grad()
    def encode_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Collated inputs by modality -> L2-normalised float32 CPU embeddings."""
        inputs = {
            m: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
            for m, v in batch.items()
            if m in self.modalities
        }
        return {m: e.float().cpu() for m, e in self.encoder(inputs).items()}


Evaluate = Callable[[EncoderView, int], Mapping[str, Any]]
"""``evaluate(view, step) -> {"audio->image": {"recall@1": ...}, ...}`` (JSON-ready)."""


def run_validation(evaluate: Evaluate, view: EncoderView, step: int) -> dict[str, Any]:
    """Call ``evaluate`` in eval mode without grad, leaving every RNG and the train mode as
    they were (validation must not change training: a resumed run stays bit-identical)."""
    was_training = view.encoder.training
    py_rng, np_rng = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    view.encoder.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return dict(evaluate(view, step))
    finally:
        view.encoder.train(was_training)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
