"""bf16 on CPUs with native bf16 (issue 21 item 18).

On a CPU that reports ``avx512_bf16`` / ``amx_bf16`` (Arm: ``bf16``), oneDNN's native-bf16
kernels made a tiny bf16 run give different weights in fresh processes and diverge; the
training step now runs without oneDNN there. The end-to-end test runs only on such a CPU (it
cannot show anything elsewhere: PyTorch takes another kernel path) and says why it skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modalign.config import load_config
from modalign.pretrain.cpu_precision import (
    bf16_step_route,
    cpu_flags,
    has_native_bf16,
    needs_route,
)
from modalign.pretrain.process_state import ProcessState
from modalign.pretrain.trainer import pretrain

from helpers.corpus import tiny_overrides, write_tiny_corpus

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n"
OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert "avx512_bf16" in cpu_flags(X86) and "bf16" in cpu_flags(ARM)
    assert not cpu_flags(OLD) & {"avx512_bf16", "amx_bf16", "bf16"}
    assert cpu_flags("") == frozenset()  # no /proc/cpuinfo: nothing claimed


def test_only_a_bf16_cpu_step_on_a_native_bf16_cpu_is_routed() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert needs_route(cpu, "bf16", native_bf16=True)
    assert not needs_route(cpu, "bf16", native_bf16=False)
    assert not needs_route(cpu, "no", native_bf16=True)
    assert not needs_route(cuda, "bf16", native_bf16=True)
    before = torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError), bf16_step_route(cpu, "bf16") as routed:
        assert routed == has_native_bf16()
        assert torch.backends.mkldnn.enabled == (before and not routed)
        raise RuntimeError("step failed")
    assert torch.backends.mkldnn.enabled == before  # restored on errors too


def _bf16_run(corpus: Path, out: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(
        None,
        [
            *tiny_overrides(corpus, out, steps=3, batch=8),
            "model.modalities=[image,audio]",
            "train.threads=1",
            "train.precision=bf16",
            "train.device=cpu",
        ],
    )
    result = pretrain(cfg)
    assert math.isfinite(result.final_loss)
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow  # three tiny training runs (~20 s on 2 cores)
@pytest.mark.skipif(
    not has_native_bf16(),
    reason="this CPU reports no native bf16 (no avx512_bf16 / amx_bf16 / bf16 flag in "
    "/proc/cpuinfo): PyTorch's oneDNN native-bf16 path that item 18 fixes is not taken here",
)
def test_bf16_run_on_a_native_bf16_cpu_equals_the_onednn_free_run(tmp_path: Path) -> None:
    corpus = write_tiny_corpus(tmp_path / "c", n=16)
    before = ProcessState.capture()
    routed = _bf16_run(corpus, tmp_path / "routed")
    assert ProcessState.capture().differences(before) == []  # oneDNN flag back on
    torch.backends.mkldnn.enabled = False
    try:
        reference = _bf16_run(corpus, tmp_path / "reference")
    finally:
        torch.backends.mkldnn.enabled = before.mkldnn
    again = _bf16_run(corpus, tmp_path / "again")
    assert routed.keys() == reference.keys()
    for key in routed:
        assert torch.equal(routed[key], reference[key]), key
        assert torch.equal(routed[key], again[key]), key
