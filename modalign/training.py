"""The one place the top layer starts pretraining: wires the validation callback."""

from __future__ import annotations

from typing import Any


def run_pretrain(cfg: Any, resume: str | None = None, **kw: Any) -> Any:
    """Run :func:`modalign.pretrain.trainer.pretrain` for a root config (``--resume`` aware).

    With ``train.val_every > 0`` and ``data.val`` set, validation scores ``data.val`` with
    :func:`modalign.retrieval.evaluate.make_validator` (the ``evaluate retrieval`` metrics)
    unless ``evaluate=`` is given. Every input path is checked first (exit 2 naming the key). Other keyword arguments (``tower_builders=``,
    ``modalities=``) pass through.
    """
    from modalign.pretrain.trainer import pretrain
    from modalign.run_checks import check_pretrain_inputs

    check_pretrain_inputs(cfg)  # every path, before the towers are built or output.dir made
    if "evaluate" not in kw and cfg.train.val_every > 0 and cfg.data.val:
        from modalign.retrieval.evaluate import make_validator

        kw["evaluate"] = make_validator(cfg.data.val)
    return pretrain(cfg, resume=resume, **kw)
