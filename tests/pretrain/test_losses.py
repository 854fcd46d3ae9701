"""Contrastive losses against reference formulas written out naively (float64, 1e-10)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from modalign.pretrain import LossConfig
from modalign.pretrain.losses import ContrastiveLoss, pair_key, select_pairs

MODS = ["audio", "image", "text"]


def _features(n: int = 6, d: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        m: F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
        .detach()
        .requires_grad_(True)
        for m in MODS
    }


def _all_present(n: int) -> dict[str, torch.Tensor]:
    return {m: torch.ones(n, dtype=torch.bool) for m in MODS}


def _loss(cfg: LossConfig, mods: list[str] = MODS) -> ContrastiveLoss:
    return ContrastiveLoss(mods, cfg).double()


def clip_reference(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP: mean of the two cross-entropies, rows of a vs b and rows of b vs a."""
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def siglip_reference(
    x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Zhai et al. 2023, eq. 1, as a double loop: -1/n sum_ij log sigmoid(z_ij (t x_i.y_j + b))."""
    n = x.shape[0]
    total = x.new_zeros(())
    for i, j in itertools.product(range(n), range(n)):
        z = 1.0 if i == j else -1.0
        total = total + torch.log(torch.sigmoid(z * (t * (x[i] @ y[j]) + bias)))
    return -total / n


def _masked(features, present, a, b):
    keep = present[a] & present[b]
    return features[a][keep], features[b][keep]


def _grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


def test_select_pairs_all_and_anchor() -> None:
    assert select_pairs(MODS, "all") == [("audio", "image"), ("audio", "text"), ("image", "text")]
    assert select_pairs(MODS, "anchor", "image") == [("image", "audio"), ("image", "text")]
    with pytest.raises(ValueError, match="anchor"):
        select_pairs(MODS, "anchor", "depth")


@pytest.mark.parametrize("pairs", ["all", "anchor"])
def test_infonce_matches_clip_reference(pairs: str) -> None:
    feats = _features()
    crit = _loss(LossConfig(kind="infonce", pairs=pairs, anchor="image"))
    out = crit(feats, _all_present(6))
    selected = select_pairs(MODS, pairs, "image")
    ref = sum(
        clip_reference(feats[a], feats[b], crit.log_scale[pair_key(a, b)].exp())
        for a, b in selected
    ) / len(selected)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert out.value.item() == pytest.approx(ref.item(), abs=1e-10)
    params = [*feats.values(), *crit.log_scale.values()]
    for got, want in zip(_grads(out.loss, params), _grads(ref, params)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_infonce_rows_missing_a_modality_drop_out_of_that_pair() -> None:
    feats = _features(n=7)
    present = _all_present(7)
    present["audio"][[1, 4]] = False
    present["text"][[2]] = False
    crit = _loss(LossConfig(kind="infonce"))
    out = crit(feats, present)
    ref = (
        sum(
            clip_reference(*_masked(feats, present, a, b), crit.log_scale[pair_key(a, b)].exp())
            for a, b in select_pairs(MODS)
        )
        / 3
    )
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    params = [*feats.values(), *crit.log_scale.values()]
    got, want = _grads(out.loss, params), _grads(ref, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    assert torch.all(got[0][[1, 4]] == 0), "audio rows marked absent must get no gradient"


def test_pair_without_rows_is_skipped_but_keeps_its_temperature_in_the_graph() -> None:
    feats = _features()
    present = _all_present(6)
    present["audio"][:] = False  # audio absent for the whole batch
    crit = _loss(LossConfig(kind="infonce"))
    out = crit(feats, present)
    ref = clip_reference(feats["image"], feats["text"], crit.log_scale["image__text"].exp())
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    assert set(out.per_pair) == {"image__text"}
    out.loss.backward()
    grad = crit.log_scale["audio__image"].grad
    assert grad is not None and grad.item() == 0.0  # DDP needs a gradient for every parameter


def test_logit_scale_is_capped_with_gradient_flowing_and_clamp_() -> None:
    """Value capped at max_logit_scale (100); the gradient is the one at the cap (straight
    through, never zero), and clamp_() pulls the parameter back to log(100) after a step."""
    feats = _features()
    crit = _loss(LossConfig(kind="infonce", init_temperature=0.001))  # scale 1000 > cap
    key = "audio__image"
    assert crit.scale(key).item() == pytest.approx(100.0, rel=1e-12)
    out = crit({m: feats[m] for m in ("audio", "image")}, _all_present(6))
    at_cap = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    ref = clip_reference(feats["audio"], feats["image"], at_cap.exp())
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    (got,) = _grads(out.loss, [crit.log_scale[key]])
    (want,) = _grads(ref, [at_cap])
    assert got.item() != 0.0
    assert got.item() == pytest.approx(want.item(), abs=1e-10)
    crit.clamp_()
    assert crit.log_scale[key].item() == pytest.approx(math.log(100.0), abs=1e-12)
    below = _loss(LossConfig(kind="infonce", init_temperature=0.07))
    below.clamp_()
    assert below.log_scale[key].item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_fixed_temperature_gets_no_gradient() -> None:
    crit = _loss(LossConfig(kind="infonce", learn_temperature=False))
    assert not any(p.requires_grad for p in crit.log_scale.values())


def test_siglip_matches_paper_formula_with_learnable_bias() -> None:
    feats = _features(n=5)
    crit = _loss(LossConfig(kind="siglip", siglip_init_scale=10.0, siglip_init_bias=-10.0))
    out = crit(feats, _all_present(5))
    ref = (
        sum(
            siglip_reference(
                feats[a], feats[b], crit.log_scale[pair_key(a, b)].exp(), crit.bias[pair_key(a, b)]
            )
            for a, b in select_pairs(MODS)
        )
        / 3
    )
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    params = [*feats.values(), *crit.log_scale.values(), *crit.bias.values()]
    got, want = _grads(out.loss, params), _grads(ref, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)
    assert all(g.abs().sum() > 0 for g in got[-3:]), "bias must be learnable"


def test_siglip_masks_and_anchor_pairs() -> None:
    feats = _features(n=6)
    present = _all_present(6)
    present["text"][[0, 3]] = False
    crit = _loss(LossConfig(kind="siglip", pairs="anchor", anchor="audio"))
    out = crit(feats, present)
    pairs = [("audio", "image"), ("audio", "text")]
    assert sorted(crit.bias) == sorted(pair_key(a, b) for a, b in pairs)
    ref = (
        sum(
            siglip_reference(
                *_masked(feats, present, a, b),
                crit.log_scale[pair_key(a, b)].exp(),
                crit.bias[pair_key(a, b)],
            )
            for a, b in pairs
        )
        / 2
    )
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    got = _grads(out.loss, list(feats.values()))
    want = _grads(ref, list(feats.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def test_a_loss_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-way InfoNCE (a->b only) registered here, with its own options, matches its formula."""
    from dataclasses import dataclass

    from modalign.pretrain.losses import LOSSES, PairBatch, PairLoss

    monkeypatch.setattr(LOSSES, "_entries", dict(LOSSES._entries))  # registration ends with test

    @dataclass(frozen=True)
    class OneWayOptions:
        temperature: float = 0.5

    def one_way(cfg: LossConfig, opts: OneWayOptions) -> PairLoss:
        def loss(p: PairBatch) -> torch.Tensor:
            logits = (p.scale * p.fa @ p.all_b.T)[p.rows]
            target = (torch.arange(p.fa.shape[0]) + p.offset)[p.rows]
            return F.cross_entropy(logits, target, reduction="sum") / p.n_valid

        return PairLoss(math.log(1.0 / opts.temperature), loss)

    LOSSES.add("one_way_test", one_way, OneWayOptions, replace=True)
    crit = _loss(LossConfig(kind="one_way_test", options={"temperature": 0.25}), ["audio", "image"])
    feats = _features()
    out = crit({m: feats[m] for m in ("audio", "image")}, _all_present(6))
    logits = 4.0 * feats["audio"] @ feats["image"].T
    ref = F.cross_entropy(logits, torch.arange(6))
    assert torch.allclose(out.loss, ref, atol=1e-10)


def test_unknown_loss_and_option_name_the_key() -> None:
    from modalign.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss\.kind.*valid: infonce, siglip"):
        LossConfig(kind="nope")
    with pytest.raises(ConfigError, match=r"loss\.options\.tau"):
        LossConfig(kind="infonce", options={"tau": 1.0})
    with pytest.raises(ConfigError, match=r"loss\.pairs.*all, anchor"):
        LossConfig(pairs="some")
