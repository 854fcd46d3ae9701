"""Issue 10 (13): with augmentation on (SpecAugment, image crops and flips), one training step
as 2 processes x 8 (``accelerate launch --multi_gpu --num_processes 2``, CPU gloo) gives the
weights of 1 process x 16. Every random augmentation is keyed on (seed, epoch, item):
image transforms in the data workers, SpecAugment masks from ``Batch.keys``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.corpus import tiny_overrides, write_tiny_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

AUGMENT = [
    "data.audio.spec_augment=true",
    "data.audio.freq_mask=6",
    "data.audio.time_mask=6",
    "data.image.hflip=0.5",
    "data.image.train_scale_min=0.5",
    "model.modalities=[image,audio]",
    "train.threads=1",
    "optim.lr=0.001",
    "train.checkpoint_every=0",
]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_two_processes_x8_equal_one_x16_with_augmentation(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  seed: 0\n")
    one = [*tiny_overrides(manifest, tmp_path / "one", 1, 16), *AUGMENT]
    _run([sys.executable, "-m", "modalign", "-q", "pretrain", str(config), *_sets(one)])
    two = [*tiny_overrides(manifest, tmp_path / "two", 1, 8), *AUGMENT]
    launcher = str(Path(sys.executable).parent / "accelerate")
    _run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_port()),
         "-m", "modalign", "-q", "pretrain", str(config), *_sets(two)]
    )  # fmt: skip
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(a) == set(b)
    for key, w in a.items():
        torch.testing.assert_close(b[key], w, atol=1e-4, rtol=1e-4, msg=key)
