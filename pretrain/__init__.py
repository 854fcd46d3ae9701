"""modalign.pretrain: towers, the shared-space encoder, contrastive losses, the training loop and
model bundles.

The public surface of the layer (one import path per thing)::

    from modalign.pretrain import pretrain, load_bundle, TOWERS, LOSSES, PAIR_POLICIES

Importing the package registers the built-in tower kinds (``timm_image``, ``timm_audio``,
``sentence_transformer``, ``open_clip``, ``hf_vision``, ``hf_audio``, ``hf_text``) in
:data:`TOWERS`; plugins add theirs through the ``modalign.towers`` entry-point group.
"""

from __future__ import annotations

from modalign.pretrain.bundle import (
    BundleModel,
    EmbeddingModel,
    load_bundle,
    metric_row,
    read_card,
    save_bundle,
    update_card_metrics,
)
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.export import (
    EXPORT_FORMATS,
    ONNX_TOWERS,
    RUNTIMES,
    OnnxModel,
    export_bundle,
    load_model,
    merge_adapters,
    read_export_meta,
)
from modalign.pretrain.losses import LOSSES, PAIR_POLICIES, LossConfig
from modalign.pretrain.multinode import DistributedRunFailed
from modalign.pretrain.projection_init import PROJECTION_INITS, pca_projection
from modalign.pretrain.towers import ADAPTERS, AdapterConfig, build_tower
from modalign.pretrain.towers.api import TOWERS, TowerBuilder, TowerConfig, TowerParts
from modalign.pretrain.trainer import PretrainResult, check_pretrain_inputs, pretrain

__all__ = [
    "ADAPTERS",
    "EXPORT_FORMATS",
    "LOSSES",
    "ONNX_TOWERS",
    "PAIR_POLICIES",
    "PROJECTION_INITS",
    "RUNTIMES",
    "TOWERS",
    "AdapterConfig",
    "BundleModel",
    "DistributedRunFailed",
    "EmbeddingModel",
    "LossConfig",
    "OnnxModel",
    "PretrainConfig",
    "PretrainResult",
    "TowerBuilder",
    "TowerConfig",
    "TowerParts",
    "build_tower",
    "check_pretrain_inputs",
    "export_bundle",
    "load_bundle",
    "load_model",
    "merge_adapters",
    "metric_row",
    "pca_projection",
    "pretrain",
    "read_card",
    "read_export_meta",
    "save_bundle",
    "update_card_metrics",
]
