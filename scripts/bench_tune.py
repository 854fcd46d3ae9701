"""`modalign tune` vs random search vs the default config, AV-MNIST corpus, 1 label per class.

For each seed (the labeled examples drawn, the training seed and the sampler seed):

* default: the built-in ``avmnist`` fine-tuning config as is;
* tpe: ``run_tune`` (TPE, median pruning) for ``--trials`` trials, then ``best.yaml``;
* random: the same search with Optuna's random sampler and the same number of trials.

The search scores validation rows drawn from the training labels (``--val-per-class`` per class,
disjoint from the one labeled example) with ``--metric``: ``accuracy`` (default; the figure the
table reports) or ``subsets`` (the mean over modality subsets, ``modalign tune``'s default);
the test split is read only by the final fine-tuning of each config. Prints held-out (test)
accuracy, mean and spread over seeds, and the test modality-subset mean.

The setting is deliberately not saturated: the bundle is the ``avmnist`` pretraining config
stopped after ``--steps`` steps (default 50 of its 300), and fine-tuning (search and final runs)
reads ``--train-per-class`` training rows per class (evenly spaced over the manifest, so every
speaker is kept); the test split is used whole. With the full 300-step bundle the default config
already scores 0.997 and the validation objective ties at 1.000 (nothing to compare).
``--threads`` sets torch's intra-op threads (default 1: on a shared CPU two threads per process
made small-head training ~10x slower).

    python scripts/bench_tune.py [--mnist D] [--fsdd D] [--model BUNDLE] [--work runs/bench_tune]
    python scripts/bench_tune.py --quick        # smoke run: tiny corpus, 3 trials, 1 seed

Without ``--model`` the script pretrains the ``avmnist`` config (``--steps``) first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(
    os.environ.get("MODALIGN_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)


def _subsample(src: Path, dst: Path, per_class: int) -> Path:
    """``per_class`` evenly spaced rows of each label (the manifest is ordered by speaker, so
    every speaker stays in); same folder, so relative paths still work."""
    by_label: dict[str, list[str]] = {}
    for line in src.read_text().splitlines():
        by_label.setdefault(json.loads(line)["label"], []).append(line)
    keep = []
    for rows in by_label.values():
        n = min(per_class, len(rows))
        keep += [rows[i * len(rows) // n] for i in range(n)]
    dst.write_text("\n".join(keep) + "\n")
    return dst


def corpus(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(pretraining manifest, fine-tuning manifest, test manifest)."""
    from modalign.data.corpora.avmnist import build_avmnist

    root = Path(args.work) / "corpus"
    if not (root / "test.jsonl").is_file():
        build_avmnist(args.mnist, args.fsdd, root, seed=0, images_per_recording=1)
    train, test = root / "train.jsonl", root / "test.jsonl"
    if args.quick:
        train = _subsample(train, root / "train-quick.jsonl", 12)
        test = _subsample(test, root / "test-quick.jsonl", 6)
    ft = train
    if args.train_per_class:
        ft = _subsample(train, root / f"train-{args.train_per_class}pc.jsonl", args.train_per_class)
    return train, ft, test


def model(args: argparse.Namespace, train: Path) -> Path:
    if args.model:
        return Path(args.model)
    import modalign

    out = Path(args.work) / f"model-{args.steps}steps"
    if not (out / "model.safetensors").is_file():
        cfg = modalign.load_config(
            "avmnist",
            [
                f"data.train={train}",
                "data.val=",
                "train.val_every=0",
                f"output.dir={out}",
                f"train.steps={args.steps}",
                "train.progress=false",
                "data.num_workers=0",
                f"train.batch_size={16 if args.quick else 128}",
            ],
        )
        modalign.run_pretrain(cfg, resume="latest")
    return out


def held_out(config: str, overrides: list[str], out: Path) -> dict[str, float]:
    """Fine-tune ``config`` (+ overrides) and score it on the test split."""
    import modalign

    res = modalign.run_finetune(modalign.load_config(config, overrides), out)
    subsets = res.fused["by_subset"]
    return {"accuracy": res.fused["accuracy"], "subset_mean": statistics.mean(subsets.values())}


