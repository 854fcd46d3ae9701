"""Optimizer details: AdamW no-decay groups, LR schedule horizon, gradient clipping, mixed
precision (bf16 on CPU; fp16 with a loss scaler on CUDA only), logit-scale cap after a step."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modalign.config import load_config
from modalign.core.errors import ConfigError
from modalign.pretrain import LossConfig
from modalign.pretrain.config import OptimConfig
from modalign.pretrain.losses import ContrastiveLoss
from modalign.pretrain.optim import lr_factor, make_optimizer, param_groups
from modalign.pretrain.trainer import pretrain
from modalign.pretrain.update import clip_and_norm

from helpers.corpus import tiny_overrides
from helpers.trained import BUNDLE_BATCH, BUNDLE_STEPS, TinyBundle


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.proj = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.loss = ContrastiveLoss(["a", "b"], LossConfig(kind="siglip"))


def test_adamw_groups_exclude_norms_biases_and_temperatures_from_decay() -> None:
    model = _Toy()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["conv.bias", "bn.weight", "bn.bias", "proj.bias", "ln.weight", "ln.bias",
         "loss.log_scale.a__b", "loss.bias.a__b"]
    )  # fmt: skip
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW)
    assert not any(p is model.frozen.weight for g in opt.param_groups for p in g["params"])


def test_lr_schedule_horizon_is_decay_steps_not_train_steps() -> None:
    cfg = OptimConfig(warmup_steps=2, decay_steps=10, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0)
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, cfg) == pytest.approx(0.1) and lr_factor(50, cfg) == pytest.approx(0.1)
    assert lr_factor(7, OptimConfig(warmup_steps=2, decay_steps=0)) == 1.0


def _fake_run(model: nn.Module, clip: float) -> SimpleNamespace:
    from accelerate import Accelerator

    cfg = SimpleNamespace(optim=SimpleNamespace(grad_clip=clip))
    return SimpleNamespace(core=model, cfg=cfg, accelerator=Accelerator(cpu=True))


def test_gradient_clipping_caps_the_global_norm() -> None:
    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    want = math.sqrt(20 * 9.0)
    assert clip_and_norm(_fake_run(model, clip=0.0)) == pytest.approx(want)  # off: untouched
    assert model.weight.grad[0, 0].item() == 3.0
    assert clip_and_norm(_fake_run(model, clip=1.0)) == pytest.approx(want)  # pre-clip norm
    total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def _cfg(corpus: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            *tiny_overrides(corpus, out, steps=2, batch=8),
            "model.modalities=[image,audio]",
            "train.threads=1",
            *extra,
        ],
    )


def test_bf16_step_runs_on_cpu(corpus: Path, tmp_path: Path) -> None:
    result = pretrain(_cfg(corpus, tmp_path / "bf16", "train.precision=bf16", "train.device=cpu"))
    assert math.isfinite(result.final_loss)


def test_fp16_on_cpu_is_refused_with_a_clear_message(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        pretrain(_cfg(corpus, tmp_path / "fp16", "train.precision=fp16", "train.device=cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_fp16_on_cuda_uses_a_loss_scaler(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    result = pretrain(_cfg(corpus, out, "train.precision=fp16", "train.device=cuda"))
    assert math.isfinite(result.final_loss)
    assert (out / "checkpoints" / "step-2" / "scaler.pt").is_file()


def test_logit_scale_parameter_is_clamped_after_each_step(corpus: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hot"
    pretrain(_cfg(corpus, out, "loss.init_temperature=0.001"))  # scale 1000 > cap 100
    state = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    assert state["loss.log_scale.audio__image"].item() <= math.log(100.0) + 1e-6


@pytest.mark.heavy
@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    """train.compile=true trains the same weights (up to float rounding) with the same keys."""
    from safetensors.torch import load_file

    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    # the eager run: the shared bundle (2 steps, batch 8, tiny_overrides on the shared corpus)
    manifest, eager = tiny_bundle
    pretrain(
        load_config(
            None,
            [
                *tiny_overrides(
                    manifest, tmp_path / "compiled", steps=BUNDLE_STEPS, batch=BUNDLE_BATCH
                ),
                "train.compile=true",
            ],
        )
    )
    a = load_file(str(eager / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
