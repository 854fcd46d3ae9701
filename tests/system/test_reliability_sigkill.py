"""Issue 10: SIGKILL sweep. Pretraining image+audio+text (frozen, cached text tower) with
augmentation on (SpecAugment, random resized crops and flips on images, dropout) is killed at
several points, resumed with ``--resume``, and must end with exactly the weights of the
uninterrupted run (bit for bit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalign.config import load_config
from modalign.pretrain import checkpoint as ckpt
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

SCRIPTS = Path(__file__).resolve().parents[1] / "dist_scripts"
STEPS = 4


def _overrides(manifest: Path, out: Path) -> list[str]:
    return [
        *tiny_overrides(manifest, out, steps=STEPS, batch=8),
        "model.modalities=[image,audio,text]",
        "model.towers.image.drop_rate=0.2",
        "data.audio.spec_augment=true",
        "data.audio.freq_mask=4",
        "data.audio.time_mask=4",
        "data.image.hflip=0.5",
        "data.image.train_scale_min=0.5",
        "optim.warmup_steps=1",
        "optim.decay_steps=6",
        "train.threads=1",
        "train.keep_checkpoints=0",
    ]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("sweep"), n=24)


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight")
    pretrain(load_config(None, _overrides(corpus, out)))
    return _weights(out)


# (mode, N, the checkpoints complete after the kill)
POINTS = [
    ("after-checkpoint", 1, [1]),
    ("mid-checkpoint", 3, [1, 2]),
    ("mid-step", 2, [1]),
    ("mid-step", 4, [1, 2, 3]),
]


@pytest.mark.slow
@pytest.mark.distributed  # each run is a subprocess killed at a chosen point
@pytest.mark.parametrize(("mode", "n", "complete"), POINTS, ids=[f"{m}-{n}" for m, n, _ in POINTS])
def test_sigkill_then_resume_equals_uninterrupted(
    mode: str, n: int, complete: list[int], corpus: Path, straight: dict, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    spec = tmp_path / "overrides.json"
    spec.write_text(json.dumps(_overrides(corpus, out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "kill_at.py"), mode, str(n), str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == complete
    assert not (out / "model.safetensors").exists()  # killed before the bundle

    pretrain(load_config(None, _overrides(corpus, out)), resume="latest")
    got = _weights(out)
    assert set(got) == set(straight)
    for key, want in straight.items():
        assert torch.equal(got[key], want), f"{key} differs after {mode} {n}"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, STEPS + 1))
    left = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert left == [], "the killed write's temp folder is removed on resume"
