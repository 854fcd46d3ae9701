"""CLIP_benchmark evaluates a modalign bundle's image/text towers like an open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modalign.cli import main

from helpers.corpus import WORDS, tiny_overrides, write_tiny_corpus

pytest.importorskip(
    "clip_benchmark", reason="clip-benchmark not installed (pip install clip-benchmark)"
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clipb")
    train = write_tiny_corpus(root / "c", n=32)
    sets = tiny_overrides(train, root / "m", steps=30, batch=16)
    sets += ["train.checkpoint_every=0", "train.val_every=0", "data.val="]
    assert main(["-q", "pretrain", "demo", "--set", *sets]) == 0
    return train, root / "m"


class _Images:
    """A tiny local classification dataset: (transformed PIL image, class index)."""

    def __init__(self, manifest: Path, transform) -> None:  # type: ignore[no-untyped-def]
        self.rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        self.root, self.transform = manifest.parent, transform
        self.classes = WORDS  # torchvision-style, read by CLIP_benchmark

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        r = self.rows[i]
        return self.transform(Image.open(self.root / r["image"])), WORDS.index(r["label"])


def test_clip_benchmark_zero_shot_on_a_bundle(bundle: tuple[Path, Path]) -> None:
    import clip_benchmark.models as cb_models
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    from modalign.benchmark.clip_adapter import register
    from modalign.finetune.pseudo.algorithms import class_prompt_embeddings
    from modalign.pretrain.bundle import load_bundle

    manifest, model_dir = bundle
    register()
    assert "modalign" in cb_models.MODEL_TYPES
    model, transform, tokenizer = cb_models.load_clip("modalign", str(model_dir), "", None, "cpu")
    loader = torch.utils.data.DataLoader(_Images(manifest, transform), batch_size=8)
    templates = ["the sound {c}", "{c}"]
    # zsc.evaluate's own accuracy() calls float() on a 1-element array, which NumPy 2 refuses
    # (a clip-benchmark 1.6.2 bug); its classifier and prediction loop are what we exercise.
    classifier = zsc.zero_shot_classifier(model, tokenizer, WORDS, templates, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    got = {"acc1": float((logits.argmax(1) == target).float().mean())}
    # the same zero-shot classifier computed with modalign's own code
    b = load_bundle(model_dir)
    classes = class_prompt_embeddings(lambda p: b.encode(text=p)["text"], WORDS,
                                      ["the sound {}", "{}"])  # fmt: skip
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    img = b.encode(image=[str(manifest.parent / r["image"]) for r in rows])["image"]
    truth = torch.tensor([WORDS.index(r["label"]) for r in rows])
    ours = float(((img @ classes.T).argmax(1) == truth).float().mean())
    assert got["acc1"] == pytest.approx(ours, abs=1e-6)
    assert got["acc1"] > 0.5  # a trained tiny model beats chance (0.25)

    class _Pairs(_Images):
        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            image, _ = super().__getitem__(i)
            return image, [self.rows[i]["text"]]

    def collate(batch):  # type: ignore[no-untyped-def]
        return torch.stack([x for x, _ in batch]), [t for _, t in batch]

    pairs = torch.utils.data.DataLoader(
        _Pairs(manifest, transform), batch_size=8, collate_fn=collate
    )
    ret = zsr.evaluate(model, pairs, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
    assert 0.0 <= ret["image_retrieval_recall@5"] <= 1.0
