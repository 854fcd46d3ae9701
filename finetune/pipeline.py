"""Few-label fine-tuning: pseudo-labels + fusion head over cached tower embeddings.

Towers stay locked and every item is embedded once (the fast path); the fusion head sees the
per-modality embeddings plus the presence mask, so the same weights work for any subset of
modalities. The classifier bundle points to its pretrained model bundle by path + fingerprint.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from modalign.core.artifact import atomic_dir, read_json_meta
from modalign.core.config_io import dump_yaml, from_dict
from modalign.core.errors import UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.heads import FusionHead, build_head, modality_dropout
from modalign.finetune.metrics import classification_metrics
from modalign.finetune.pseudo_label import (
    NO_LABEL,
    PseudoLabels,
    balance_classes,
    class_prompt_embeddings,
    knn_propagate,
    pseudo_label_report,
    zero_shot,
)
from modalign.pretrain.bundle import BundleModel, load_bundle
from modalign.retrieval.embed import embed_source

log = logging.getLogger(__name__)
FORMAT = "modalign.classifier-bundle"


@dataclass
class EmbeddedSet:
    """Row-aligned embeddings of the classifier inputs, presence masks and class indices."""

    ids: list[str]
    x: dict[str, torch.Tensor]  # (N, D) per modality, zeros where absent
    present: dict[str, torch.Tensor]  # (N,) bool
    y: torch.Tensor  # (N,) long, NO_LABEL when unknown

    def subset(self, idx: torch.Tensor) -> EmbeddedSet:
        return EmbeddedSet(
            [self.ids[i] for i in idx.tolist()],
            {m: v[idx] for m, v in self.x.items()},
            {m: v[idx] for m, v in self.present.items()},
            self.y[idx],
        )

    def __len__(self) -> int:
        return len(self.ids)


def embed_labeled(
    model: BundleModel,
    src: str,
    inputs: Sequence[str],
    class_names: Sequence[str] | None,
    batch_size: int = 128,
) -> tuple[EmbeddedSet, list[str]]:
    """Embed ``inputs`` modalities of a manifest; map labels to class indices.

    ``class_names`` None -> the sorted distinct labels of this manifest. A label outside the
    class list is an error naming the item.
    """
    missing = [m for m in inputs if m not in model.modalities]
    if missing:
        raise UserInputError(
            f"finetune.inputs {missing}: the model has no such tower; it has {model.modalities}"
        )
    emb, bad = embed_source(model, src, inputs, batch_size=batch_size)
    if bad.total:
        log.warning("%s: %s", src, bad.summary())
    ids = list(dict.fromkeys(i for m in inputs if m in emb for i in emb[m].ids))
    pos = {i: n for n, i in enumerate(ids)}
    labels: dict[str, str | None] = {}
    for e in emb.values():
        labels.update(zip(e.ids, e.labels))
    if class_names is None:
        class_names = sorted({lab for lab in labels.values() if lab is not None})
    index = {c: n for n, c in enumerate(class_names)}
    unknown = sorted({lab for lab in labels.values() if lab is not None and lab not in index})
    if unknown:
        example = next(i for i, lab in labels.items() if lab == unknown[0])
        raise UserInputError(
            f"{src}: item {example!r} has label {unknown[0]!r}, not in the class list {list(class_names)}; fix the label or finetune.class_names"
        )
    n = len(ids)
    x, present = {}, {}
    for m in inputs:
        x[m] = torch.zeros(n, model.embed_dim)
        present[m] = torch.zeros(n, dtype=torch.bool)
        if m in emb:
            rows = torch.tensor([pos[i] for i in emb[m].ids], dtype=torch.long)
            x[m][rows] = torch.from_numpy(emb[m].vectors)
            present[m][rows] = True
    y = torch.tensor(
        [index[labels[i]] if labels[i] is not None else NO_LABEL for i in ids], dtype=torch.long
    )
    return EmbeddedSet(ids, x, present, y), list(class_names)


@dataclass
class Split:
    labeled: torch.Tensor
    val: torch.Tensor
    unlabeled: torch.Tensor


def few_label_split(
    y: torch.Tensor, class_names: Sequence[str], k: int, val_k: int, seed: int
) -> Split:
    """``k`` labeled (+ ``val_k`` validation) rows per class, seeded; the rest is unlabeled."""
    gen = torch.Generator().manual_seed(seed)
    labeled, val = [], []
    for c, name in enumerate(class_names):
        rows = (y == c).nonzero().flatten()
        if len(rows) == 0:
            raise UserInputError(
                f"class {name!r} has no labeled example in the training manifest; add some or drop it from finetune.class_names"
            )
        if len(rows) < k + val_k:
            raise UserInputError(
                f"class {name!r} has {len(rows)} labeled rows, fewer than labels_per_class + val_per_class = {k + val_k}; lower them"
            )
        rows = rows[torch.randperm(len(rows), generator=gen)]
        labeled.append(rows[:k])
        val.append(rows[k : k + val_k])
    lab, va = torch.cat(labeled), torch.cat(val)
    used = torch.zeros(len(y), dtype=torch.bool)
    used[lab] = True
    used[va] = True
    return Split(lab, va, (~used).nonzero().flatten())


def fused_embedding(s: EmbeddedSet) -> torch.Tensor:
    """Mean of the present modalities' (shared-space) embeddings, re-normalised."""
    total = sum(torch.where(s.present[m][:, None], s.x[m], 0.0) for m in s.x)
    return F.normalize(total, dim=-1)


