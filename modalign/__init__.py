"""modalign: self- and semi-supervised multimodal representation learning.

Public API::

    import modalign
    model = modalign.load("runs/demo/model")          # a model bundle directory
    emb = model.encode(text=["the digit seven"])       # {"text": (1, D) tensor}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from modalign.pretrain.bundle import BundleModel


def load(path: str | Path, device: str = "cpu") -> BundleModel:
    """Load a model bundle (no code is executed: safetensors + JSON + YAML).

    Imported lazily so ``import modalign`` stays cheap for the CLI.
    """
    from modalign.pretrain.bundle import load_bundle

    return load_bundle(path, device=device)


__all__ = ["__version__", "load"]
