"""Accelerate trackers (train.report_to): checked before the run, fed every record, closed on
error too; metrics.jsonl is kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from accelerate.tracking import GeneralTracker

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.pretrain import run_log
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus


class MemoryTracker(GeneralTracker):
    """Keeps what it is given (an Accelerate tracker needs no package)."""

    name = "memory"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.config: dict[str, Any] = {}
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.finished = 0

    @property
    def tracker(self) -> Any:
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.logged.append((int(step or 0), dict(values)))

    def finish(self) -> None:
        self.finished += 1


def test_report_to_is_checked_before_the_run() -> None:
    cfg = load_config(None, ["train.report_to=[wandb]"])
    with pytest.raises(ConfigError, match="train.report_to: tracker 'wandb' is not installed"):
        run_log.tracker_names(cfg, available=[])
    assert run_log.tracker_names(cfg, available=["wandb"]) == ["wandb"]
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
        run_log.tracker_names(load_config(None, ["train.report_to=[nope]"]), available=[])
    alias = load_config(None, ["train.tensorboard=true", "train.report_to=[tensorboard]"])
    assert run_log.tracker_names(alias, available=["tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"modalign\[tensorboard\]"):
        run_log.tracker_names(alias, available=[])


def test_values_are_flat_numbers() -> None:
    record = {"step": 3, "loss": 1.5, "lr": 1e-3, "logit_scale": {"image-text": 14.2},
              "data_wait": 0.02, "bad_items": 0, "val": {"image-text": {"r@1": 0.5}},
              "note": "x", "nan": float("nan")}  # fmt: skip
    assert run_log.tracker_values(record) == {
        "train/loss": 1.5, "train/lr": 1e-3, "train/logit_scale/image-text": 14.2,
        "train/data_wait": 0.02, "train/bad_items": 0.0, "val/image-text/r@1": 0.5,
    }  # fmt: skip


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tracker: MemoryTracker, **kw) -> Path:
    corpus = write_tiny_corpus(tmp_path / "c", n=16)
    out = tmp_path / "run"
    monkeypatch.setattr(run_log, "tracker_names", lambda cfg: [tracker])
    sets = [*tiny_overrides(corpus, out, steps=4, batch=8), "train.log_every=2",
            "train.checkpoint_every=0", *kw.get("extra", [])]  # fmt: skip
    pretrain(load_config(None, sets))
    return out


@pytest.mark.slow
def test_trackers_get_every_record_and_are_closed(tmp_path: Path, monkeypatch) -> None:
    tracker = MemoryTracker()
    out = _run(tmp_path, monkeypatch, tracker)
    assert [s for s, _ in tracker.logged] == [2, 4]
    values = tracker.logged[-1][1]
    for key in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait",
                "train/bad_items"):  # fmt: skip
        assert key in values
    assert any(k.startswith("train/logit_scale") for k in values)
    assert tracker.config["train.steps"] == 4 and tracker.finished == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][:2] == [2, 4]  # metrics.jsonl kept


def test_trackers_are_closed_on_error(tmp_path: Path, monkeypatch) -> None:
    tracker = MemoryTracker()
    from modalign.pretrain import trainer

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("step failed")

    monkeypatch.setattr(trainer, "apply_update", boom)
    with pytest.raises(RuntimeError, match="step failed"):
        _run(tmp_path, monkeypatch, tracker)
    assert tracker.finished == 1


def test_precision_auto_follows_the_accelerate_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from modalign.pretrain.accelerate_setup import check_precision, resolved_precision

    cfg = load_config(None, ["train.device=cpu"])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert cfg.train.precision == "auto" and resolved_precision(cfg) == "fp32"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` exports
    assert resolved_precision(cfg) == "bf16"
    assert resolved_precision(load_config(None, ["train.precision=fp32"])) == "fp32"  # YAML wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        check_precision(cfg)  # checked on the resolved value, before any work
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="mixed_precision='fp8'"):
        resolved_precision(cfg)
