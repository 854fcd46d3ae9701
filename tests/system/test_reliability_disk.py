"""Issue 10 (11): a full disk while writing a checkpoint or a bundle is a clear error naming the
path, and leaves the previous checkpoint / bundle (its config and metrics) untouched.

The full disk is real: one file of the artifact being written is a symlink to ``/dev/full``
(every write to it fails with ENOSPC), planted in the artifact's temp folder as it is made.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from modalign.config import load_config
from modalign.core.artifact import ArtifactWriteError
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

FULL = Path("/dev/full")
pytestmark = pytest.mark.skipif(
    not (FULL.exists() and stat.S_ISCHR(FULL.stat().st_mode)), reason="needs /dev/full"
)


def _plant(monkeypatch: pytest.MonkeyPatch, prefix: str, name: str) -> None:
    """Temp folders whose name starts with ``prefix`` get ``name`` -> /dev/full."""
    real = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix_=None, dir=None, **kw):
        pre = kw.pop("prefix", prefix_)
        path = real(suffix=suffix, prefix=pre, dir=dir)
        if pre and pre.startswith(prefix):
            os.symlink(FULL, Path(path) / name)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


def _overrides(tmp_path: Path, steps: int) -> list[str]:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    return [
        *tiny_overrides(manifest, tmp_path / "run", steps=steps, batch=8),
        "model.modalities=[image,audio]",
        "train.threads=1",
    ]


def test_disk_full_while_writing_a_checkpoint_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = _overrides(tmp_path, steps=3)
    _plant(monkeypatch, ".tmp-step-2-", "model.safetensors")
    with pytest.raises(ArtifactWriteError) as info:
        pretrain(load_config(None, sets))
    assert "checkpoints/step-2" in str(info.value) and "disk full" in str(info.value)
    monkeypatch.undo()
    assert stat.S_ISCHR(FULL.stat().st_mode)  # the symlink was followed, never replaced
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1]
    assert pretrain(load_config(None, sets), resume="latest").steps == 3


def test_failed_bundle_write_leaves_the_old_bundle_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = _overrides(tmp_path, steps=1)
    pretrain(load_config(None, sets))
    run = tmp_path / "run"
    live = run / "metrics.live.jsonl"  # the running log: a resumed run appends to it
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p != live}
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "modalign.json"} <= set(before)
    _plant(monkeypatch, ".tmp-.stage-", "config.yaml")  # the bundle's staging folder
    with pytest.raises(OSError) as info:
        pretrain(load_config(None, [*sets, "train.steps=2"]), resume="latest")
    monkeypatch.undo()
    assert str(run) in str(info.value)
    assert stat.S_ISCHR(FULL.stat().st_mode)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name in before}
    assert after == before  # config, metrics.jsonl, weights and metadata: the old bundle's
