"""Pseudo-labels that never hurt: label propagation, training-set balance, soft weights,
calibrated zero-shot + few-shot mixing and the cross-validated ``auto`` default (issue 20)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modalign.core.errors import ConfigError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.pipeline import _context, pseudo_label_head
from modalign.finetune.pseudo.algorithms import label_propagation
from modalign.finetune.pseudo.fewshot import (
    fit_temperature,
    leave_one_out_scores,
    mix_zero_and_few_shot,
)
from modalign.finetune.pseudo.labelers import (
    PSEUDO_LABELERS,
    Labeler,
    LabelerOutput,
    SelectOptions,
    select_weights,
)
from modalign.finetune.pseudo.labels import NO_LABEL, PseudoLabels
from modalign.finetune.pseudo.selection import balance_classes, soft_weights

NAMES = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _scoped_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PSEUDO_LABELERS, "_entries", dict(PSEUDO_LABELERS._entries))


def _two_moons(n_per: int = 150, noise: float = 0.06, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(2, n_per, generator=gen) * math.pi
    upper = torch.stack([torch.cos(t[0]), torch.sin(t[0])], 1)
    lower = torch.stack([1 - torch.cos(t[1]), 0.5 - torch.sin(t[1])], 1)
    xy = torch.cat([upper, lower]) + noise * torch.randn(2 * n_per, 2, generator=gen)
    # lifted far from the origin: cosine neighbourhoods follow 2-D distances
    x = torch.cat([xy, torch.full((2 * n_per, 1), 4.0)], 1)
    return x, torch.cat([torch.zeros(n_per), torch.ones(n_per)]).long(), t


def _blobs(n: int = 240, classes: int = 3, dim: int = 8, spread: float = 0.35, seed: int = 0):
    """Elongated Gaussian blobs: a few labels sit far from their class centre, so a classifier
    of the labels alone errs where the cluster structure (propagation) does not."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=gen)
    y = torch.arange(n) % classes
    x = centres[y] + spread * torch.randn(n, dim, generator=gen) * torch.linspace(3, 0.3, dim)
    return x, y


def _set(x: torch.Tensor, y: torch.Tensor) -> EmbeddedSet:
    n = len(y)
    return EmbeddedSet(
        [str(i) for i in range(n)], {"image": x}, {"image": torch.ones(n, dtype=torch.bool)}, y
    )


def _split(x: torch.Tensor, y: torch.Tensor, per_class: int, classes: int):
    lab = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(classes)])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[lab] = False
    return _set(x[lab], y[lab]), _set(x[rest], y[rest])


def _cfg(**kw) -> FinetuneConfig:
    base = {"inputs": ["image"], "class_names": NAMES, "epochs": 15, "min_steps": 0,
            "batch_size": 64}  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


_MODEL = SimpleNamespace(modalities=["image"])  # labelers only ask which towers exist


# ------------------------------------------------------------------------ label propagation


def test_label_propagation_covers_pool_and_beats_nearest_label_on_two_moons() -> None:
    x, y, t = _two_moons()
    lab = torch.tensor([int(t[0].argmax()), 150 + int(t[1].argmin())])  # the far tips
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[lab] = False
    pl = label_propagation(x[rest], x[lab], y[lab], 2, k=10, center=False)
    assert (pl.labels != NO_LABEL).all()  # the graph is connected: every row gets a label
    acc = (pl.labels == y[rest]).float().mean()
    nearest = (F.normalize(x[rest], dim=1) @ F.normalize(x[lab], dim=1).T).argmax(1)
    assert acc > 0.9 and acc > (y[lab][nearest] == y[rest]).float().mean() + 0.2
    assert torch.allclose(pl.probs.sum(1), torch.ones(len(pl.labels)))


def test_label_propagation_unreachable_rows_and_class_mass() -> None:
    gen = torch.Generator().manual_seed(0)
    labeled = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0]])
    near = F.normalize(torch.tensor([[1.0, 0.05, 0.0]]) + 0.01 * torch.randn(6, 3, generator=gen))
    far = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.01, 1.0]])  # only each other as neighbours
    pl = label_propagation(torch.cat([near, far]), labeled, torch.tensor([0, 1]), 2, k=1,
                           center=False)  # fmt: skip
    assert (pl.labels[6:] == NO_LABEL).all() and (pl.confidence[6:] == 0).all()
    assert (pl.labels[:6] != NO_LABEL).all()
    # class-mass normalisation: the pool's total score per class follows the label proportions
    x, y = _blobs()
    lab, pool = _split(x, y, 2, 3)
    out = label_propagation(pool.x["image"], lab.x["image"], lab.y, 3)
    counts = torch.bincount(out.labels, minlength=3).float()
    assert counts.min() / counts.max() > 0.6


# ------------------------------------------------------------------ balance and soft weights


