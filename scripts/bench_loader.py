"""Loader throughput on WebDataset shards vs what one CPU training step consumes.

    python scripts/bench_loader.py [--data PATTERN] [--size 64] [--batch 64] [--workers 0 1 2]

Loader: decode JPEG + timm train transform at the tower's input size, batches of ``--batch``,
samples/s for each worker count (first batch excluded: worker start-up). Training: the default
image tower (timm ``--arch``, from scratch) with a projection, forward + backward + SGD step on
CPU at the same size and batch. Prints a markdown table with loader / training ratios.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def default_data() -> str:
    root = Path(
        os.environ.get("MODALIGN_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets")
    )
    return str(root / "cifar10" / "train-{000000..000009}.tar")


def loader_rate(pattern: str, size: int, batch: int, workers: int, batches: int) -> float:
    """Samples/s of the shard loader with ``workers`` DataLoader workers."""
    from torch.utils.data import DataLoader

    from modalign.data.config import DataConfig
    from modalign.data.dataset import Collate
    from modalign.data.modality import ImagePreset, default_modalities
    from modalign.data.shards import ShardDataset

    specs = {"image": default_modalities(DataConfig(), ImagePreset(input_size=size))["image"]}
    dataset = ShardDataset(pattern, specs, train=True, seed=0, rank=0, world_size=1)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=Collate(specs))
    it = iter(loader)
    next(it)  # start-up (worker fork, first shard open) is not throughput
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["id"])
    rate = n / (time.perf_counter() - start)
    del it
    return rate


def train_rate(arch: str, size: int, batch: int, steps: int) -> float:
    """Samples/s of forward + backward + SGD step of the image tower on CPU."""
    import timm

    trunk = timm.create_model(arch, pretrained=False, num_classes=0)
    model = torch.nn.Sequential(trunk, torch.nn.Linear(trunk.num_features, 128))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 3, size, size)

    def step() -> None:
        feats = torch.nn.functional.normalize(model(x), dim=-1)
        loss = (feats @ feats.T).logsumexp(dim=1).mean()  # contrastive-shaped, all-pairs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=default_data(), help="shard pattern (CIFAR-10 train)")
    parser.add_argument("--size", type=int, default=64, help="tower input size in pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    train = train_rate(args.arch, args.size, args.batch, args.steps)
    rows = []
    for w in args.workers:
        rate = loader_rate(args.data, args.size, args.batch, w, args.batches)
        rows.append((w, rate))
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| what | size | batch | samples/s | loader / training |")
    print("|---|---|---|---|---|")
    print(f"| training step ({args.arch}, fwd+bwd, {args.threads} threads) | {args.size} | "
          f"{args.batch} | {train:.0f} | 1.00 |")  # fmt: skip
    for w, rate in rows:
        print(f"| loader, {w} workers | {args.size} | {args.batch} | {rate:.0f} | "
              f"{rate / train:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
