"""Tests for modalign.finetune.pseudo.algorithms."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from modalign.core.errors import UserInputError
from modalign.finetune.pseudo.algorithms import (
    NO_LABEL,
    FixedThreshold,
    FlexMatchThreshold,
    FreeMatchThreshold,
    PseudoLabels,
    balance_classes,
    class_prompt_embeddings,
    knn_propagate,
    pseudo_label_report,
    self_training_loss,
    zero_shot,
)

# ------------------------------------------------------------------------------ zero-shot


def _clustered(n: int = 200, classes: int = 4, dim: int = 16, noise: float = 0.3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    y = torch.randint(0, classes, (n,), generator=gen)

    def view() -> torch.Tensor:
        return F.normalize(
            centres[y] + noise * torch.randn(n, dim, generator=gen) / dim**0.5, dim=1
        )

    return {"image": view(), "audio": view()}, y, centres


def test_zero_shot_accuracy_on_clusters():
    emb, y, centres = _clustered()
    pl = zero_shot(emb, None, centres)
    assert pl.method == "zero_shot"
    assert pl.labels.dtype == torch.long and pl.labels.shape == y.shape
    assert ((pl.confidence >= 0) & (pl.confidence <= 1)).all()
    assert (pl.labels == y).float().mean() > 0.95


def test_zero_shot_ignores_absent_garbage_and_handles_empty_rows():
    emb, _, centres = _clustered(n=50)
    present = {"image": torch.rand(50) < 0.6, "audio": torch.rand(50) < 0.6}
    present["image"][:3] = torch.tensor([True, False, False])
    present["audio"][:3] = torch.tensor([False, True, False])
    garbage = {m: torch.where(present[m][:, None], x, float("nan")) for m, x in emb.items()}
    clean = {m: torch.where(present[m][:, None], x, 0.0) for m, x in emb.items()}
    a, b = zero_shot(garbage, present, centres), zero_shot(clean, present, centres)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.labels, b.labels)
    # Row 0 has only image: equals image-only zero-shot.
    image_only = zero_shot({"image": emb["image"]}, None, centres)
    torch.testing.assert_close(a.probs[0], image_only.probs[0])
    # Row 2 has nothing: no label, zero confidence.
    assert a.labels[2] == NO_LABEL and a.confidence[2] == 0
    # A row with both modalities averages the two per-modality distributions.
    both = int(torch.nonzero(present["image"] & present["audio"])[0])
    audio_only = zero_shot({"audio": emb["audio"]}, None, centres)
    torch.testing.assert_close(a.probs[both], (image_only.probs[both] + audio_only.probs[both]) / 2)


def test_zero_shot_rejects_bad_inputs():
    emb, _, centres = _clustered(n=5)
    with pytest.raises(UserInputError):
        zero_shot(emb, None, centres, temperature=0.0)
    with pytest.raises(UserInputError):
        zero_shot({"image": torch.zeros(5, 3)}, None, centres)


def test_class_prompt_embeddings_averages_templates():
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        for t in texts:
            table.setdefault(t, torch.randn(8, generator=gen) * 3)
        return torch.stack([table[t] for t in texts])

    names, templates = ["zero", "one"], ["a photo of the digit {}", "someone saying {}"]
    out = class_prompt_embeddings(encode, names, templates)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    expected = F.normalize(
        F.normalize(table["a photo of the digit one"], dim=0)
        + F.normalize(table["someone saying one"], dim=0),
        dim=0,
    )
    torch.testing.assert_close(out[1], expected)
    with pytest.raises(UserInputError):
        class_prompt_embeddings(encode, names, ["no placeholder"])


# ------------------------------------------------------------------------------ propagation


def _two_moons(n_per: int = 150, noise: float = 0.06, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(2, n_per, generator=gen) * math.pi
    upper = torch.stack([torch.cos(t[0]), torch.sin(t[0])], 1)
    lower = torch.stack([1 - torch.cos(t[1]), 0.5 - torch.sin(t[1])], 1)
    xy = torch.cat([upper, lower]) + noise * torch.randn(2 * n_per, 2, generator=gen)
    # Lift onto the sphere far from the origin, so cosine neighbourhoods follow 2-D distances.
    feats = torch.cat([xy, torch.full((2 * n_per, 1), 4.0)], 1)
    y = torch.cat([torch.zeros(n_per), torch.ones(n_per)]).long()
    return feats, y, t


def test_knn_propagate_beats_nearest_labeled_on_two_moons():
    feats, y, t = _two_moons()
    n_per = feats.shape[0] // 2
    # One label per class at the far tip of each moon: nearest-labeled gets the middle wrong.
    lab_idx = torch.tensor([int(t[0].argmax()), n_per + int(t[1].argmin())])
    unl_mask = torch.ones(len(y), dtype=torch.bool)
    unl_mask[lab_idx] = False
    labeled, unlabeled = feats[lab_idx], feats[unl_mask]
    pl = knn_propagate(
        unlabeled, labeled, y[lab_idx], num_classes=2, k=10, alpha=0.99, iterations=100
    )
    assert pl.method == "knn_propagate"
    assert ((pl.confidence >= 0) & (pl.confidence <= 1)).all()
    acc = (pl.labels == y[unl_mask]).float().mean()
    sims = F.normalize(unlabeled, dim=1) @ F.normalize(labeled, dim=1).T
    nn_acc = (y[lab_idx][sims.argmax(1)] == y[unl_mask]).float().mean()
    assert acc > 0.9
    assert acc > nn_acc + 0.2


def test_knn_propagate_clusters_and_torch_fallback(monkeypatch):
    emb, y, _ = _clustered(n=240, classes=3, noise=0.5, seed=2)
    x = emb["image"]
    lab_idx = torch.cat([torch.nonzero(y == c)[:2, 0] for c in range(3)])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[lab_idx] = False
    pl = knn_propagate(x[rest], x[lab_idx], y[lab_idx], 3, k=8)
    assert (pl.labels == y[rest]).float().mean() > 0.95
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)  # import now fails -> torch sparse
    fallback = knn_propagate(x[rest], x[lab_idx], y[lab_idx], 3, k=8)
    torch.testing.assert_close(fallback.probs, pl.probs, rtol=1e-5, atol=1e-6)


def test_knn_propagate_unreachable_row_gets_no_label():
    labeled = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    unlabeled = torch.tensor([[0.9, 0.1, 0.0], [-1.0, -1.0, 0.0]])
    pl = knn_propagate(unlabeled, labeled, torch.tensor([0, 1]), 2, k=1)
    assert pl.labels.tolist() == [0, NO_LABEL]
    assert pl.confidence[1] == 0 and pl.confidence[0] > 0


def test_knn_propagate_rejects_bad_labels():
    with pytest.raises(UserInputError):
        knn_propagate(torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0, 5]), 2)


# ------------------------------------------------------------------------------ thresholds


def test_fixed_threshold_masks_exactly_max_prob_at_least_tau():
    probs = torch.tensor([[0.95, 0.05], [0.949, 0.051], [0.02, 0.98], [0.5, 0.5]])
    assert FixedThreshold(0.95).mask(probs).tolist() == [True, False, True, False]
    with pytest.raises(UserInputError):
        FixedThreshold(1.5)


def _confident(cls: int, n: int, num_classes: int = 3, conf: float = 0.99) -> torch.Tensor:
    probs = torch.full((n, num_classes), (1 - conf) / (num_classes - 1))
    probs[:, cls] = conf
    return probs


def test_flexmatch_lowers_thresholds_for_rarely_confident_classes():
    thr = FlexMatchThreshold(3, tau=0.9, warmup=False)
    thr.update(torch.cat([_confident(0, 8), _confident(1, 2), _confident(2, 5, conf=0.5)]))
    beta = torch.tensor([1.0, 0.25, 0.0])  # sigma = [8, 2, 0] over max 8
    torch.testing.assert_close(thr.learning_effect(), beta)
    torch.testing.assert_close(thr.thresholds(), 0.9 * beta / (2 - beta))
    cut = thr.thresholds()
    assert cut[0] == pytest.approx(0.9) and cut[2] < cut[1] < cut[0]
    # A class-1 row at 0.5 confidence passes; a class-0 row at 0.5 does not.
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]])
    assert thr.mask(probs).tolist() == [True, False]


def test_flexmatch_warmup_and_per_row_tracking():
    warm = FlexMatchThreshold(2, tau=0.9, warmup=True)
    assert torch.equal(warm.thresholds(), torch.zeros(2))  # nothing seen
    warm.update(torch.cat([_confident(0, 2, 2), _confident(1, 6, 2, conf=0.6)]))
    # sigma = [2, 0], unused = 6 -> beta = [1/3, 0].
    torch.testing.assert_close(warm.learning_effect(), torch.tensor([1 / 3, 0.0]))
    rows = FlexMatchThreshold(2, tau=0.9, num_unlabeled=5)
    rows.update(_confident(0, 2, 2), indices=torch.tensor([0, 1]))
    rows.update(_confident(1, 1, 2), indices=torch.tensor([1]))  # row 1 now predicted as class 1
    rows.update(_confident(1, 1, 2, conf=0.6), indices=torch.tensor([0]))  # unconfident: kept
    # latest = [0, 1, -1, -1, -1] -> sigma = [1, 1], unused = 3 -> beta = 1/3 each.
    torch.testing.assert_close(rows.learning_effect(), torch.tensor([1 / 3, 1 / 3]))
    with pytest.raises(UserInputError):
        rows.update(_confident(0, 1, 2))


def test_freematch_threshold_rises_with_confidence():
    thr = FreeMatchThreshold(4, ema=0.9)
    torch.testing.assert_close(thr.thresholds(), torch.full((4,), 0.25))
    previous = float(thr.global_threshold)
    for conf in (0.5, 0.7, 0.9, 0.99):
        probs = torch.cat([_confident(c, 4, 4, conf) for c in range(4)])
        thr.update(probs)
        assert float(thr.global_threshold) > previous
        previous = float(thr.global_threshold)
    expected = 0.25
    for conf in (0.5, 0.7, 0.9, 0.99):
        expected = 0.9 * expected + 0.1 * conf
    assert float(thr.global_threshold) == pytest.approx(expected, rel=1e-5)
    # Balanced predictions: local factors are all 1, so class thresholds equal the global one.
    torch.testing.assert_close(thr.thresholds(), torch.full((4,), expected))
    # A class predicted less often gets a lower local threshold.
    thr.update(torch.cat([_confident(0, 12, 4), _confident(1, 4, 4)]))
    cut = thr.thresholds()
    assert cut[3] < cut[0] and cut[0] == pytest.approx(float(thr.global_threshold))


def test_self_training_loss_matches_manual():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=gen, requires_grad=True)
    probs = torch.tensor(
        [
            [0.97, 0.02, 0.01],
            [0.4, 0.3, 0.3],
            [0.0, 0.99, 0.01],
            [0.3, 0.3, 0.4],
            [0, 0, 1.0],
            [0.5, 0.5, 0],
        ]
    )
    loss, mask = self_training_loss(logits, probs, FixedThreshold(0.95))
    assert mask.tolist() == [True, False, True, False, True, False]
    ce = F.cross_entropy(logits, probs.argmax(1), reduction="none")
    torch.testing.assert_close(loss, ce[mask].sum() / 6)
    loss.backward()
    assert torch.all(logits.grad[~mask] == 0) and logits.grad[mask].abs().sum() > 0
    loss_f, mask_f = self_training_loss(logits, probs, 0.95)
    assert torch.equal(mask_f, mask) and torch.allclose(loss_f, loss)


# ------------------------------------------------------------------------------ selection


def _pl() -> PseudoLabels:
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2, NO_LABEL, 0])
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.95, 0.3, 0.0, 0.99])
    return PseudoLabels(labels=labels, confidence=conf, method="test")


def test_balance_classes_caps():
    pl = _pl()  # class counts: 0 -> 6, 1 -> 2, 2 -> 1
    sel = balance_classes(pl, 3)  # ratio 1 -> cap = smallest class = 1
    assert torch.nonzero(sel).squeeze(1).tolist() == [6, 7, 9]
    sel2 = balance_classes(pl, 3, ratio=2.0)  # cap 2: best two of each
    assert torch.nonzero(sel2).squeeze(1).tolist() == [0, 5, 6, 7, 9]
    sel3 = balance_classes(pl, 3, max_per_class=3, ratio=None)
    assert torch.nonzero(sel3).squeeze(1).tolist() == [0, 1, 5, 6, 7, 9]
    everything = balance_classes(pl, 3, ratio=None)
    assert torch.equal(everything, pl.labels >= 0)
    for s in (sel, sel2, sel3):
        assert torch.bincount(pl.labels[s], minlength=3).max() <= 3
    eligible = pl.confidence >= 0.5
    sel4 = balance_classes(pl, 3, ratio=None, max_per_class=2, eligible=eligible)
    assert torch.nonzero(sel4).squeeze(1).tolist() == [0, 6, 9]
    with pytest.raises(UserInputError):
        balance_classes(pl, 3, ratio=0.0)


def test_pseudo_label_report_matches_hand_counts():
    pl = _pl()
    selected = torch.tensor([True, True, False, False, False, True, True, True, True, False])
    truth = torch.tensor([0, 1, 0, 0, 0, 1, 2, -1, 0, 0])
    report = pseudo_label_report(pl, selected, truth)
    # Row 8 has no pseudo-label, so 5 rows are selected: 0, 1, 5, 6, 7.
    assert report["num_rows"] == 10 and report["num_selected"] == 5
    assert report["coverage"] == pytest.approx(0.5)
    # Known truth among selected: rows 0 (ok), 1 (wrong), 5 (ok), 6 (wrong); row 7 unknown.
    assert report["accuracy"] == pytest.approx(0.5)
    assert report["per_class_counts"] == [2, 2, 1]
    assert report["mean_confidence"] == pytest.approx((0.9 + 0.8 + 0.4 + 0.95 + 0.3) / 5)
    no_truth = pseudo_label_report(pl, selected, None)
    assert no_truth["accuracy"] is None
    empty = pseudo_label_report(pl, torch.zeros(10, dtype=torch.bool), truth, num_classes=4)
    assert (
        empty["coverage"] == 0
        and empty["accuracy"] is None
        and empty["per_class_counts"] == [0] * 4
    )
