"""Robustness of a classifier on raw inputs: noise curves and L-inf attacks on one modality.

Both run the full model (tower + fusion head) on decoded inputs, perturbing one modality while
the others stay clean. Units: images are perturbed in the tower's normalised input space
(a noise level / epsilon of 0.1 is 0.1 standard deviations of the training normalisation);
audio noise is relative to each clip's RMS (level 1.0 = 0 dB SNR) and audio epsilons are in
waveform amplitude (full scale = 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from modalign.core.errors import UserInputError
from modalign.data.dataset import PairedDataset, make_loader
from modalign.data.manifest import read_manifest
from modalign.finetune.metrics import fgsm, pgd, robustness_auc
from modalign.finetune.pipeline import Classifier
from modalign.finetune.pseudo_label import NO_LABEL


def _batches(
    clf: Classifier, src: str, batch_size: int, max_items: int | None
) -> Iterator[tuple[dict, torch.Tensor]]:
    specs = {m: s for m, s in clf.model.modality_specs().items() if m in clf.inputs}
    manifest = read_manifest(src, list(specs), inline=[m for m, s in specs.items() if s.inline])
    rows = [r for r in manifest.rows if r.label is not None][:max_items]
    if not rows:
        raise UserInputError(f"{src}: no labeled rows to evaluate robustness on")
    index = {c: i for i, c in enumerate(clf.class_names)}
    dataset = PairedDataset(rows, specs, train=False, source=str(manifest.path))
    for batch in make_loader(dataset, batch_size=batch_size):
        y = torch.tensor([index.get(lab, NO_LABEL) for lab in batch["label"]])
        yield batch, y


def _logits(clf: Classifier, batch: dict, modality: str, x: torch.Tensor) -> torch.Tensor:
    enc = clf.model.encoder
    emb = {
        m: (enc.encode(m, x) if m == modality else enc.encode(m, batch[m]))
        for m in clf.inputs
        if m in batch
    }
    present = {m: batch["present"][m] for m in emb}
    return clf.head(emb, present)


def _perturb(modality: str, x: torch.Tensor, level: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen)
    if modality == "audio":
        rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
        return x + level * rms * noise
    return x + level * noise


def _check(clf: Classifier, modality: str) -> None:
    if modality not in clf.inputs:
        raise UserInputError(
            f"{modality!r}: this classifier never had that modality; its inputs are {clf.inputs}"
        )


@torch.no_grad()
def noise_curve(
    clf: Classifier,
    src: str,
    modality: str,
    levels: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
    batch_size: int = 64,
    seed: int = 0,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Accuracy vs Gaussian noise level on ``modality`` (others clean), and the curve's area."""
    _check(clf, modality)
    correct = torch.zeros(len(levels))
    total = 0
    for batch, y in _batches(clf, src, batch_size, max_items):
        keep = batch["present"][modality] & (y != NO_LABEL)
        for i, level in enumerate(levels):
            gen = torch.Generator().manual_seed(seed + i)
            x = _perturb(modality, batch[modality], level, gen)
            pred = _logits(clf, batch, modality, x).argmax(1)
            correct[i] += (pred[keep] == y[keep]).sum()
        total += int(keep.sum())
    acc = (correct / max(total, 1)).tolist()
    return {
        "levels": list(levels),
        "accuracy": acc,
        "auc": robustness_auc(levels, acc),
        "items": total,
    }


def adversarial(
    clf: Classifier,
    src: str,
    modality: str,
    eps: Sequence[float] = (0.0, 0.01, 0.03, 0.1),
    attack: str = "fgsm",
    steps: int = 10,
    batch_size: int = 64,
    max_items: int | None = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy under FGSM or PGD (L-inf) on ``modality``'s input at each epsilon."""
    _check(clf, modality)
    if attack not in ("fgsm", "pgd"):
        raise UserInputError(f"attack {attack!r}: valid attacks are fgsm, pgd")
    clf.head.eval()
    clf.model.encoder.eval()
    correct = torch.zeros(len(eps))
    total = 0
    gen = torch.Generator().manual_seed(seed)
    for batch, y in _batches(clf, src, batch_size, max_items):
        keep = batch["present"][modality] & (y != NO_LABEL)
        if not bool(keep.any()):
            continue
        sub = {
            m: (
                v[keep]
                if isinstance(v, torch.Tensor)
                else [v[i] for i in keep.nonzero().flatten().tolist()]
            )
            for m, v in batch.items()
            if m in clf.inputs
        }
        sub["present"] = {m: p[keep] for m, p in batch["present"].items()}
        x, target = sub[modality], y[keep]

        def forward(inp: torch.Tensor, sub: dict = sub) -> torch.Tensor:
            return _logits(clf, sub, modality, inp)

        for i, e in enumerate(eps):
            if e == 0:
                adv = x
            elif attack == "fgsm":
                adv = fgsm(forward, x, target, e)
            else:
                adv = pgd(forward, x, target, e, alpha=2.5 * e / steps, steps=steps, generator=gen)
            with torch.no_grad():
                correct[i] += (forward(adv).argmax(1) == target).sum()
        total += int(keep.sum())
    return {
        "attack": attack,
        "eps": list(eps),
        "accuracy": (correct / max(total, 1)).tolist(),
        "items": total,
    }
