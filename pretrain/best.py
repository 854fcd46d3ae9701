"""Model selection on validation recall: keep the best validated weights, stop early.

``train.keep_best: "text->image/recall@5"`` (a ``QUERY->GALLERY/METRIC`` key of the
validation results, see :func:`modalign.retrieval.evaluate.make_validator`) makes every
validation that beats the best score so far write the live weights as a bundle into
``OUTPUT/best/`` (its ``modalign.json`` records ``selected: {metric, value, step}``); the final
bundle then holds those weights instead of the last step's, and says so in ``selected``.
``train.early_stop: N`` ends the run once N validations in a row have not improved it.

Resumable without extra state: the best score and step are read back from ``best/`` and the
validations since then follow from the step numbers (``(step - best_step) // val_every``).
A fresh (not resumed) run removes a ``best/`` left by an earlier run in the same folder.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.errors import ConfigError

__all__ = ["BEST_DIR", "BestSoFar", "parse_metric"]

BEST_DIR = "best"
_KEY = re.compile(r"^(.+?)->([^/]+)/(.+)$")


def parse_metric(key: str) -> tuple[str, str]:
    """``"text->image/recall@5"`` -> ``("text->image", "recall@5")``; ConfigError otherwise."""
    match = _KEY.match(key)
    if not match:
        raise ConfigError(
            f"train.keep_best={key!r} is not valid: must be QUERY->GALLERY/METRIC of the "
            "validation results, e.g. text->image/recall@5 (--set train.keep_best=...)"
        )
    return f"{match[1]}->{match[2]}", match[3]


@dataclass
class BestSoFar:
    """The best validation score of a run and the step that reached it (0 = none yet)."""

    metric: str
    patience: int  # validations without improvement before stopping; 0 = never stop
    val_every: int
    value: float = -math.inf
    step: int = 0

    @classmethod
    def open(cls, train_cfg: Any, out_dir: Path, fresh: bool) -> BestSoFar | None:
        """The tracker of ``train.keep_best`` (None when unset), resumed from ``out_dir/best``."""
        if not train_cfg.keep_best:
            return None
        best = cls(train_cfg.keep_best, train_cfg.early_stop, train_cfg.val_every)
        folder = Path(out_dir) / BEST_DIR
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
            return best
        meta = folder / "modalign.json"
        if meta.is_file():
            selected = json.loads(meta.read_text(encoding="utf-8")).get("selected") or {}
            if selected.get("metric") == best.metric:
                best.value, best.step = float(selected["value"]), int(selected["step"])
        return best

    def score(self, val: dict[str, Any]) -> float:
        """The selection metric in one validation's results (ConfigError naming what exists)."""
        pair, name = parse_metric(self.metric)
        if pair not in val or name not in val[pair]:
            have = [f"{p}/{m}" for p, ms in sorted(val.items()) for m in ms]
            raise ConfigError(
                f"train.keep_best={self.metric!r}: validation gives no such figure; it gives "
                f"{', '.join(have) or 'nothing'} (--set train.keep_best=...)"
            )
        return float(val[pair][name])

    def offer(self, value: float, step: int) -> bool:
        """Record ``value`` at ``step`` if it beats the best so far; whether it did."""
        if value > self.value:
            self.value, self.step = value, step
            return True
        return False

    def exhausted(self, step: int) -> bool:
        """``patience`` validations after the best one, none better: time to stop."""
        if self.patience <= 0 or self.step == 0:
            return False
        return (step - self.step) // self.val_every >= self.patience

    def record(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step}

    def weights_path(self, out_dir: Path) -> Path | None:
        """``best/model.safetensors`` once a validation has been kept, else None."""
        path = Path(out_dir) / BEST_DIR / "model.safetensors"
        return path if self.step > 0 and path.is_file() else None
