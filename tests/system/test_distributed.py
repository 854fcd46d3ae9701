"""Distributed exactness on CPU (gloo): 2 processes x B == 1 process x 2B.

* Loss, gradients and BatchNorm statistics of the local-loss form with the autograd all-gather
  and :class:`GlobalBatchNorm`, under DDP (``dist_scripts/loss_exactness.py``, torchrun).
* End to end: 1 training step of the real trainer on a 16-item corpus as 1 x 16 and as 2 x 8
  (``accelerate launch --multi_gpu --num_processes 2 -m modalign pretrain``) gives the same
  weights. Note ``accelerate launch --cpu --num_processes 2`` would silently start ONE process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.corpus import tiny_overrides, write_tiny_corpus

SCRIPTS = Path(__file__).resolve().parents[1] / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))

import loss_exactness as lx  # noqa: E402

pytestmark = pytest.mark.distributed


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(SCRIPTS))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: int = 300) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    _run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPTS / "loss_exactness.py"),
            str(out),
        ]
    )
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("case", lx.cases(), ids=lambda c: c.name)
def test_two_processes_equal_one_process(case: lx.Case, two_process_results: dict) -> None:
    got, want = two_process_results[case.name], lx.run_case(case)
    tol = 1e-10 if case.dtype == torch.float64 else 1e-5
    assert got["loss"] == pytest.approx(want["loss"], abs=tol, rel=tol)
    assert set(got["grads"]) == set(want["grads"])
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, atol=tol, rtol=tol, msg=name)
    for name, b in want["buffers"].items():  # BatchNorm running mean/var and batch counts
        torch.testing.assert_close(got["buffers"][name], b, atol=tol, rtol=tol, msg=name)


def test_absent_modality_gives_zero_gradient_not_an_error(two_process_results: dict) -> None:
    grads = two_process_results["audio_absent_everywhere"]["grads"]
    assert all(g.abs().max() == 0 for n, g in grads.items() if n.startswith("towers.audio."))
    assert any(g.abs().max() > 0 for n, g in grads.items() if n.startswith("towers.image."))


def _weights(bundle: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(bundle / "model.safetensors"))


@pytest.mark.slow
def test_trainer_two_processes_x8_equal_one_process_x16(tmp_path: Path) -> None:
    """One real training step (BatchNorm towers, grad clipping, AdamW) through the CLI."""
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    common = ["train.threads=1", "optim.lr=0.001", "train.checkpoint_every=0"]
    pretrain(load_config(None, [*tiny_overrides(manifest, tmp_path / "one", 1, 16), *common]))

    config = tmp_path / "run.yaml"
    config.write_text("train:\n  seed: 0\n")
    overrides = [*tiny_overrides(manifest, tmp_path / "two", 1, 8), *common]
    launcher = str(Path(sys.executable).parent / "accelerate")
    _run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()),
         "-m", "modalign", "pretrain", str(config),
         *[a for o in overrides for a in ("--set", o)]]
    )  # fmt: skip
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(one) == set(two)
    assert any("running_var" in k for k in one), "BatchNorm statistics must be compared too"
    for key, w in one.items():
        torch.testing.assert_close(two[key], w, atol=1e-4, rtol=1e-4, msg=key)
    start = _weights_at_init(tmp_path, manifest)
    assert any(not torch.equal(one[k], start[k]) for k in one), "the step must change weights"


def _weights_at_init(tmp_path: Path, manifest: Path) -> dict[str, torch.Tensor]:
    """The weights the trainer starts from: towers built right after seeding with train.seed."""
    from modalign.config import load_config
    from modalign.pretrain.bundle import encoder_state
    from modalign.pretrain.model import build_encoder

    cfg = load_config(None, tiny_overrides(manifest, tmp_path / "zero", 1, 16))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return encoder_state(build_encoder(cfg.model, cfg.data).encoder)
