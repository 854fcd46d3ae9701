"""Issue 24: the Slurm recipes run for real on a one-host Slurm (``scripts/slurm/local_cluster.sh``:
munged, slurmctld and slurmd on localhost, from Debian's ``slurm-wlm``).

``sbatch scripts/slurm/pretrain.sbatch`` with 2 tasks (each a torchrun "machine", rendezvous from
``SLURM_*``; again with ``LAUNCHER=accelerate``) ends with exactly the weights of the same run launched directly as 2 torchrun
machines, and ``scripts/slurm/embed.sbatch`` with 2 tasks writes the embeddings of one process.
Skips where Slurm is not installed or the test does not run as root (the local slurmd runs jobs
as root); CI does not install Slurm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.corpus import tiny_overrides, write_tiny_corpus
from helpers.multinode import free_port, run_ok, sets, torch_threads

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "scripts" / "slurm"
MISSING = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "srun") if not shutil.which(t)]

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"Slurm not installed ({', '.join(MISSING)} not found)"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root"),
]

OVERRIDES = ["train.threads=1", "optim.lr=0.001", "train.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_PORT": str(free_port()), "CPUS": "2"}
    script = str(SLURM / "local_cluster.sh")
    proc = subprocess.run([script, "start", str(root)], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield {**env, "SLURM_CONF": str(root / "slurm.conf"), "PYTHON": sys.executable,
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    finally:
        subprocess.run([script, "stop", str(root)], env=env, timeout=120, check=False)


def _sbatch(env: dict[str, str], cwd: Path, recipe: str, *args: str) -> str:
    """Submit with 2 tasks on the one node, wait for the job; its output file's text."""
    cmd = ["sbatch", "--wait", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
           "--time=10", str(SLURM / recipe), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    logs = sorted(cwd.glob("*.out"), key=lambda p: p.stat().st_mtime)
    text = logs[-1].read_text(errors="replace") if logs else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text[-4000:]}"
    return text


def test_slurm_recipes_match_the_direct_launch(cluster: dict[str, str], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from modalign.cli import main
    from modalign.retrieval.embed_shards import read_embedding_shards

    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  seed: 0\n")
    direct, slurm = tmp_path / "direct", tmp_path / "slurm"
    run_ok(["-m", "modalign", "pretrain", str(config),
            *sets([*tiny_overrides(manifest, direct, 2, 8), *OVERRIDES])],
           tmp_path / "direct-logs")  # fmt: skip
    text = _sbatch(cluster, tmp_path, "pretrain.sbatch", str(config),
                   *sets([*tiny_overrides(manifest, slurm, 2, 8), *OVERRIDES]))  # fmt: skip
    assert "modalign: 2 machine(s) x 1 process(es)" in text
    # the same recipe with accelerate launch (--num_machines 2 --machine_rank SLURM_PROCID)
    acc = tmp_path / "slurm-accelerate"
    text = _sbatch({**cluster, "LAUNCHER": "accelerate"}, tmp_path, "pretrain.sbatch", str(config),
                   *sets([*tiny_overrides(manifest, acc, 2, 8), *OVERRIDES]))  # fmt: skip
    assert "x 1 process(es)" in text and ", accelerate" in text
    a = load_file(str(direct / "model.safetensors"))
    for run in (slurm, acc):
        b = load_file(str(run / "model.safetensors"))
        assert set(a) == set(b)
        for key, w in a.items():
            assert torch.equal(b[key], w), f"{run.name}: {key}"

    args = ["--model", str(slurm), "--data", str(manifest), "--shard-rows", "3"]
    with torch_threads(1):  # the Slurm tasks run with OMP_NUM_THREADS=1
        assert main(["embed", *args, "--out", str(tmp_path / "emb-one")]) == 0
    _sbatch(cluster, tmp_path, "embed.sbatch", *args, "--out", str(tmp_path / "emb-slurm"))
    one, _ = read_embedding_shards(tmp_path / "emb-one")
    two, meta = read_embedding_shards(tmp_path / "emb-slurm")
    assert meta["shards"] == 6 and set(one) == set(two)
    for m in one:
        assert two[m].ids == one[m].ids
        np.testing.assert_array_equal(two[m].vectors, one[m].vectors)