def one_seed(args: argparse.Namespace, base: list[str], seed: int) -> dict[str, dict[str, float]]:
    import modalign

    work = Path(args.work) / f"seed{seed}"
    sets = [*base, f"finetune.label_seed={seed}", f"finetune.seed={seed}"]
    out = {"default": held_out("avmnist", sets, work / "default")}
    for sampler in ("tpe", "random"):
        t = time.perf_counter()
        res = modalign.run_tune(
            "avmnist",
            args.trials,
            work / f"study-{sampler}-{args.metric}",
            stage="finetune",
            overrides=sets,
            sampler=sampler,
            seed=seed,
            val_per_class=args.val_per_class,
            metric=args.metric,
        )
        out[sampler] = held_out(res.files["best"], [], work / f"clf-{sampler}-{args.metric}")
        out[sampler]["val"] = res.best_value
        out[sampler]["search_s"] = time.perf_counter() - t
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mnist", default=str(DATA / "mnist"))
    ap.add_argument("--fsdd", default=str(DATA / "fsdd"))
    ap.add_argument("--model", help="pretrained avmnist bundle (default: pretrain one)")
    ap.add_argument("--work", default="runs/bench_tune")
    ap.add_argument("--steps", type=int, default=50, help="pretraining steps without --model")
    ap.add_argument("--train-per-class", type=int, default=100,
                    help="fine-tuning rows per class from train (0 = all)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val-per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--metric", default="accuracy", help="what the searches maximise (modalign tune --metric)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny corpus, 3 trials, 1 seed")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.seeds, args.steps, args.val_per_class = 3, 1, 10, 2
        args.train_per_class = 0
        args.work = str(Path(args.work) / "quick")
    return args


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines())


def main() -> None:
    import torch

    from modalign.core.artifact import atomic_write_text

    args = parse_args()
    torch.set_num_threads(args.threads)
    pretrain, train, test = corpus(args)
    bundle = model(args, pretrain)
    base = [
        f"finetune.model={bundle}",
        f"finetune.train={train}",
        f"finetune.test={test}",
        "finetune.labels_per_class=1",
        "finetune.val_per_class=0",
        f"finetune.out={Path(args.work) / 'clf'}",
    ]
    if args.quick:
        base.append("finetune.epochs=10")
    setting = (
        f"AV-MNIST, 1 label/class; bundle: {bundle} "
        f"({'given' if args.model else f'avmnist config, {args.steps} pretraining steps'}); "
        f"fine-tuning rows: {_rows(train)} from train ({args.train_per_class or 'all'}/class); "
        f"search validation: {args.val_per_class}/class of those, metric {args.metric!r}; "
        f"test: {_rows(test)} rows "
        f"(read only by the final runs); {args.trials} trials per search; "
        f"seeds 0..{args.seeds - 1}; torch threads {args.threads}"
    )
    print(setting, flush=True)
    runs = [one_seed(args, base, s) for s in range(args.seeds)]
    atomic_write_text(
        Path(args.work) / "results.json",
        json.dumps({"setting": setting, "runs": runs}, indent=1) + "\n",
    )
    print_table(runs, setting)


def print_table(runs: list[dict[str, Any]], setting: str) -> None:
    from modalign.report import table

    def sd(xs: list[float]) -> float:
        return statistics.stdev(xs) if len(xs) > 1 else 0.0

    rows = []
    for method in ("default", "random", "tpe"):
        acc = [r[method]["accuracy"] for r in runs]
        sub = [r[method]["subset_mean"] for r in runs]
        val = [r[method].get("val") for r in runs]
        secs = [r[method].get("search_s") for r in runs]
        rows.append(
            [
                method,
                statistics.mean(acc),
                sd(acc),
                statistics.mean(sub),
                " ".join(f"{a:.3f}" for a in acc),
                "-" if None in val else " ".join(f"{v:.3f}" for v in val),
                "-" if None in secs else f"{statistics.mean(secs):.0f}",
            ]
        )
    print(f"\n{setting}\n")
    headers = ["config", "test acc (mean)", "std", "subset-mean acc", "per seed",
               "best val (per seed)", "search s (mean)"]  # fmt: skip
    print(table(headers, rows))
    diff = {
        m: [r[m]["accuracy"] - r["default"]["accuracy"] for r in runs] for m in ("tpe", "random")
    }
    tvr = [r["tpe"]["accuracy"] - r["random"]["accuracy"] for r in runs]
    for name, d in (("TPE - default", diff["tpe"]), ("random - default", diff["random"]),
                    ("TPE - random", tvr)):  # fmt: skip
        per = " ".join(f"{x:+.3f}" for x in d)
        print(f"{name}: {statistics.mean(d):+.3f} +- {sd(d):.3f} (per seed {per})")


if __name__ == "__main__":
    main()
