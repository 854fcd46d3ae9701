"""The ``balanced_kmeans`` pseudo-labeler (PT-MAP-style soft k-means with a Sinkhorn class
marginal, issue 20): the transport plan, the balanced assignment against the unbalanced one, the
labeler through the pipeline, and bad options refused naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modalign.core.errors import ConfigError, UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet
from modalign.finetune.pipeline import pseudo_label_head
from modalign.finetune.pseudo.labels import NO_LABEL
from modalign.finetune.pseudo.transport import balanced_kmeans, sinkhorn

NAMES = ["a", "b", "c"]
_PLAIN = {"dims": 0, "whiten": False, "power": 1.0, "sharpness": 10.0}  # raw geometry


def _blobs(seed: int = 2, n: int = 150, dim: int = 10):
    """Three equal-size Gaussian classes, one wide and two tight, close together: prototypes of
    two labels each sit off-centre, and the wide class's prototype swallows the tight classes'
    edges unless every class must take a third of the pool."""
    gen = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(3, dim, generator=gen)
    spread = torch.tensor([2.0, 0.4, 0.4])
    y = torch.arange(3 * n) % 3
    return centres[y] + spread[y, None] * torch.randn(3 * n, dim, generator=gen), y


def _split(x: torch.Tensor, y: torch.Tensor, per_class: int):
    lab = torch.cat([(y == c).nonzero().flatten()[:per_class] for c in range(3)])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[lab] = False
    return lab, rest


def test_sinkhorn_meets_both_marginals() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(40, 4, generator=gen)
    mass = torch.tensor([4.0, 8.0, 12.0, 16.0])
    plan = sinkhorn(logits, mass, iterations=200)
    assert torch.allclose(plan.sum(1), torch.ones(40), atol=1e-5)
    assert torch.allclose(plan.sum(0), mass, atol=1e-3)
    # a very sharp cost stays finite (log domain)
    assert torch.isfinite(sinkhorn(1e4 * logits, mass)).all()


def test_balanced_assignment_beats_unbalanced_and_nearest_prototype() -> None:
    x, y = _blobs()
    lab, rest = _split(x, y, 2)

    def acc(**kw) -> float:
        pl = balanced_kmeans(x[rest], x[lab], y[lab], 3, **{**_PLAIN, **kw})
        return float((pl.labels == y[rest]).float().mean())

    balanced, unbalanced = acc(marginal="uniform"), acc(marginal="none")
    nearest = acc(marginal="none", iterations=0)  # the labels' prototypes alone
    assert balanced >= unbalanced and balanced > nearest + 0.05
    pl = balanced_kmeans(x[rest], x[lab], y[lab], 3, **_PLAIN)
    assert torch.allclose(pl.probs.sum(0), torch.full((3,), rest.sum() / 3), rtol=1e-3)
    assert torch.equal(pl.labels, balanced_kmeans(x[rest], x[lab], y[lab], 3, **_PLAIN).labels)
    # marginal "labels": the pool's class masses follow the labels' shares (3 : 1 : 1 here)
    lab_skew = torch.cat([lab, (y == 0).nonzero().flatten()[2:6]])
    rest_skew = rest.clone()
    rest_skew[lab_skew] = False
    out = balanced_kmeans(
        x[rest_skew], x[lab_skew], y[lab_skew], 3, marginal="labels", **_PLAIN
    ).probs.sum(0)
    assert torch.allclose(out / out.sum(), torch.tensor([0.6, 0.2, 0.2]), atol=1e-3)
    # the default preprocessing (power, PCA-whitened, L2) runs on signed features too
    assert (balanced_kmeans(x[rest], x[lab], y[lab], 3, dims=4).labels >= 0).all()
    # a pool row with no modality present (all zeros) is left unlabelled
    empty = torch.cat([x[rest][:30], torch.zeros(1, x.shape[1])])
    out_empty = balanced_kmeans(empty, x[lab], y[lab], 3, **_PLAIN)
    assert out_empty.labels[-1] == NO_LABEL and out_empty.confidence[-1] == 0
    assert (out_empty.labels[:-1] >= 0).all()
    with pytest.raises(UserInputError, match="at least one labeled row"):
        balanced_kmeans(x[rest], x[lab[:4]], y[lab[:4]], 3)
    with pytest.raises(UserInputError, match=r"labels must lie in \[0, 2\)"):
        balanced_kmeans(x[rest], x[lab], y[lab], 2)  # a label of class 2 with 2 classes
    with pytest.raises(UserInputError, match=r"balanced_kmeans: need \(N, D\)"):
        balanced_kmeans(x[rest][:, :3], x[lab], y[lab], 3)


def test_balanced_kmeans_labeler_through_the_pipeline_and_bad_options() -> None:
    x, y = _blobs()
    lab, rest = _split(x, y, 2)

    def eset(idx: torch.Tensor) -> EmbeddedSet:
        n = int(idx.numel()) if idx.dtype != torch.bool else int(idx.sum())
        return EmbeddedSet(
            [str(i) for i in range(n)], {"image": x[idx]}, {"image": torch.ones(n, dtype=torch.bool)},
            y[idx],
        )  # fmt: skip

    cfg = FinetuneConfig(
        inputs=["image"], class_names=NAMES, epochs=3, batch_size=128, min_steps=0,
        pseudo_label="balanced_kmeans", pseudo_label_options=_PLAIN,
    )  # fmt: skip
    _, reports = pseudo_label_head(SimpleNamespace(modalities=["image"]), eset(lab), eset(rest),
                                   NAMES, cfg)  # fmt: skip
    # by default each class's most confident 30% of the pool joins the labels
    assert 0.25 < reports[0]["coverage"] <= 0.3 and reports[0]["accuracy"] > 0.95
    bad = [
        ({"marginal": "skewed"}, "marginal"),
        ({"power": 0}, "power"),
        ({"dims": -1}, "dims"),
        ({"sharpness": 0}, "sharpness"),
        ({"step": 1.5}, "step"),
        ({"iterations": -1}, "iterations"),
        ({"ratio": 0.5}, "ratio"),
    ]
    for opts, key in bad:
        with pytest.raises(ConfigError, match=rf"finetune\.pseudo_label_options.*{key}"):
            FinetuneConfig(pseudo_label="balanced_kmeans", pseudo_label_options=opts)
