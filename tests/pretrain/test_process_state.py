"""Many runs in one process (issue 15): each ``pretrain()`` as if in a fresh process.

A sequence of runs that differ in precision (fp32, bf16), device, tower builders, plus a run
that diverges, all in this process: each one's weights equal the same run in a fresh
subprocess bit for bit, and thread count, RNG states, grad/autocast modes, default dtype,
deterministic flag, Accelerate state and environment are as before after each call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign.config import load_config
from modalign.pretrain.process_state import ProcessState, process_state_guard
from modalign.pretrain.trainer import TrainingDiverged, pretrain

from helpers.corpus import tiny_overrides

HERE = Path(__file__).resolve()

# name -> (extra --set overrides, tower builders from test_nan_guard or None, diverges)
RUNS: dict[str, tuple[list[str], int | None, bool]] = {
    "bf16": (["train.precision=bf16", "train.device=cpu"], None, False),
    "fp32_custom_towers": (_custom := ["model.towers.image.kind=faulty_image",
                                       "model.towers.audio.kind=small_audio"], 0, False),
    "diverges": ([*_custom, "optim.grad_clip=0"], 2, True),
    "bf16_again": (["train.precision=bf16", "train.device=cpu"], None, False),
    "fp32_auto_device": (["train.device=auto"], None, False),
}  # fmt: skip
if torch.cuda.is_available():
    RUNS["bf16_cuda"] = (["train.precision=bf16", "train.device=cuda"], None, False)
    RUNS["bf16_cpu_after_cuda"] = (["train.precision=bf16", "train.device=cpu"], None, False)


def _run(name: str, corpus: Path, out: Path) -> dict[str, torch.Tensor]:
    """One run of the sequence; returns its final weights (last checkpoint if it diverged)."""
    extra, fail_at, diverges = RUNS[name]
    cfg = load_config(
        None,
        [
            *tiny_overrides(corpus, out, steps=3, batch=8),
            "model.modalities=[image,audio]",
            "train.threads=1",
            *extra,
        ],
    )
    builders = None
    if fail_at is not None:
        from test_nan_guard import _builders

        builders = _builders(fail_at=fail_at)
    if diverges:
        with pytest.raises(TrainingDiverged):
            pretrain(cfg, tower_builders=builders)
        return load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
    pretrain(cfg, tower_builders=builders)
    return load_file(str(out / "model.safetensors"))


def _fresh_process_weights(name: str, corpus: Path, out: Path) -> dict[str, torch.Tensor]:
    # the script imports the tests' helpers package: tests/ on its path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(HERE), name, str(corpus), str(out)],
        env=env,
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "weights.safetensors"))


@pytest.mark.slow
@pytest.mark.distributed  # each run again in a fresh interpreter
def test_runs_in_one_process_equal_fresh_processes(corpus: Path, tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    torch.manual_seed(1234)  # the caller's own RNG state must survive every run
    in_process = {}
    for name in RUNS:
        before = ProcessState.capture()
        accel_before = dict(AcceleratorState._shared_state)
        in_process[name] = _run(name, corpus, tmp_path / "here" / name)
        after = ProcessState.capture()
        assert before.differences(after) == [], name
        assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled(), name
        assert dict(AcceleratorState._shared_state) == accel_before, name
    for name, weights in in_process.items():
        fresh = _fresh_process_weights(name, corpus, tmp_path / "fresh" / name)
        assert weights.keys() == fresh.keys(), name
        for key in weights:
            assert torch.equal(weights[key], fresh[key]), f"{name}: {key}"


def test_guard_restores_on_exceptions_and_is_reentrant() -> None:
    before = ProcessState.capture()
    with pytest.raises(RuntimeError), process_state_guard():
        torch.set_num_threads(max(1, torch.get_num_threads() % 2 + 1))
        torch.set_grad_enabled(False)
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(7)
        os.environ["MODALIGN_TEST_LEAK"] = "1"
        with process_state_guard():
            torch.set_autocast_enabled("cpu", True)
        assert not torch.is_autocast_enabled("cpu")  # inner guard restored
        raise RuntimeError("boom")
    assert ProcessState.capture().differences(before) == []
    assert "MODALIGN_TEST_LEAK" not in os.environ


def _main(name: str, corpus: str, out: str) -> None:
    """Subprocess entry: the named run in a fresh process, weights saved for comparison."""
    from safetensors.torch import save_file

    weights = _run(name, Path(corpus), Path(out))
    save_file(weights, str(Path(out) / "weights.safetensors"))
    print(json.dumps({"ok": name}))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    _main(*sys.argv[1:4])
