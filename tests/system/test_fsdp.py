"""Issue 14 item 4: FSDP from the user's Accelerate config, on 2 CPU processes (gloo).

The launch uses an Accelerate config file as ``accelerate config`` writes it
(``distributed_type: FSDP``, FSDP2, the towers' blocks wrapped, ``SHARDED_STATE_DICT``). On CPU,
Accelerate 1.x silently trains such a config with DDP; modalign puts FSDP back
(:mod:`modalign.pretrain.engines`), which the checkpoints show: torch DCP folders with one
shard per process, ``engine: FSDP`` in ``state.json``.

* 2 processes x 8 == 1 process x 16 after 2 AdamW steps (BatchNorm towers with global batch
  statistics, grad clipping, per-item augmentation), within 1e-4 as the DDP test: the
  processes sum the same rows in another order (float32 rounding; observed 7e-6).
* The sharded checkpoint resumes exactly: resumed from ``step-1`` == uninterrupted, bit for bit.
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

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: BasicBlock
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true  # `accelerate launch` default; modalign turns it off
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
mixed_precision: 'no'
machine_rank: 0
num_machines: 1
num_processes: 2
use_cpu: false
"""
SETTINGS = [
    "model.modalities=[image,audio]",
    "data.audio.spec_augment=true",
    "data.audio.freq_mask=4",
    "data.audio.time_mask=4",
    "data.image.train_scale_min=0.5",
    "optim.lr=0.001",
    "train.threads=1",
    "train.keep_checkpoints=0",
    # FSDP2 shards contiguous parameters only ("FSDP does not support non-contiguous
    # parameters yet"); timm towers default to channels-last weights.
    "model.towers.image.options.channels_last=false",
    "model.towers.audio.options.channels_last=false",
]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(manifest: Path, out: Path, batch: int) -> list[str]:
    overrides = [*tiny_overrides(manifest, out, steps=2, batch=batch), *SETTINGS]
    return [a for o in overrides for a in ("--set", o)]


def _launch(config: Path, run_yaml: Path, sets: list[str], *extra: str) -> None:
    launcher = str(Path(sys.executable).parent / "accelerate")
    _run(
        [launcher, "launch", "--config_file", str(config), "--main_process_port", str(_port()),
         "-m", "modalign", "-q", "pretrain", str(run_yaml), *sets, *extra]
    )  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    manifest = write_tiny_corpus(root / "corpus", n=16)
    config, run_yaml = root / "fsdp.yaml", root / "run.yaml"
    config.write_text(ACCELERATE_CONFIG)
    run_yaml.write_text("train:\n  seed: 0\n")
    one, two, resumed = root / "one", root / "two", root / "resumed"
    _run([sys.executable, "-m", "modalign", "-q", "pretrain", str(run_yaml),
          *_sets(manifest, one, 16)])  # fmt: skip
    _launch(config, run_yaml, _sets(manifest, two, 8))
    shutil.copytree(two / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
    _launch(config, run_yaml, _sets(manifest, resumed, 8), "--resume", "latest")
    return {"one": one, "two": two, "resumed": resumed}


def test_the_accelerate_config_runs_fsdp_on_cpu(runs: dict[str, Path]) -> None:
    step = runs["two"] / "checkpoints" / "step-2"
    meta = json.loads((step / "state.json").read_text())
    assert (meta["engine"], meta["sharded"], meta["world_size"]) == ("FSDP", True, 2)
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # one DCP shard per process
        assert {p.name for p in (step / folder).iterdir()} == {
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        }
    assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.json"} <= set(meta["files"])
    assert not (step / "model.safetensors").exists()  # sharded: no process held all weights


def test_fsdp_two_processes_x8_equal_one_process_x16(runs: dict[str, Path]) -> None:
    one, two = _weights(runs["one"]), _weights(runs["two"])
    assert set(one) == set(two)
    assert any("running_var" in k for k in one), "BatchNorm statistics must be compared too"
    for key, w in one.items():
        torch.testing.assert_close(two[key], w, atol=1e-4, rtol=1e-4, msg=key)
    records = {r: (runs[r] / "metrics.jsonl").read_text().splitlines() for r in ("one", "two")}
    losses = [
        [json.loads(x)["loss"] for x in lines if '"event"' not in x] for lines in records.values()
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_fsdp_checkpoint_resumes_exactly(runs: dict[str, Path]) -> None:
    want, got = _weights(runs["two"]), _weights(runs["resumed"])
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_fsdp_refuses_channels_last_towers_naming_the_key(tmp_path: Path) -> None:
    """Channels-last weights (the timm towers' default) cannot be sharded by FSDP2: the run
    stops before training with exit 2, naming each tower's key to set."""
    manifest = write_tiny_corpus(tmp_path / "corpus", n=16)
    config, run_yaml = tmp_path / "fsdp.yaml", tmp_path / "run.yaml"
    config.write_text(ACCELERATE_CONFIG)
    run_yaml.write_text("train:\n  seed: 0\n")
    overrides = [*tiny_overrides(manifest, tmp_path / "out", steps=1, batch=8), *SETTINGS[:-2]]
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [launcher, "launch", "--config_file", str(config), "--main_process_port", str(_port()),
         "-m", "modalign", "-q", "pretrain", str(run_yaml),
         *[a for o in overrides for a in ("--set", o)]],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    err = proc.stdout + proc.stderr
    assert "model.towers.image.options.channels_last=false" in err, err[-3000:]
    assert "model.towers.audio.options.channels_last=false" in err
    assert not (tmp_path / "out" / "checkpoints").exists()
