"""The one place the top layer starts pretraining (the lead wires validation callbacks here)."""

from __future__ import annotations

from typing import Any


def run_pretrain(cfg: Any, resume: str | None = None, **kw: Any) -> Any:
    """Run :func:`modalign.pretrain.trainer.pretrain` for a root config (``--resume`` aware).

    Extra keyword arguments (``evaluate=``, ``tower_builders=``, ``modalities=``) pass through.
    """
    from modalign.pretrain.trainer import pretrain

    return pretrain(cfg, resume=resume, **kw)
