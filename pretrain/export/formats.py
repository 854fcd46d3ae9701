"""The export-format registry, the export driver and ``export.json`` (see the package doc)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modalign.core.artifact import (
    OutputKind,
    atomic_dir,
    check_output_dir,
    output_dir,
    output_path,
    read_json_meta,
    sha256_file,
    verify_files,
    write_meta,
)
from modalign.core.registry import Registry
from modalign.data.modality import ModalitySpec
from modalign.pretrain.bundle import BundleModel, load_bundle
from modalign.pretrain.towers import TowerBuilder

EXPORT_META = "export.json"
EXPORT_FORMAT = "modalign.export"
EXPORT_FORMAT_VERSION = 1
EXPORT_KIND = OutputKind(EXPORT_FORMAT, "model export", ((EXPORT_META, EXPORT_FORMAT),))

Exporter = Callable[[BundleModel, Path, Any], dict[str, Any]]
"""``(model, staging_dir, options) -> metadata``: write the format's files into ``staging_dir``."""

EXPORT_FORMATS: Registry[Exporter] = Registry("export format", "modalign.export_formats")
"""Export formats by name (``modalign export --format NAME``); options are per format."""


def export_bundle(
    bundle_dir: str | Path,
    out_dir: str | Path,
    format: str = "onnx",
    options: Mapping[str, Any] | Any | None = None,
    *,
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    key: str = "--out",
) -> Path:
    """Export the bundle at ``bundle_dir`` as ``format`` into a fresh ``out_dir``.

    ``options``: the format's options (a mapping checked against its options dataclass, or an
    instance). The output folder must be absent, empty or an earlier modalign export (else
    refused, exit 2, nothing changed); it is replaced as a whole once the exporter succeeded.
    Returns ``out_dir``.
    """
    entry = EXPORT_FORMATS.get(format, "--format")
    opts = EXPORT_FORMATS.options(format, options, f"export.{format}")
    out = output_path(out_dir, key)
    check_output_dir(out, EXPORT_KIND, key)  # before the (slow) model load
    model = load_bundle(bundle_dir, "cpu", tower_builders, modalities)
    # The exporter works in a private scratch folder: a tower it refuses (or any error) leaves
    # nothing at ``out``; only a finished export is claimed into place, as a whole.
    with tempfile.TemporaryDirectory(prefix="modalign-export-") as scratch:
        staged = Path(scratch) / "export"
        staged.mkdir()
        info = entry.factory(model, staged, opts)
        files = {
            f.relative_to(staged).as_posix(): sha256_file(f)
            for f in sorted(staged.rglob("*"))
            if f.is_file()
        }
        meta = {
            "export_format": format,
            "options": EXPORT_FORMATS.options_dict(format, opts),
            "bundle": {"path": str(model.path), "fingerprint": model.fingerprint},
            **info,
            "files": files,
        }
        with output_dir(out, EXPORT_KIND, key) as held, atomic_dir(held) as tmp:
            shutil.copytree(staged, tmp, dirs_exist_ok=True)
            write_meta(tmp / EXPORT_META, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, meta)
    return out


def read_export_meta(path: str | Path, format: str | None = None) -> dict[str, Any]:
    """``export.json`` of an export folder, its files verified (sha256); with ``format``, the
    folder must hold that export format."""
    path = Path(path)
    meta = read_json_meta(
        path / EXPORT_META,
        "modalign export",
        "write one with `modalign export --model BUNDLE --format FORMAT --out DIR`",
        format=EXPORT_FORMAT,
        max_version=EXPORT_FORMAT_VERSION,
    )
    if format is not None and meta.get("export_format") != format:
        from modalign.core.errors import UserInputError

        raise UserInputError(
            f"{path}: holds a {meta.get('export_format')!r} export, not {format!r}; export it "
            f"with `modalign export --format {format}`"
        )
    verify_files(path, meta, "model export")
    return meta
