"""Periodic validation during pretraining: the ``evaluate`` callback from the layer above.

Validation scores with the same code as ``modalign evaluate retrieval`` (shared embedding loop,
``retrieval.metrics`` with pessimistic ties), so both give identical figures on the same model
and data, ties included; and it never changes training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import modalign
from modalign.config import load_config
from modalign.pretrain.bundle import load_bundle
from modalign.pretrain.trainer import pretrain
from modalign.retrieval.embed import embed_source
from modalign.retrieval.evaluate import evaluate_pairs, make_validator

from helpers.corpus import tiny_overrides, write_tiny_corpus


@pytest.mark.slow
def test_validation_logs_recall_and_leaves_training_unchanged(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=16)
    base = [
        *tiny_overrides(manifest, tmp_path / "plain", steps=4, batch=8),
        "data.audio.spec_augment=true",
    ]
    pretrain(load_config(None, base))
    with_val = [
        *tiny_overrides(manifest, tmp_path / "val", steps=4, batch=8),
        "data.audio.spec_augment=true",
        f"data.val={manifest}",
        "train.val_every=2",
    ]
    result = modalign.run_pretrain(load_config(None, with_val))  # wires make_validator(data.val)
    records = [
        json.loads(line) for line in (tmp_path / "val" / "metrics.jsonl").read_text().splitlines()
    ]
    vals = [r for r in records if "val" in r]
    assert [r["step"] for r in vals] == [2, 4]
    pairs = vals[-1]["val"]
    assert set(pairs) == {
        f"{a}->{b}"
        for a in ("audio", "image", "text")
        for b in ("audio", "image", "text")
        if a != b
    }
    for m in pairs.values():
        assert 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0
    assert any("val" in h for h in result.history)
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "val" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation drew no training randomness


def _with_duplicates(manifest: Path) -> Path:
    """Every row twice under another id: duplicate items embed identically (exact ties)."""
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    dup = [{**r, "id": r["id"] + "-dup"} for r in rows]
    out = manifest.with_name("val_dups.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows + dup))
    return out


def _optimistic_recall1(emb, q: str, g: str) -> float:
    """Recall@1 with topk tie-breaking (what the old validation did), for contrast."""
    sims = torch.from_numpy(emb[q].vectors) @ torch.from_numpy(emb[g].vectors).T
    top = sims.topk(1, dim=1).indices[:, 0].numpy()
    return float(np.mean([emb[g].ids[j] == i for i, j in zip(emb[q].ids, top)]))


def test_validation_recall_equals_evaluate_retrieval_with_ties(tmp_path: Path) -> None:
    manifest = write_tiny_corpus(tmp_path / "c", n=16)
    val = _with_duplicates(manifest)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_overrides(manifest, out, steps=2, batch=8),
            "model.modalities=[image,audio]",
            "train.val_every=2",
            "train.threads=1",
        ],
    )
    validator = make_validator(val, level="instance", ks=(1, 5, 10))
    result = pretrain(cfg, evaluate=validator)
    during = [h["val"] for h in result.history if "val" in h]
    assert len(during) == 1  # at the last step: the live weights are the bundle's weights

    emb, _ = embed_source(load_bundle(out), val)  # what `modalign evaluate retrieval` runs
    after = evaluate_pairs(emb, level="instance", ks=(1, 5, 10))["pairs"]
    assert during[0] == after  # every metric of every pair, bit for bit

    # The data has exact ties (duplicates), and they matter: topk tie-breaking would differ.
    assert np.array_equal(emb["image"].vectors[:16], emb["image"].vectors[16:])
    assert any(
        _optimistic_recall1(emb, q, g) != after[f"{q}->{g}"]["recall@1"]
        for q, g in (("image", "audio"), ("audio", "image"))
    )


def test_evaluate_pairs_hands_each_pairs_ranks_and_checks_ks_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``on_ranks`` gets every ordered pair's per-query ranks, whose averages are the pair's
    figures; a bad cut-off is refused before any pair is ranked."""
    import modalign.retrieval.evaluate as ev
    from modalign.core.errors import UserInputError
    from modalign.retrieval.embed import Embeddings

    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(12)]
    emb = {
        m: Embeddings(m, ids, rng.standard_normal((12, 4)).astype(np.float32), [None] * 12)
        for m in ("audio", "image")
    }
    seen: dict = {}
    result = evaluate_pairs(emb, ks=(1, 5), on_ranks=seen.__setitem__)["pairs"]
    assert set(seen) == set(result) == {"audio->image", "image->audio"}
    for pair, ranks in seen.items():
        assert ranks.metrics((1, 5)).to_dict() == result[pair]
        assert result[pair]["recall@1"] == pytest.approx(ranks.recall_at(1).mean())

    def never(*a: object, **kw: object) -> None:
        raise AssertionError("ranked before the cut-offs were checked")

    monkeypatch.setattr(ev, "query_ranks", never)
    with pytest.raises(UserInputError, match="ks must be positive"):
        evaluate_pairs(emb, ks=(0, 5))
