"""Step-speed defaults keep the numbers: fused AdamW, channels-last timm trunks, layouts.

* ``optim.fused`` (default on) gives PyTorch's fused AdamW, ``false`` the per-parameter loop;
  both make the same update (float rounding).
* ``model.towers.<m>.options.channels_last`` (timm kinds, default on) stores 4-D weights
  channels-last and lays inputs out so on entry; outputs, gradients and state-dict keys equal
  the default layout's.
* :func:`~modalign.pretrain.update.align_layouts` gives gradients and moments their
  parameter's strides, so the fused kernel updates a channels-last weight right even when a
  gradient or a moment loaded from a checkpoint arrives in another layout.
* Frozen (``lock: all``) towers record no autograd graph, cached or not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.pretrain import TowerConfig
from modalign.pretrain.config import OptimConfig
from modalign.pretrain.model import MultimodalEncoder
from modalign.pretrain.optim import make_optimizer
from modalign.pretrain.towers import apply_lock
from modalign.pretrain.towers.api import TowerParts
from modalign.pretrain.towers.strings import StringTrunk
from modalign.pretrain.towers.timm import build_timm_audio, build_timm_image
from modalign.pretrain.update import align_layouts

from helpers.numerics import rounding_tolerance

CL = torch.channels_last


def _tower(channels_last: bool | None, build=build_timm_image) -> nn.Module:
    opts = {} if channels_last is None else {"channels_last": channels_last}
    cfg = TowerConfig(kind="timm_image", arch="test_resnet", input_size=16, options=opts)
    torch.manual_seed(0)
    return build(cfg, DataConfig()).trunk


def test_channels_last_is_the_default_and_changes_no_number() -> None:
    fast, plain = _tower(None), _tower(False)
    convs = [p for p in fast.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=CL) for p in convs)
    assert all(p.is_contiguous() for p in plain.parameters())
    assert not all(p.is_contiguous(memory_format=CL) for p in plain.parameters() if p.dim() == 4)
    assert list(fast.state_dict()) == list(plain.state_dict())  # bundles stay interchangeable
    x = torch.randn(4, 3, 16, 16)
    out_fast, out_plain = fast(x), plain(x)
    # another conv algorithm sums in another order: tolerance from the network's size and scale
    torch.testing.assert_close(out_fast, out_plain, **rounding_tolerance(plain, out_plain))
    out_fast.square().sum().backward()
    out_plain.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert a.grad.stride() == a.stride(), name  # autograd keeps the parameter's layout
        scale = float(b.grad.abs().max()) + 1e-6  # float rounding of another conv algorithm
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=2e-5 * scale, msg=name)


def test_channels_last_audio_trunk_matches_the_plain_one() -> None:
    fast, plain = _tower(True, build_timm_audio), _tower(False, build_timm_audio)
    spec = torch.randn(3, 1, 16, 20)  # the log-mel front end's (B, 1, mels, frames)
    out_fast, out_plain = fast(spec), plain(spec)
    torch.testing.assert_close(out_fast, out_plain, **rounding_tolerance(plain, out_plain))
    # the tolerance is rounding-sized: a real layout mix-up (frames read as mels) still fails
    wrong = fast(spec.transpose(2, 3).reshape(spec.shape).contiguous())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(wrong, out_plain, **rounding_tolerance(plain, out_plain))


def test_unknown_timm_option_names_the_key() -> None:
    with pytest.raises(ConfigError, match="channel_last"):
        TowerConfig(kind="timm_image", arch="test_resnet", options={"channel_last": True})


def test_fused_adamw_is_the_default_and_matches_the_loop() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    loop_net = copy.deepcopy(net)
    fused = make_optimizer(net, OptimConfig(weight_decay=0.1))
    loop = make_optimizer(loop_net, OptimConfig(weight_decay=0.1, fused=False))
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    x = torch.randn(5, 3, 8, 8)
    for _ in range(3):
        for model, opt in ((net, fused), (loop_net, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _mismatched(seed: int = 0) -> tuple[nn.Parameter, torch.Tensor, dict]:
    """A channels-last weight, a contiguous gradient and contiguous moments (as a checkpoint
    written by a contiguous-layout run would load them)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    moments = {"exp_avg": torch.randn(6, 4, 3, 3, generator=gen) * 0.1,
               "exp_avg_sq": torch.rand(6, 4, 3, 3, generator=gen) * 0.01}  # fmt: skip
    return (
        nn.Parameter(w.contiguous(memory_format=CL)),
        torch.randn(6, 4, 3, 3, generator=gen),
        moments,
    )


def _step(p: nn.Parameter, grad: torch.Tensor, moments: dict, fused: bool, align: bool) -> None:
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused or None)
    saved = {"state": {0: {"step": torch.tensor(3.0), **moments}},
             "param_groups": [{**opt.state_dict()["param_groups"][0]}]}  # fmt: skip
    opt.load_state_dict(copy.deepcopy(saved))
    p.grad = grad.clone()
    if align:
        assert align_layouts(opt) == 3  # the gradient and both moments were re-laid
        assert align_layouts(opt) == 0
    opt.step()


def test_align_layouts_makes_the_fused_step_equal_the_loop_for_channels_last() -> None:
    p_fused, grad, moments = _mismatched()
    p_loop = nn.Parameter(p_fused.detach().clone())
    assert p_fused.grad is None and grad.is_contiguous() and not p_fused.is_contiguous()
    _step(p_fused, grad, moments, fused=True, align=True)
    _step(p_loop, grad, moments, fused=False, align=False)
    assert p_fused.is_contiguous(memory_format=CL)
    torch.testing.assert_close(p_fused, p_loop, rtol=1e-6, atol=1e-7)


class _Letters(StringTrunk):
    """A tiny string trunk: mean of per-letter embeddings."""

    def __init__(self, cache_items: int) -> None:
        super().__init__(cache_items=cache_items)
        self.emb = nn.Embedding(128, 8)

    def embed(self, texts):
        return torch.stack(
            [self.emb(torch.tensor([ord(c) % 128 for c in t])).mean(0) for t in texts]
        )


@pytest.mark.parametrize("cache_items", [0, 100])
def test_frozen_towers_record_no_autograd_graph(cache_items: int) -> None:
    """lock=all trunks (cached or not) cost a forward only: no graph, no saved activations;
    only their projection heads train."""
    image = TowerConfig(kind="timm_image", arch="test_resnet", input_size=16, lock="all",
                        cache_items=cache_items)  # fmt: skip
    parts = {"image": build_timm_image(image, DataConfig())}
    parts["text"] = TowerParts(nn.Identity(), _Letters(cache_items), 8)
    for p in parts.values():
        apply_lock(p, image)
    encoder = MultimodalEncoder(parts, 4, {}).train()
    inputs = {"image": torch.randn(2, 3, 16, 16), "text": ["a cat", "a dog"]}
    for m, value in inputs.items():
        assert not encoder.trunks[m].training  # BatchNorm statistics stay fixed
        assert encoder.trunks[m](value).grad_fn is None, m
        assert encoder.encode(m, value).grad_fn is not None, m  # the head still trains
