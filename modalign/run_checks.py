"""Every path a run will read, checked before any work (model building, output folders).

``check_pretrain_inputs(cfg)`` and ``check_finetune_inputs(cfg)`` raise
:class:`~modalign.core.errors.DataError` / :class:`~modalign.core.errors.ConfigError` (exit 2)
naming the config key and the path: ``data.val: runs/x/test.jsonl: manifest not found``.
Manifests are parsed (a malformed line or a wrong-typed cell fails here); shard patterns are
expanded and each local shard must exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError
from modalign.data.modality import MODALITIES
from modalign.data.preflight import SourceCheck, check_source


def check_pretrain_inputs(cfg: Any) -> dict[str, SourceCheck]:
    """``data.train`` always; ``data.val`` when set (validation reads it at ``train.val_every``)."""
    mods = list(cfg.model.modalities)
    checks = {"data.train": check_source(cfg.data.train, mods, "data.train")}
    if cfg.data.val:
        checks["data.val"] = check_source(cfg.data.val, mods, "data.val")
    return checks


def check_finetune_inputs(cfg: Any) -> dict[str, SourceCheck]:
    """``finetune.model`` (a bundle folder), ``finetune.train`` and ``finetune.test``."""
    ft = cfg.finetune
    model = Path(ft.model) if ft.model else None
    if model is None:
        raise ConfigError(
            "finetune.model is empty; set it to a model bundle (--set finetune.model=DIR)"
        )
    if not model.is_dir():
        raise ConfigError(
            f"finetune.model: {model}: no such bundle folder; pass a pretrain output.dir"
        )
    mods = MODALITIES.names()  # the bundle's modalities are read later; any known one will do
    checks = {"finetune.train": check_source(ft.train, mods, "finetune.train")}
    if ft.test:
        checks["finetune.test"] = check_source(ft.test, mods, "finetune.test")
    return checks