def test_balance_counts_the_labeled_rows() -> None:
    # the failure: 4 labels per class + 19 confident pseudo-labels of one class
    labels = torch.full((30,), NO_LABEL)
    labels[:19] = 2
    pl = PseudoLabels(labels, torch.linspace(1.0, 0.5, 30), "t")
    old = balance_classes(pl, 9, ratio=1.5)
    assert int(old.sum()) == 19  # judged among pseudo-labels only, all 19 pass
    new = balance_classes(pl, 9, ratio=1.5, labeled_counts=torch.full((9,), 4))
    assert int(new.sum()) == 2 and new[:2].all()  # 4 + 2 = floor(1.5 x 4)
    exact = balance_classes(pl, 9, ratio=1.0, labeled_counts=torch.full((9,), 4))
    assert int(exact.sum()) == 0
    # a class short of labels is topped up first
    pl2 = PseudoLabels(torch.tensor([0, 0, 0, 1, 1, 1]), torch.ones(6), "t")
    keep = balance_classes(pl2, 2, ratio=1.0, labeled_counts=torch.tensor([3, 1]))
    assert keep.tolist() == [True, False, False, True, True, True]  # both classes end at 4
    with pytest.raises(Exception, match="labeled_counts"):
        balance_classes(pl2, 2, labeled_counts=torch.tensor([1]))


def test_soft_weights_follow_softmatch() -> None:
    conf = torch.tensor([0.9, 0.8, 0.5, 0.2, 0.95])
    rows = torch.tensor([True, True, True, True, False])
    w = soft_weights(conf, rows)
    mu = conf[:4].mean()
    assert w[4] == 0 and w[0] == 1 and w[1] == 1  # above the mean: full weight
    var = conf[:4].var(unbiased=False)
    assert torch.isclose(w[3], torch.exp(-((0.2 - mu) ** 2) / (2 * var)))
    assert 0 < w[3] < w[2] < 1


def test_select_weights_balances_over_training_set() -> None:
    pl = PseudoLabels(torch.tensor([0, 0, 0, 0, 1, NO_LABEL]), torch.ones(6), "t")
    w = select_weights(pl, torch.tensor([0, 1, 1]), 2, SelectOptions(weighting="hard", ratio=1.0))
    # class 0: 1 label + up to 4; class 1: 2 labels + 1 -> total cap 3 each
    assert w.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------- calibration and zero-shot mix


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 5, generator=gen)
    y = torch.multinomial((scores / 0.25).softmax(1), 1, generator=gen).squeeze(1)
    t = fit_temperature(scores, y, torch.tensor([0.05, 0.1, 0.25, 0.5, 1.0]))
    assert t == 0.25


def test_leave_one_out_marks_single_label_rows_invalid() -> None:
    x = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2])
    scores, valid = leave_one_out_scores(x, y, 3)
    assert valid.tolist() == [True, True, True, True, False]
    assert torch.isclose(scores[0, 0], x[0] @ x[1])  # own class prototype without itself


def test_zero_shot_mix_uses_text_and_labels() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=gen), dim=1)
    y = torch.arange(300) % 3
    x = F.normalize(centres[y] + 0.3 * torch.randn(300, 16, generator=gen), dim=1)
    lab, pool = _split(x, y, 3, 3)
    # text embeddings: right direction for classes 0, 1; class 2's text points at class 1
    text = torch.stack([centres[0], centres[1], centres[1]])
    pl, info = mix_zero_and_few_shot(lab, pool, text)
    assert 0.0 <= info["mix"] < 1.0  # the labels reveal the broken class-2 prompt
    zero_only, _ = mix_zero_and_few_shot(lab, pool, text, mix=1.0)
    acc = (pl.labels == pool.y).float().mean()
    assert acc > 0.85 and acc > (zero_only.labels == pool.y).float().mean() + 0.15
    single, _ = _split(x, y, 1, 3)
    _, info1 = mix_zero_and_few_shot(single, pool, text, one_label_mix=0.3)
    assert info1["mix"] == 0.3 and info1["held_out_rows"] == 0


# ---------------------------------------------------------------------------- auto default


@dataclass(frozen=True)
class _Hard:
    pass


def _register_fixed(name: str, wrong: bool, other_view: bool = False) -> None:
    """A labeler that returns every pool row's true label (or a wrong one), confidence 1."""

    def run(ctx, opts) -> LabelerOutput:
        y = ctx.pool.y.clone()
        known = y != NO_LABEL
        if wrong:
            y[known] = (y[known] + 1) % len(ctx.class_names)
        labels = PseudoLabels(y, known.float(), name)
        return LabelerOutput(labels, weights=known.float())

    PSEUDO_LABELERS.add(name, Labeler(run, other_view=other_view), _Hard, replace=True)


def _auto(lab: EmbeddedSet, pool: EmbeddedSet, candidates: list[str], **opts):
    cfg = _cfg(pseudo_label="auto", pseudo_label_options={"candidates": candidates, **opts})
    head, reports = pseudo_label_head(_MODEL, lab, pool, NAMES, cfg)
    return head, reports[0]


