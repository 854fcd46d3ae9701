"""Run logging: the metrics log (JSON lines, optional TensorBoard) and the progress bar.

While a run trains, records go to its *live* log ``metrics.live.jsonl`` (kept with the
checkpoints: a resume trims it to the resumed step). Only when the bundle has been written does
:func:`publish_metrics` copy it, atomically, to ``metrics.jsonl`` beside the bundle, so a run
that fails never appends to an older bundle's log. Records are strict JSON: a non-finite
number is written as ``null`` (never ``NaN``/``Infinity``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_write_text
from modalign.pretrain.config import PretrainConfig

METRICS = "metrics.jsonl"
LIVE_METRICS = "metrics.live.jsonl"


def live_metrics_path(out_dir: Path) -> Path:
    """Where a run in ``out_dir`` logs while it trains."""
    return Path(out_dir) / LIVE_METRICS


def strict_json(record: Any) -> Any:
    """``record`` with every non-finite float replaced by None (JSON has no NaN/inf)."""
    if isinstance(record, float):
        return record if math.isfinite(record) else None
    if isinstance(record, dict):
        return {k: strict_json(v) for k, v in record.items()}
    if isinstance(record, (list, tuple)):
        return [strict_json(v) for v in record]
    return record


class MetricsWriter:
    """Appends JSON records to ``path`` (main process only) and losses to TensorBoard."""

    def __init__(
        self, path: Path, enabled: bool, cfg: PretrainConfig, tensorboard: bool | None = None
    ) -> None:
        self.path, self.enabled = Path(path), enabled
        self.tb = None
        if enabled and (cfg.train.tensorboard if tensorboard is None else tensorboard):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.tb is not None and "step" in record and "loss" in record:
            self.tb.add_scalar("train/loss", record["loss"], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def start_live_log(out_dir: Path, resumed_step: int | None) -> None:
    """A fresh run starts an empty live log; a resumed one keeps records up to its step."""
    path = live_metrics_path(out_dir)
    if resumed_step is None:
        path.unlink(missing_ok=True)
        return
    if not path.is_file() and (Path(out_dir) / METRICS).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, (Path(out_dir) / METRICS).read_text(encoding="utf-8"))
    trim_metrics(path, resumed_step)


def trim_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed step: the steps after it are trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step and "event" not in record:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def publish_metrics(out_dir: Path, end: dict[str, Any]) -> None:
    """After the bundle is written: ``metrics.jsonl`` = live log + the end record (atomic)."""
    live = live_metrics_path(out_dir)
    text = live.read_text(encoding="utf-8") if live.is_file() else ""
    text += json.dumps(strict_json({"event": "end", **end}), allow_nan=False) + "\n"
    atomic_write_text(Path(out_dir) / METRICS, text)


def progress(cfg: PretrainConfig, start: int, main: bool) -> Any:
    """A tqdm bar over the run's steps (off unless ``train.progress`` on the main process)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.train.steps,
        initial=start,
        desc="pretrain",
        disable=not (cfg.train.progress and main),
        dynamic_ncols=True,
    )
