"""Issue 14 item 4: DDP checkpoints go through ``accelerator.save_state`` too, and resume exactly.

2 CPU processes (``accelerate launch --multi_gpu --num_processes 2``, gloo) with dropout on, so
each process draws from its own RNG stream: a resume from ``step-1`` that lost either process's
RNG state (``random_states_<rank>.pkl``) would end with other weights than the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.corpus import tiny_overrides, write_tiny_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SETTINGS = [
    "model.modalities=[image,audio]",
    "model.towers.image.drop_rate=0.3",
    "model.towers.audio.drop_rate=0.3",
    "optim.warmup_steps=1",
    "train.threads=1",
    "train.keep_checkpoints=0",
]


def _launch(manifest: Path, out: Path, *extra: str) -> None:
    run_yaml = manifest.parent / "run.yaml"
    run_yaml.write_text("train:\n  seed: 0\n")
    sets = [a for o in [*tiny_overrides(manifest, out, 2, 8), *SETTINGS] for a in ("--set", o)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "modalign", "-q", "pretrain", str(run_yaml), *sets, *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_ddp_checkpoint_is_save_state_and_resumes_exactly(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch(manifest, straight)
    step = straight / "checkpoints" / "step-1"
    meta = json.loads((step / "state.json").read_text())
    assert (meta["engine"], meta["sharded"], meta["world_size"]) == ("MULTI_CPU", False, 2)
    assert {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "random_states_1.pkl",
    } <= set(meta["files"])
    shutil.copytree(step, resumed / "checkpoints" / "step-1")
    _launch(manifest, resumed, "--resume", "latest")
    want, got = _weights(straight), _weights(resumed)
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
