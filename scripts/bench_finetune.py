"""Few-label fine-tuning benchmark on the AV-MNIST-style corpus (issue 5).

For each fusion head: labels-only baseline (same head, towers from scratch, same labels),
pretrain + labels, pretrain + pseudo-labels + labels; columns image+audio / image / audio.
Also pseudo-label coverage and accuracy per method.

    python scripts/bench_finetune.py --corpus runs/avmnist/corpus --model runs/avmnist/model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from modalign.config import load_config
from modalign.data.manifest import read_manifest
from modalign.finetune.end_to_end import embed_with, train_end_to_end
from modalign.finetune.heads import HEAD_KINDS
from modalign.finetune.pipeline import (
    embed_labeled,
    evaluate_head,
    few_label_split,
    pseudo_label_head,
    train_head,
)
from modalign.pretrain.bundle import load_bundle
from modalign.pretrain.model import build_encoder
from modalign.report import table

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--labels-per-class", type=int, default=10)
    ap.add_argument("--heads", default=",".join(HEAD_KINDS))
    ap.add_argument("--pseudo", default="zero_shot", help="pseudo-labeler used for the third row")
    ap.add_argument("--scratch-epochs", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    train_src, test_src = f"{args.corpus}/train.jsonl", f"{args.corpus}/test.jsonl"
    model = load_bundle(args.model)
    base = load_config(
        None,
        [
            f"finetune.model={args.model}",
            f"finetune.train={train_src}",
            f"finetune.test={test_src}",
            f"finetune.labels_per_class={args.labels_per_class}",
            f"finetune.class_names=[{', '.join(DIGITS)}]",
        ],
    ).finetune
    data, names = embed_labeled(model, train_src, base.inputs, DIGITS)
    test, _ = embed_labeled(model, test_src, base.inputs, DIGITS)
    split = few_label_split(data.y, names, base.labels_per_class, 0, base.label_seed)
    labeled, pool = data.subset(split.labeled), data.subset(split.unlabeled)

    pseudo_rows = []
    for method in ("zero_shot", "knn", "self_training"):
        cfg = dataclasses.replace(base, pseudo_label=method)
        _, rep = pseudo_label_head(model, labeled, pool, names, cfg)
        pseudo_rows.append([method, rep[0]["coverage"], rep[0]["accuracy"], rep[0]["num_selected"]])

    specs = model.modality_specs()
    rows_train = {r.id: r for r in read_manifest(train_src, list(specs)).rows}
    labeled_rows = [rows_train[i] for i in labeled.ids]
    test_rows = read_manifest(test_src, list(specs)).rows
    index = {c: i for i, c in enumerate(names)}
    results = []
    for kind in args.heads.split(","):
        cfg = dataclasses.replace(base, head=kind, pseudo_label=args.pseudo)
        torch.manual_seed(0)
        scratch = build_encoder(
            dataclasses.replace(model.cfg.model, modalities=list(cfg.inputs)), model.cfg.data
        ).encoder
        head = train_end_to_end(
            scratch, labeled_rows, specs, index, cfg, epochs=args.scratch_epochs
        )
        scratch_eval = evaluate_head(
            head, embed_with(scratch, test_rows, specs, index, cfg.inputs), len(names)
        )
        lab_eval = evaluate_head(
            train_head(labeled, torch.ones(len(labeled)), len(names), cfg), test, len(names)
        )
        pl_head, _ = pseudo_label_head(model, labeled, pool, names, cfg)
        pl_eval = evaluate_head(pl_head, test, len(names))
        for label, ev in (
            ("labels only, towers from scratch", scratch_eval),
            ("pretrain + labels", lab_eval),
            (f"pretrain + {args.pseudo} pseudo-labels + labels", pl_eval),
        ):
            s = ev["by_subset"]
            results.append([kind, label, s.get("audio+image"), s.get("image"), s.get("audio")])
        print(f"[{time.perf_counter() - started:.0f}s] {kind} done", flush=True)
    out = {
        "pseudo_labels": pseudo_rows,
        "results": results,
        "wall_s": time.perf_counter() - started,
        "labels_per_class": args.labels_per_class,
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"\n{args.labels_per_class} labels per class; test = {len(test)} FSDD test takes\n")
    print(table(["head", "training", "image+audio", "image only", "audio only"], results))
    print()
    print(table(["pseudo-labeler", "coverage", "accuracy", "selected"], pseudo_rows))
    print(f"\nwall time {out['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
