"""`modalign tune` vs random search vs the default config, AV-MNIST corpus, 1 label per class.

For each seed (the labeled examples drawn, the training seed and the sampler seed):

* default: the built-in ``avmnist`` fine-tuning config as is;
* tpe: ``run_tune`` (TPE, median pruning) for ``--trials`` trials, then ``best.yaml``;
* random: the same search with Optuna's random sampler and the same number of trials.

The search scores validation rows drawn from the training labels (``--val-per-class`` per class,
disjoint from the one labeled example); the test split is read only by the final fine-tuning
of each config. Prints held-out (test) accuracy, mean and spread over seeds, and the
modality-subset mean (the search's objective, on test).

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
    """The first ``per_class`` rows of each label (same folder, so relative paths still work)."""
    counts: dict[str, int] = {}
    keep = []
    for line in src.read_text().splitlines():
        label = json.loads(line)["label"]
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(line)
    dst.write_text("\n".join(keep) + "\n")
    return dst


def corpus(args: argparse.Namespace) -> tuple[Path, Path]:
    from modalign.data.avmnist import build_avmnist

    root = Path(args.work) / "corpus"
    if not (root / "test.jsonl").is_file():
        build_avmnist(args.mnist, args.fsdd, root, seed=0, images_per_recording=1)
    train, test = root / "train.jsonl", root / "test.jsonl"
    if args.quick:
        train = _subsample(train, root / "train-quick.jsonl", 12)
        test = _subsample(test, root / "test-quick.jsonl", 6)
    return train, test


def model(args: argparse.Namespace, train: Path) -> Path:
    if args.model:
        return Path(args.model)
    from modalign.config import load_config
    from modalign.training import run_pretrain

    out = Path(args.work) / "model"
    if not (out / "model.safetensors").is_file():
        cfg = load_config(
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
        run_pretrain(cfg, resume="latest")
    return out


def held_out(config: str, overrides: list[str], out: Path) -> dict[str, float]:
    """Fine-tune ``config`` (+ overrides) and score it on the test split."""
    from modalign.config import load_config
    from modalign.finetune.pipeline import run_finetune

    res = run_finetune(load_config(config, overrides).finetune, out)
    subsets = res.fused["by_subset"]
    return {"accuracy": res.fused["accuracy"], "subset_mean": statistics.mean(subsets.values())}


def one_seed(args: argparse.Namespace, base: list[str], seed: int) -> dict[str, dict[str, float]]:
    from modalign.tune.budget import Budget
    from modalign.tune.study import run_tune

    work = Path(args.work) / f"seed{seed}"
    sets = [*base, f"finetune.label_seed={seed}", f"finetune.seed={seed}"]
    out = {"default": held_out("avmnist", sets, work / "default")}
    for sampler in ("tpe", "random"):
        t = time.perf_counter()
        res = run_tune(
            "avmnist",
            Budget(trials=args.trials),
            work / f"study-{sampler}",
            "finetune",
            sets,
            sampler=sampler,
            seed=seed,
            val_per_class=args.val_per_class,
        )
        out[sampler] = held_out(res.files["best"], [], work / f"clf-{sampler}")
        out[sampler]["val"] = res.best_value
        out[sampler]["search_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mnist", default=str(DATA / "mnist"))
    ap.add_argument("--fsdd", default=str(DATA / "fsdd"))
    ap.add_argument("--model", help="pretrained avmnist bundle (default: pretrain one)")
    ap.add_argument("--work", default="runs/bench_tune")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps without --model")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--val-per-class", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny corpus, 3 trials, 1 seed")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.seeds, args.steps, args.val_per_class = 3, 1, 10, 2
        args.work = str(Path(args.work) / "quick")
    train, test = corpus(args)
    bundle = model(args, train)
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
    runs = [one_seed(args, base, s) for s in range(args.seeds)]
    print_table(runs, args)


def print_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from modalign.report import table

    rows = []
    for method in ("default", "random", "tpe"):
        acc = [r[method]["accuracy"] for r in runs]
        sub = [r[method]["subset_mean"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rows.append(
            [
                method,
                statistics.mean(acc),
                sd,
                statistics.mean(sub),
                " ".join(f"{a:.3f}" for a in acc),
            ]
        )
    print(
        f"\nAV-MNIST, 1 label/class, {args.trials} trials, {args.seeds} seeds "
        f"(held-out test; search validation = {args.val_per_class}/class from train)\n"
    )
    print(table(["config", "test acc (mean)", "std", "subset-mean acc", "per seed"], rows))
    tpe, rnd, dft = (
        statistics.mean(r[m]["accuracy"] for r in runs) for m in ("tpe", "random", "default")
    )
    print(f"\ntuned (TPE) - default: {tpe - dft:+.3f}; TPE - random: {tpe - rnd:+.3f}")


if __name__ == "__main__":
    main()
