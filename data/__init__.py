"""modalign.data: modality plugins, the one sample decoder, typed batches, sources and resumable
streams, pack / inspect, and the corpus builders.

The public surface of the layer (one import path per thing)::

    from modalign.data import MODALITIES, ModalitySpec, DataConfig, read_manifest, open_stream

Importing the package registers the built-in modalities (``image``, ``audio``, ``text``) in
:data:`MODALITIES` and the built-in decoded-item caches (``none``, ``memory``, ``disk``) in
:data:`ITEM_CACHES`; plugins add theirs through the ``modalign.modalities`` and
``modalign.item_caches`` entry-point groups.
"""

from __future__ import annotations

from modalign.data import builtin_modalities  # noqa: F401  (registers image, audio, text)
from modalign.data.batch import BadItemLog, Batch, Sample
from modalign.data.cache import open_cache
from modalign.data.config import ITEM_CACHES, DataConfig
from modalign.data.dataset import RawSource
from modalign.data.manifest import Manifest, ManifestRow, read_manifest
from modalign.data.modality import MODALITIES, ImagePreset, ModalitySpec, modality_specs
from modalign.data.pack import pack_shards
from modalign.data.sources import open_eval_source, open_source, open_stream

__all__ = [
    "ITEM_CACHES",
    "MODALITIES",
    "BadItemLog",
    "Batch",
    "DataConfig",
    "ImagePreset",
    "Manifest",
    "ManifestRow",
    "ModalitySpec",
    "RawSource",
    "Sample",
    "modality_specs",
    "open_cache",
    "open_eval_source",
    "open_source",
    "open_stream",
    "pack_shards",
    "read_manifest",
]
