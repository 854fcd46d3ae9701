"""Tests for modalign.finetune.heads: missing-modality handling, gradients, toy training."""

from __future__ import annotations

import pytest
import torch

from modalign.core.errors import UserInputError
from modalign.finetune.heads import HEAD_KINDS, build_head, modality_dropout

DIMS = {"image": 6, "audio": 4}
NUM_CLASSES = 3


def _head(kind: str, hidden: int = 16, dropout: float = 0.1):
    torch.manual_seed(0)
    kw = {"heads": 2} if kind == "transformer" else {}
    return build_head(kind, DIMS, NUM_CLASSES, hidden=hidden, dropout=dropout, **kw)


def _batch(batch: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    emb = {m: torch.randn(batch, d, generator=gen) for m, d in DIMS.items()}
    # Rows: both, image only, audio only, neither, then all both.
    image = torch.tensor([True, True, False, False] + [True] * (batch - 4))
    audio = torch.tensor([True, False, True, False] + [True] * (batch - 4))
    return emb, {"image": image, "audio": audio}


def _with_garbage(emb, present, fill: str):
    out = {}
    for m, x in emb.items():
        if fill == "zeros":
            garbage = torch.zeros_like(x)
        elif fill == "random":
            garbage = torch.randn_like(x) * 1e3
        elif fill == "nan":
            garbage = torch.full_like(x, float("nan"))
        else:
            garbage = torch.full_like(x, float("inf"))
        out[m] = torch.where(present[m][:, None], x, garbage)
    return out


def test_head_kinds_is_immutable_and_complete():
    assert isinstance(HEAD_KINDS, tuple)
    assert set(HEAD_KINDS) == {"concat", "late", "gated", "transformer", "lowrank"}


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(UserInputError, match="concat"):
        build_head("nope", DIMS, NUM_CLASSES)


def test_unknown_option_is_user_error():
    with pytest.raises(UserInputError, match="rank"):
        build_head("lowrank", DIMS, NUM_CLASSES, ranks=3)


def test_wrong_embedding_dim_is_user_error():
    head = _head("concat")
    with pytest.raises(UserInputError, match="image"):
        head({"image": torch.zeros(2, 5)}, {"image": torch.ones(2, dtype=torch.bool)})


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_shapes(kind):
    head = _head(kind).eval()
    emb, present = _batch()
    assert head(emb, present).shape == (8, NUM_CLASSES)
    # Any subset of modalities works with the same weights, including missing `present`.
    assert head({"audio": emb["audio"]}, None).shape == (8, NUM_CLASSES)
    assert head({"image": emb["image"]}, {"image": present["image"]}).shape == (8, NUM_CLASSES)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_absent_values_never_matter(kind):
    head = _head(kind).eval()
    emb, present = _batch()
    with torch.no_grad():
        outputs = [
            head(_with_garbage(emb, present, fill), present)
            for fill in ("zeros", "random", "nan", "inf")
        ]
    for out in outputs:
        assert torch.isfinite(out).all()
        assert torch.equal(out, outputs[0])


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_empty_row_gets_prior(kind):
    head = _head(kind).eval()
    with torch.no_grad():
        head.prior.copy_(torch.tensor([0.5, -1.0, 2.0]))
    emb, present = _batch()
    with torch.no_grad():
        out = head(_with_garbage(emb, present, "nan"), present)
    assert torch.equal(out[3], head.prior.detach())


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_gradients_flow_and_stay_finite(kind):
    head = _head(kind).train()
    emb, present = _batch()
    emb = {m: x.requires_grad_(True) for m, x in _with_garbage(emb, present, "nan").items()}
    loss = torch.nn.functional.cross_entropy(head(emb, present), torch.arange(8) % NUM_CLASSES)
    loss.backward()
    grads = {n: p.grad for n, p in head.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The empty row trains the prior; real inputs reach the fusion weights.
    assert grads["prior"].abs().sum() > 0
    assert sum(g.abs().sum() for n, g in grads.items() if n != "prior") > 0
    for m, x in emb.items():
        assert torch.isfinite(x.grad).all()
        assert torch.all(x.grad[~present[m]] == 0)
        assert x.grad[present[m]].abs().sum() > 0


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_single_modality_row_matches_unimodal_batch(kind):
    head = _head(kind).eval()
    emb, present = _batch()
    none = torch.zeros(8, dtype=torch.bool)
    with torch.no_grad():
        mixed = head(emb, present)
        image_only = head(emb, {"image": present["image"], "audio": none})
        image_subset = head({"image": emb["image"]}, {"image": present["image"]})
        audio_only = head(emb, {"image": none, "audio": present["audio"]})
    # Row 1 has only image, row 2 only audio.
    torch.testing.assert_close(mixed[1], image_only[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], image_subset[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2], audio_only[2], rtol=0, atol=1e-6)


def _toy_problem(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = {
        m: torch.randn(NUM_CLASSES, d, generator=torch.Generator().manual_seed(7 + d)) * 2
        for m, d in DIMS.items()
    }
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    emb = {m: c[y] + 0.5 * torch.randn(n, c.shape[1], generator=gen) for m, c in centres.items()}
    image = torch.rand(n, generator=gen) < 0.7
    audio = ~image | (torch.rand(n, generator=gen) < 0.5)
    return emb, {"image": image, "audio": audio}, y


@pytest.fixture
def one_thread():
    # Tiny matmuls: extra threads only add contention on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_learns_separable_toy_problem(kind, one_thread):
    head = _head(kind, hidden=32, dropout=0.0)
    emb, present, y = _toy_problem(192, seed=3)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        dropped = modality_dropout(present, 0.2, gen)
        loss = torch.nn.functional.cross_entropy(head(emb, dropped), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    test_emb, test_present, test_y = _toy_problem(300, seed=4)
    with torch.no_grad():
        acc = (head(test_emb, test_present).argmax(1) == test_y).float().mean()
        image_acc = (head({"image": test_emb["image"]}).argmax(1) == test_y).float().mean()
    assert acc > 0.9
    assert image_acc > 0.9


def test_modality_dropout_keeps_one_and_rate_about_p():
    n, p = 20000, 0.3
    gen = torch.Generator().manual_seed(0)
    names = ["a", "b", "c", "d"]
    present = {m: torch.rand(n, generator=gen) < 0.8 for m in names}
    present["a"][:100] = False
    for m in names[1:]:
        present[m][:50] = False  # rows 0..49: nothing present
    kept = modality_dropout(present, p, gen)
    before = torch.stack([present[m] for m in names], 1)
    after = torch.stack([kept[m] for m in names], 1)
    assert not (after & ~before).any()  # never invents a modality
    assert torch.equal(after.any(1), before.any(1))  # >= 1 kept wherever one existed
    full = before.all(1)  # rows with 4 present: expected rate p - p**4 / 4
    rate = 1 - after[full].float().sum() / before[full].float().sum()
    assert abs(rate - (p - p**4 / 4)) < 0.01
    # Two present: the rescue lowers the rate to p - p**2 / 2.
    two = {"x": torch.ones(n, dtype=torch.bool), "y": torch.ones(n, dtype=torch.bool)}
    kept2 = modality_dropout(two, p, gen)
    rate2 = 1 - torch.stack(list(kept2.values()), 1).float().mean()
    assert abs(rate2 - (p - p**2 / 2)) < 0.01
    assert torch.stack(list(kept2.values()), 1).any(1).all()


def test_modality_dropout_edge_cases():
    present = {"a": torch.tensor([True, False]), "b": torch.tensor([True, True])}
    assert all(torch.equal(modality_dropout(present, 0.0, None)[m], present[m]) for m in present)
    always = modality_dropout(present, 1.0, torch.Generator().manual_seed(0))
    assert torch.stack(list(always.values()), 1).sum(1).tolist() == [1, 1]
    with pytest.raises(UserInputError):
        modality_dropout(present, 1.5, None)
