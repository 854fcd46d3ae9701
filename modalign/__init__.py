"""modalign: self- and semi-supervised multimodal representation learning.

Public API::

    import modalign
    model = modalign.load("runs/demo/model")          # a model bundle directory
    emb = model.encode(text=["the digit seven"])       # {"text": (1, D) tensor}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from modalign.core.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Mapping

    from modalign.data.modality import ModalitySpec
    from modalign.pretrain.bundle import BundleModel
    from modalign.pretrain.towers import TowerBuilder


def load(
    path: str | Path,
    device: str = "auto",
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> BundleModel:
    """Load a model bundle (no code is executed: safetensors + JSON + YAML).

    ``device``: ``"auto"`` (a GPU when one is visible, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``. ``model.encode(image=[...], text=[...], batch_size=64,
    convert_to_numpy=False, normalize=True, show_progress_bar=False)`` embeds any iterable of
    inputs, decoding batch by batch.

    Plugin towers and modalities are found through the registries (entry-point groups
    ``modalign.towers`` / ``modalign.modalities``); a bundle whose plugin is not installed is
    refused naming the package. ``tower_builders``/``modalities`` are optional extras for
    unregistered ones (the same ones passed to ``pretrain``). Imported lazily so ``import
    modalign`` stays cheap.
    """
    from modalign.pretrain.bundle import load_bundle

    return load_bundle(path, device=device, tower_builders=tower_builders, modalities=modalities)


__all__ = ["__version__", "load"]
