"""Tests for modalign.finetune.metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modalign.core.errors import UserInputError
from modalign.finetune.metrics import classification_metrics, save_confusion_png
from modalign.finetune.robustness import fgsm, pgd, robustness_auc

Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]


def test_classification_metrics_by_hand():
    m = classification_metrics(Y_TRUE, Y_PRED, num_classes=5)
    assert m["accuracy"] == pytest.approx(6 / 10)
    # class 0: TP 2, FP 1, FN 1 -> 4/6; class 1: TP 1, FP 2, FN 1 -> 2/5;
    # class 2: TP 3, FP 1, FN 1 -> 6/8; class 3: TP 0, FN 1 -> 0; class 4 never occurs.
    per_class = [4 / 6, 2 / 5, 6 / 8, 0.0]
    assert m["per_class_f1"][:4] == pytest.approx(per_class) and m["per_class_f1"][4] is None
    assert m["macro_f1"] == pytest.approx(sum(per_class) / 4)
    assert m["confusion"][2] == [1, 0, 3, 0, 0]
    assert sum(map(sum, m["confusion"])) == 10


def test_classification_metrics_matches_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    y_true = torch.randint(0, 6, (300,), generator=gen)
    y_pred = torch.where(
        torch.rand(300, generator=gen) < 0.6, y_true, torch.randint(0, 5, (300,), generator=gen)
    )
    m = classification_metrics(y_true, y_pred, num_classes=7)
    assert m["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y_true, y_pred, average="macro"))
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(UserInputError):
        classification_metrics([0, 1], [0], 2)
    with pytest.raises(UserInputError):
        classification_metrics([0, 3], [0, 1], 2)


def test_save_confusion_png(tmp_path):
    m = classification_metrics(Y_TRUE, Y_PRED, num_classes=4)
    out = save_confusion_png(
        m["confusion"], ["zero", "one", "two", "three"], tmp_path / "sub" / "cm.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserInputError):
        save_confusion_png(m["confusion"], ["a", "b"], tmp_path / "bad.png")


def test_robustness_auc():
    assert robustness_auc([0.0, 0.1, 0.5, 1.0], [0.8] * 4) == pytest.approx(0.8)
    # Linear drop from 1 to 0 over [0, 2]: half the area; order of points does not matter.
    assert robustness_auc([2.0, 0.0, 1.0], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    assert robustness_auc([0.3], [0.7]) == pytest.approx(0.7)
    with pytest.raises(UserInputError):
        robustness_auc([0.0, 1.0], [1.0])


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 5, generator=gen))
        model.bias.zero_()
    x = torch.randn(64, 5, generator=gen)
    y = model(x).argmax(1).detach()
    return model, x, y


def _loss(forward, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(forward(x), y))


def test_fgsm_increases_loss_within_budget():
    model, x, y = _linear_problem()
    eps = 0.1
    adv = fgsm(model, x, y, eps)
    assert not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert _loss(model, adv, y) > _loss(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # attack leaves model grads alone
    assert torch.equal(fgsm(model, x, y, 0.0), x)


def test_pgd_at_least_as_strong_as_fgsm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    eps = 0.3
    adv_fgsm = fgsm(model, x, y, eps)
    adv_pgd = pgd(
        model, x, y, eps, alpha=eps / 4, steps=20, generator=torch.Generator().manual_seed(2)
    )
    assert (adv_pgd - x).abs().max() <= eps + 1e-6
    assert _loss(model, adv_pgd, y) >= _loss(model, adv_fgsm, y) - 1e-6
    assert _loss(model, adv_pgd, y) > _loss(model, x, y)
    # Same generator seed -> same attack.
    again = pgd(
        model, x, y, eps, alpha=eps / 4, steps=20, generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(adv_pgd, again)
    with pytest.raises(UserInputError):
        pgd(model, x, y, eps, alpha=0.0, steps=5)


def test_attacks_clamp_to_the_valid_input_range():
    """With ``clamp``, FGSM/PGD iterates stay in the ball AND the box; FGSM's clamped result is
    exactly the box-clamped unclamped step (ball ∩ box is a box: clamping is the projection)."""
    model, _, _ = _linear_problem()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(64, 5, generator=gen)  # valid inputs in [0, 1], many near the edges
    y = torch.randint(0, 3, (64,), generator=gen)

    def box(t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0.0, 1.0)

    eps = 0.2
    free = fgsm(model, x, y, eps)
    assert float(free.min()) < 0.0 or float(free.max()) > 1.0  # the unclamped step leaves it
    clamped = fgsm(model, x, y, eps, clamp=box)
    assert torch.equal(clamped, box(free))
    for adv in (
        clamped,
        pgd(model, x, y, eps, eps / 4, 10, generator=torch.Generator().manual_seed(4), clamp=box),
    ):
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        assert (adv - x).abs().max() <= eps + 1e-6
        assert _loss(model, adv, y) > _loss(model, x, y)
