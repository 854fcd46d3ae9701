"""Run logging: the metrics log (JSON lines, + Accelerate trackers) and the progress bar.

While a run trains, records go to its *live* log ``metrics.live.jsonl`` (kept with the
checkpoints: a resume trims it to the resumed step). Only when the bundle has been written does
:func:`publish_metrics` copy it, atomically, to ``metrics.jsonl`` beside the bundle, so a run
that fails never appends to an older bundle's log. Records are strict JSON: a non-finite
number is written as ``null`` (never ``NaN``/``Infinity``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modalign.core.artifact import atomic_write_text
from modalign.core.errors import ConfigError
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


def tracker_names(cfg: PretrainConfig, available: list[str] | None = None) -> list[str]:
    """Accelerate trackers of ``train.report_to`` (+ ``tensorboard`` for the old
    ``train.tensorboard: true``), each checked to be installed before the run starts."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    wanted = list(dict.fromkeys([*cfg.train.report_to, *(["tensorboard"] * cfg.train.tensorboard)]))
    have = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    have = have if available is None else available
    for name in wanted:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r}; choose from {sorted(LOGGER_TYPE_TO_CLASS)}"
            )
        if name not in have:
            extra = " (pip install 'modalign[tensorboard]')" if name == "tensorboard" else ""
            raise ConfigError(
                f"train.report_to: tracker {name!r} is not installed{extra}; install it or "
                f"remove it from train.report_to (installed: {have or 'none'})"
            )
    return wanted


def tracker_values(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as flat numeric tracker values: ``train/loss``, ``train/lr``,
    ``train/logit_scale/<pair>``, ``val/<metric>``... (the step is passed separately)."""
    out: dict[str, float] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{prefix}/{k}", v)
        elif _finite_number(value):
            out[prefix] = float(value)

    for key, value in record.items():
        if key != "step":
            put(key if key == "val" else f"train/{key}", value)
    return out


def close_trackers(trackers: list[Any]) -> None:
    """Finish every tracker (not ``accelerator.end_training``: that also ends the process group,
    which the bundle write after the loop still needs)."""
    for tracker in trackers:
        tracker.finish()


def tracker_config(cfg: PretrainConfig) -> dict[str, Any]:
    """The run's config as flat ``section.key`` scalars (what trackers accept as hparams)."""
    from modalign.core.config_io import to_dict

    out: dict[str, Any] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{prefix}.{k}" if prefix else str(k), v)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(strict_json(value))

    put("", to_dict(cfg))
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricsWriter:
    """Appends JSON records to ``path`` (main process only) and forwards them to ``log``
    (``accelerator.log``: every tracker of ``train.report_to``)."""

    def __init__(self, path: Path, enabled: bool, log: Callable[..., None] | None = None) -> None:
        self.path, self.enabled, self.log = Path(path), enabled, log

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.log is not None and "step" in record:
            self.log(tracker_values(record), step=int(record["step"]))


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
