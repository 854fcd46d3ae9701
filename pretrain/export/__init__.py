"""Export a model bundle to formats other tools read (ONNX, ...): one registry entry per format.

An exporter is ``exporter(model, staging_dir, options) -> dict``: it writes the format's files
into ``staging_dir`` (a fresh temp folder) and returns the format's own metadata, which
:func:`export_bundle` records in ``export.json`` beside them, with every file's sha256 and the
source bundle's fingerprint. Exporters check everything (can each tower be written in this
format?) before writing; :func:`export_bundle` claims the output folder first (refusing a
folder holding files modalign did not write) and swaps the finished folder in as a whole, so a
failed export leaves nothing behind. Adding a format::

    EXPORT_FORMATS.add("my_format", my_exporter, MyOptions)

or, from another package, an entry point in group ``modalign.export_formats`` naming a hook
``hook(registry)`` that calls ``registry.add``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modalign.data.modality import ModalitySpec
from modalign.pretrain.export.formats import (
    EXPORT_FORMATS,
    EXPORT_KIND,
    EXPORT_META,
    Exporter,
    export_bundle,
    read_export_meta,
)
from modalign.pretrain.export.merged import BundleExportOptions, export_bundle_format
from modalign.pretrain.export.onnx import ONNX_TOWERS, OnnxOptions, OnnxTower, export_onnx
from modalign.pretrain.export.peers import (
    ST_TEXT_MODULES,
    OpenClipExportOptions,
    SentenceTransformersExportOptions,
    export_open_clip,
    export_sentence_transformers,
)
from modalign.pretrain.export.runtime import FEED_KINDS, RUNTIMES, OnnxModel, load_model
from modalign.pretrain.towers import TowerBuilder

EXPORT_FORMATS.add("onnx", export_onnx, OnnxOptions)
EXPORT_FORMATS.add("bundle", export_bundle_format, BundleExportOptions)
EXPORT_FORMATS.add("open_clip", export_open_clip, OpenClipExportOptions)
EXPORT_FORMATS.add(
    "sentence_transformers", export_sentence_transformers, SentenceTransformersExportOptions
)


def merge_adapters(
    bundle: str | Path,
    out: str | Path,
    *,
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> Path:
    """A standalone bundle in ``out`` with the adapters of ``bundle`` merged into its towers'
    weights: the same embeddings (max |diff| <= 1e-5, checked), no base weights file needed.
    The ``bundle`` export format with ``merge: true`` (``modalign export --format bundle
    --merge``); see :mod:`modalign.pretrain.export.merged`."""
    return export_bundle(
        bundle,
        out,
        "bundle",
        BundleExportOptions(merge=True),
        tower_builders=tower_builders,
        modalities=modalities,
    )


__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_KIND",
    "EXPORT_META",
    "FEED_KINDS",
    "ONNX_TOWERS",
    "RUNTIMES",
    "ST_TEXT_MODULES",
    "Exporter",
    "OnnxModel",
    "OnnxOptions",
    "OnnxTower",
    "export_bundle",
    "load_model",
    "merge_adapters",
    "read_export_meta",
]
