"""modalign.pretrain: towers, the shared-space encoder, contrastive losses, the training loop and
model bundles.

The public surface of the layer (one import path per thing)::

    from modalign.pretrain import pretrain, load_bundle, TOWERS, LOSSES, PAIR_POLICIES

Importing the package registers the built-in tower kinds (``timm_image``, ``timm_audio``,
``sentence_transformer``, ``open_clip``, ``hf_vision``, ``hf_audio``, ``hf_text``) in
:data:`TOWERS`; plugins add theirs through the ``modalign.towers`` entry-point group.
"""

from __future__ import annotations

from modalign.pretrain.bundle import BundleModel, load_bundle, save_bundle
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.losses import LOSSES, PAIR_POLICIES, LossConfig
from modalign.pretrain.towers import build_tower
from modalign.pretrain.towers.api import TOWERS, TowerBuilder, TowerConfig, TowerParts
from modalign.pretrain.trainer import PretrainResult, pretrain

__all__ = [
    "LOSSES",
    "PAIR_POLICIES",
    "TOWERS",
    "BundleModel",
    "LossConfig",
    "PretrainConfig",
    "PretrainResult",
    "TowerBuilder",
    "TowerConfig",
    "TowerParts",
    "build_tower",
    "load_bundle",
    "pretrain",
    "save_bundle",
]