def make_pseudo_labels(
    method: str,
    model: BundleModel,
    pool: EmbeddedSet,
    labeled: EmbeddedSet,
    class_names: Sequence[str],
    cfg: FinetuneConfig,
) -> PseudoLabels:
    if method == "zero_shot":
        if "text" not in model.modalities:
            raise UserInputError(
                "pseudo_label=zero_shot needs a text tower, and this model has none; use knn or self_training"
            )
        text = class_prompt_embeddings(
            lambda t: model.encode(text=list(t))["text"], list(class_names), list(cfg.prompts)
        )
        return zero_shot(pool.x, pool.present, text, temperature=cfg.zero_shot_temperature)
    if method == "knn":
        return knn_propagate(
            fused_embedding(pool),
            fused_embedding(labeled),
            labeled.y,
            len(class_names),
            k=cfg.knn_k,
            iterations=cfg.knn_iterations,
        )
    raise UserInputError(f"unknown pseudo-label method {method!r}")


def train_head(
    train: EmbeddedSet,
    weights: torch.Tensor,
    num_classes: int,
    cfg: FinetuneConfig,
    val: EmbeddedSet | None = None,
) -> FusionHead:
    """Train a fresh fusion head with modality dropout; early-stop on ``val`` when given."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dims = {m: v.shape[1] for m, v in train.x.items()}
    head = build_head(cfg.head, dims, num_classes, hidden=cfg.hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    steps_per_epoch = max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    best, best_state = -1.0, None
    for _ in range(cfg.epochs):
        head.train()
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            present = modality_dropout(
                {m: p[idx] for m, p in train.present.items()}, cfg.modality_dropout, gen
            )
            logits = head({m: v[idx] for m, v in train.x.items()}, present)
            loss = (
                F.cross_entropy(logits, train.y[idx], reduction="none") * weights[idx]
            ).sum() / weights[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if val is not None and len(val):
            acc = float((predict(head, val).argmax(1) == val.y).float().mean())
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    return head.eval()


@torch.no_grad()
def predict(head: FusionHead, s: EmbeddedSet, drop: Sequence[str] = ()) -> torch.Tensor:
    head.eval()
    present = {m: (torch.zeros_like(p) if m in drop else p) for m, p in s.present.items()}
    return head(s.x, present)


def subsets(inputs: Sequence[str]) -> list[tuple[str, ...]]:
    mods = sorted(inputs)
    return [c for r in range(len(mods), 0, -1) for c in itertools.combinations(mods, r)]


def evaluate_head(
    head: FusionHead, s: EmbeddedSet, num_classes: int, drop: Sequence[str] = ()
) -> dict[str, Any]:
    """Accuracy/macro-F1/confusion with ``drop`` removed, plus accuracy for each modality subset.

    ``by_subset`` keys are modality names sorted and joined by '+'; a subset is evaluated on the
    rows that have all of its modalities, with the others hidden from the head.
    """
    labeled = s.y != NO_LABEL
    if not bool(labeled.any()):
        raise UserInputError("evaluation data has no labels")
    s = s.subset(labeled.nonzero().flatten())
    out = classification_metrics(s.y.numpy(), predict(head, s, drop).argmax(1).numpy(), num_classes)
    by_subset = {}
    for subset in subsets([m for m in s.x if m not in drop]):
        rows = torch.stack([s.present[m] for m in subset]).all(0)
        if not bool(rows.any()):
            continue
        part = s.subset(rows.nonzero().flatten())
        hidden = [m for m in s.x if m not in subset]
        by_subset["+".join(subset)] = float(
            (predict(head, part, hidden).argmax(1) == part.y).float().mean()
        )
    out["by_subset"] = by_subset
    out["items"] = len(s)
    return out


@dataclass
class FinetuneResult:
    out_dir: Path
    class_names: list[str]
    fused: dict[str, Any]  # evaluation with pseudo-labels + labels
    labels_only: dict[str, Any]  # same head, labels alone
    pseudo: list[dict[str, Any]]  # per-round pseudo-label report


def run_finetune(cfg: FinetuneConfig, out_dir: str | Path) -> FinetuneResult:
    """Few labels + pseudo-labels -> fusion head; evaluates on ``cfg.test``; writes a classifier bundle."""
    if not cfg.model or not cfg.train:
        raise UserInputError(
            "finetune.model and finetune.train must be set (the pretrained bundle and the labeled manifest)"
        )
    if cfg.pseudo_label == "zero_shot" and not cfg.class_names:
        raise UserInputError(
            "pseudo_label=zero_shot needs finetune.class_names (words the text tower can read)"
        )
    model = load_bundle(cfg.model)
    if cfg.pseudo_label == "zero_shot" and "text" not in model.modalities:
        raise UserInputError(
            f"pseudo_label=zero_shot needs a text tower; {cfg.model} has only {model.modalities}"
        )
    data, class_names = embed_labeled(model, cfg.train, cfg.inputs, cfg.class_names or None)
    num_classes = len(class_names)
    split = few_label_split(
        data.y, class_names, cfg.labels_per_class, cfg.val_per_class, cfg.label_seed
    )
    labeled, val, pool = (
        data.subset(split.labeled),
        data.subset(split.val),
        data.subset(split.unlabeled),
    )
    val_set = val if len(val) else None
    ones = torch.ones(len(labeled))
    labels_only_head = train_head(labeled, ones, num_classes, cfg, val_set)
    head, reports = labels_only_head, []
    if cfg.pseudo_label == "self_training" and len(pool):
        head, reports = _fixmatch(model, labeled, pool, class_names, cfg)
    elif cfg.pseudo_label != "none" and len(pool):
        head, reports = _pseudo_label_rounds(model, labeled, pool, val_set, class_names, cfg)
    test = embed_labeled(model, cfg.test, cfg.inputs, class_names)[0] if cfg.test else val
    fused = evaluate_head(head, test, num_classes) if len(test) else {}
    labels_only = evaluate_head(labels_only_head, test, num_classes) if len(test) else {}
    out = Path(out_dir)
    save_classifier(
        out,
        head,
        cfg,
        class_names,
        model,
        {"test": fused, "labels_only": labels_only, "pseudo": reports},
    )
    return FinetuneResult(out, class_names, fused, labels_only, reports)


def _pseudo_label_rounds(
    model: BundleModel,
    labeled: EmbeddedSet,
    pool: EmbeddedSet,
    val: EmbeddedSet | None,
    class_names: Sequence[str],
    cfg: FinetuneConfig,
) -> tuple[FusionHead, list[dict[str, Any]]]:
    """Round 1: the chosen pseudo-labeler; later rounds: self-training from the last head."""
    num_classes = len(class_names)
    reports, head = [], None
    method = cfg.pseudo_label
    for round_no in range(max(1, cfg.rounds)):
        if round_no > 0:  # later rounds: classic self-training from the previous head
            if head is None:
                head = train_head(labeled, torch.ones(len(labeled)), num_classes, cfg, val)
            probs = predict(head, pool).softmax(1)
            pl = PseudoLabels(probs.argmax(1), probs.max(1).values, "self_training", probs)
        else:
            pl = make_pseudo_labels(method, model, pool, labeled, class_names, cfg)
        keep = (pl.confidence >= cfg.threshold) & (pl.labels != NO_LABEL)
        if cfg.balance:
            keep = balance_classes(pl, num_classes, ratio=cfg.balance_ratio, eligible=keep)
        report = pseudo_label_report(pl, keep, pool.y, num_classes)
        report["round"] = round_no + 1
        reports.append(report)
        log.info(
            "pseudo-labels round %d (%s): coverage %.3f accuracy %s",
            round_no + 1,
            pl.method,
            report["coverage"],
            report["accuracy"],
        )
        idx = keep.nonzero().flatten()
        chosen = pool.subset(idx)
        chosen.y = pl.labels[idx]
        train = _concat(labeled, chosen)
        weights = torch.cat(
            [torch.ones(len(labeled)), torch.full((len(chosen),), cfg.pseudo_weight)]
        )
        head = train_head(train, weights, num_classes, cfg, val)
    return head, reports


def _fixmatch(
    model: BundleModel,
    labeled: EmbeddedSet,
    pool: EmbeddedSet,
    class_names: Sequence[str],
    cfg: FinetuneConfig,
) -> tuple[FusionHead, list[dict[str, Any]]]:
    from modalign.finetune.selftrain import embed_strong_views, fixmatch_train

    views = embed_strong_views(
        model, cfg.train, pool.ids, cfg.inputs, cfg.strong_views, cfg.strong_audio_noise, cfg.seed
    )
    head, pl = fixmatch_train(
        labeled.x, labeled.present, labeled.y, pool.x, pool.present, views, len(class_names), cfg
    )
    keep = pl.confidence >= cfg.tau
    report = pseudo_label_report(pl, keep, pool.y, len(class_names))
    report["round"] = 1
    return head, [report]


def _concat(a: EmbeddedSet, b: EmbeddedSet) -> EmbeddedSet:
    return EmbeddedSet(
        a.ids + b.ids,
        {m: torch.cat([a.x[m], b.x[m]]) for m in a.x},
        {m: torch.cat([a.present[m], b.present[m]]) for m in a.present},
        torch.cat([a.y, b.y]),
    )


def save_classifier(
    out: Path,
    head: FusionHead,
    cfg: FinetuneConfig,
    class_names: Sequence[str],
    model: BundleModel,
    results: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "class_names": list(class_names),
        "inputs": list(cfg.inputs),
        "head": {
            "kind": cfg.head,
            "hidden": cfg.hidden,
            "dims": {m: model.embed_dim for m in cfg.inputs},
        },
        "model": str(Path(model.path).resolve()),
        "model_fingerprint": model.fingerprint,
        "results": results,
    }
    with atomic_dir(out / ".classifier") as tmp:
        save_file(
            {k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors")
        )
        (tmp / "classifier.json").write_text(json.dumps(meta, indent=2))
        (tmp / "finetune.yaml").write_text(dump_yaml(cfg))
    for f in ("head.safetensors", "classifier.json", "finetune.yaml"):
        (out / ".classifier" / f).replace(out / f)
    (out / ".classifier").rmdir()


@dataclass
class Classifier:
    """A loaded classifier bundle: pretrained model + fusion head."""

    model: BundleModel
    head: FusionHead
    class_names: list[str]
    inputs: list[str]
    cfg: FinetuneConfig

    def embed(self, src: str) -> EmbeddedSet:
        return embed_labeled(self.model, src, self.inputs, self.class_names)[0]

    def evaluate(self, src: str, drop: Sequence[str] = ()) -> dict[str, Any]:
        bad = [m for m in drop if m not in self.inputs]
        if bad:
            raise UserInputError(
                f"--drop {bad[0]}: this classifier never had that modality; its inputs are {self.inputs}"
            )
        return evaluate_head(self.head, self.embed(src), len(self.class_names), drop)

    def predict(self, src: str, drop: Sequence[str] = ()) -> list[dict[str, Any]]:
        s = self.embed(src)
        probs = predict(self.head, s, drop).softmax(1)
        conf, idx = probs.max(1)
        return [
            {"id": i, "label": self.class_names[int(c)], "confidence": float(p)}
            for i, c, p in zip(s.ids, idx, conf)
        ]


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """Load a classifier bundle (safetensors + JSON; no code executed)."""
    from safetensors.torch import load_file

    root = Path(path)
    meta = read_json_meta(
        root / "classifier.json", "classifier bundle", "create one with `modalign finetune`"
    )
    model = load_bundle(meta["model"], device=device)
    if model.fingerprint != meta["model_fingerprint"]:
        raise UserInputError(
            f"{root}: its pretrained model at {meta['model']} has changed (fingerprint {model.fingerprint} != {meta['model_fingerprint']}); fine-tune again"
        )
    import yaml

    cfg = from_dict(
        FinetuneConfig, yaml.safe_load((root / "finetune.yaml").read_text()), "finetune"
    )
    h = meta["head"]
    head = build_head(h["kind"], h["dims"], len(meta["class_names"]), hidden=h["hidden"])
    head.load_state_dict(load_file(str(root / "head.safetensors")))
    return Classifier(model, head.eval(), meta["class_names"], meta["inputs"], cfg)


__all__ = [
    "Classifier",
    "EmbeddedSet",
    "FinetuneResult",
    "evaluate_head",
    "few_label_split",
    "load_classifier",
    "run_finetune",
    "train_head",
]
