"""The ``cross_view`` pseudo-labeler (co-training, issue 20): the pool labelled by a modality the
classifier does not read (``finetune.views``) beats labelling it by the classifier's own inputs
when that view separates the classes; rows without the view stay unlabelled; bad configs are
refused naming the key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from modalign.core.errors import ConfigError, UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, concat_sets
from modalign.finetune.pipeline import pseudo_label_head
from modalign.finetune.pseudo.labels import NO_LABEL

NAMES = ["a", "b", "c"]


def _two_views(seed: int = 0, n: int = 300, dim: int = 8):
    """Three classes: the image view barely separates them (centres 0.3 apart, unit noise), the
    text view separates them well (centres 4 apart); 5% of the items have no text."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    image = 0.3 * torch.eye(dim)[y] + torch.randn(n, dim, generator=gen)
    text = 4.0 * torch.eye(dim)[y] + torch.randn(n, dim, generator=gen)
    has_text = torch.rand(n, generator=gen) > 0.05
    text[~has_text] = 0.0
    ids = [str(i) for i in range(n)]
    ones = torch.ones(n, dtype=torch.bool)
    s = EmbeddedSet(ids, {"image": image}, {"image": ones}, y, {"text": text}, {"text": has_text})
    lab = torch.cat([(y == c).nonzero().flatten()[:3] for c in range(3)])
    rest = torch.ones(n, dtype=torch.bool)
    rest[lab] = False
    return s.subset(lab), s.subset(rest.nonzero().flatten())


def _cfg(labeler: str, **changes) -> FinetuneConfig:
    return FinetuneConfig(
        inputs=["image"], views=["text"], class_names=NAMES, epochs=3, min_steps=0,
        pseudo_label=labeler, pseudo_label_options=changes,
    )  # fmt: skip


def test_cross_view_labels_the_pool_by_the_other_view() -> None:
    labeled, pool = _two_views()
    model = SimpleNamespace(modalities=["image", "text"])
    _, by_view = pseudo_label_head(model, labeled, pool, NAMES, _cfg("cross_view", zero_shot=False))
    _, by_input = pseudo_label_head(model, labeled, pool, NAMES, _cfg("propagation"))
    assert by_view[0]["accuracy"] > 0.95 > by_input[0]["accuracy"] + 0.2
    assert by_view[0]["cross_view"]["experts"] == ["text/propagation"]
    # a pool row without the view gets no label; with inputs=True the inputs' expert labels it
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS

    run = PSEUDO_LABELERS.get("cross_view").factory.run
    ctx = SimpleNamespace(
        model=model, labeled=labeled, pool=pool, class_names=NAMES, cfg=_cfg("cross_view")
    )
    opts = PSEUDO_LABELERS.options("cross_view", {"zero_shot": False}, "")
    out = run(ctx, opts)
    no_text = ~pool.view_present["text"]
    assert no_text.any() and (out.labels.labels[no_text] == NO_LABEL).all()
    assert (out.weights[no_text] == 0).all() and (out.labels.labels[~no_text] >= 0).all()
    both = run(ctx, PSEUDO_LABELERS.options("cross_view", {"zero_shot": False, "inputs": True}, ""))
    assert (both.labels.labels >= 0).all()
    assert both.info["cross_view"]["experts"] == ["text/propagation", "inputs/propagation"]
    # views travel with subset and concat (auto's folds rely on it)
    joined = concat_sets(labeled, pool.subset(torch.arange(5)))
    assert torch.equal(joined.views["text"][-5:], pool.views["text"][:5])
    assert torch.equal(joined.view_present["text"][:9], labeled.view_present["text"])


def test_cross_view_bad_configs_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.views \['image'\] are also finetune\.inputs"):
        FinetuneConfig(inputs=["image"], views=["image"])
    with pytest.raises(ConfigError, match=r"finetune\.views .* twice"):
        FinetuneConfig(inputs=["image"], views=["text", "text"])
    with pytest.raises(ConfigError, match=r"finetune\.pseudo_label_options.*\bk\b"):
        FinetuneConfig(pseudo_label="cross_view", pseudo_label_options={"k": 0})
    from modalign.finetune.pseudo.labelers import PSEUDO_LABELERS

    check = PSEUDO_LABELERS.get("cross_view").factory.check
    opts = PSEUDO_LABELERS.options("cross_view", {}, "")
    with pytest.raises(UserInputError, match=r"needs finetune\.views"):
        check(FinetuneConfig(inputs=["image"]), opts, ["image", "text"])
    with pytest.raises(UserInputError, match=r"finetune\.views \['audio'\].*no such tower"):
        check(FinetuneConfig(inputs=["image"], views=["audio"]), opts, ["image", "text"])