@pytest.mark.heavy
@pytest.mark.slow  # two cross-validations: about 15 small heads
def test_auto_picks_none_when_pseudo_labels_hurt_and_a_labeler_when_they_help() -> None:
    _register_fixed("wrong_test", wrong=True)
    _register_fixed("right_test", wrong=False)
    x, y = _blobs(spread=0.9)  # labels alone get about 0.92 of the pool right
    lab, pool = _split(x, y, 4, 3)
    _, bad = _auto(lab, pool, ["none", "wrong_test"])
    assert bad["auto"]["chosen"] == "none" and bad["num_selected"] == 0
    scores = bad["auto"]["cv_accuracy"]
    assert scores["wrong_test"] < scores["none"] and bad["auto"]["folds"] == 4
    _, good = _auto(lab, pool, ["none", "wrong_test", "right_test"])
    assert good["auto"]["chosen"] == "right_test" and good["accuracy"] == 1.0
    assert good["auto"]["cv_accuracy"]["right_test"] > good["auto"]["cv_accuracy"]["none"]


@pytest.mark.slow
def test_auto_with_one_label_per_class_uses_reverse_validation() -> None:
    _register_fixed("wrong_test", wrong=True)
    _register_fixed("right_test", wrong=False)
    x, y = _blobs()
    lab, pool = _split(x, y, 1, 3)
    _, bad = _auto(lab, pool, ["wrong_test"])
    assert bad["auto"]["criterion"] == "reverse_validation" and bad["auto"]["chosen"] == "none"
    _, good = _auto(lab, pool, ["wrong_test", "right_test"])
    assert good["auto"]["chosen"] == "right_test"
    assert good["auto"]["reverse_accuracy"]["right_test"] == 1.0
    _, off = _auto(lab, pool, ["right_test"], one_label="none")
    assert off["auto"]["chosen"] == "none"
    # a labeler that reads another view is not judged by reverse validation (anchored on the
    # labeled rows' inputs): the default takes the first such candidate, ``reverse`` does not
    _register_fixed("view_test", wrong=True, other_view=True)
    _, view = _auto(lab, pool, ["wrong_test", "right_test", "view_test"])
    assert view["auto"]["criterion"] == "one_label_other_view"
    assert view["auto"]["chosen"] == "view_test" and view["auto"]["other_view"] == ["view_test"]
    _, rev = _auto(lab, pool, ["right_test", "view_test"], one_label="reverse")
    assert (
        rev["auto"]["criterion"] == "reverse_validation" and rev["auto"]["chosen"] == "right_test"
    )


@pytest.mark.slow
def test_auto_propagation_helps_on_clusters_and_is_deterministic() -> None:
    x, y = _blobs(seed=3)
    lab, pool = _split(x, y, 2, 3)
    cfg = _cfg(pseudo_label="propagation")
    _, rep = pseudo_label_head(_MODEL, lab, pool, NAMES, cfg)
    assert rep[0]["coverage"] > 0.9 and rep[0]["accuracy"] > 0.9
    a, ra = _auto(lab, pool, ["none", "propagation"])
    b, rb = _auto(lab, pool, ["none", "propagation"])
    assert ra == rb
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert set(ra["auto"]["cv_accuracy"]) == {"none", "propagation"}


@pytest.mark.slow
def test_auto_skips_candidates_the_model_cannot_run() -> None:
    x, y = _blobs()
    lab, pool = _split(x, y, 2, 3)
    _, rep = _auto(lab, pool, ["none", "zero_shot_mix"])
    assert "zero_shot_mix" in rep["auto"]["skipped"]
    assert "text tower" in rep["auto"]["skipped"]["zero_shot_mix"]


def test_default_is_auto_and_options_are_checked_naming_the_key() -> None:
    assert FinetuneConfig().pseudo_label == "auto"
    bad = [
        ({"candidates": ["nope"]}, r"finetune\.pseudo_label_options.*nope"),
        ({"folds": 1}, r"finetune\.pseudo_label_options.*folds"),
        ({"one_label": "guess"}, r"finetune\.pseudo_label_options.*one_label"),
        ({"candidate_options": {"knn": {"k": 3}}}, r"candidate_options\.knn"),
        (
            {"candidate_options": {"propagation": {"weighting": "x"}}},
            r"candidate_options\.propagation.*weighting",
        ),
        ({"bogus": 1}, r"finetune\.pseudo_label_options\.bogus"),
    ]
    for opts, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            FinetuneConfig(pseudo_label="auto", pseudo_label_options=opts)
    with pytest.raises(ConfigError, match=r"finetune\.pseudo_label_options.*fraction"):
        FinetuneConfig(pseudo_label="propagation", pseudo_label_options={"fraction": 0})


def test_context_generator_is_seeded() -> None:
    x, y = _blobs()
    lab, pool = _split(x, y, 2, 3)
    a = _context(_MODEL, lab, pool, NAMES, _cfg(seed=5)).gen
    b = _context(_MODEL, lab, pool, NAMES, _cfg(seed=5)).gen
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
