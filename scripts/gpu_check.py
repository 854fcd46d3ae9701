#!/usr/bin/env python
"""GPU check (run by ``scripts/gpu_check.sh``): bf16 training throughput and MFU, faiss-gpu
build and search, a 1M-vector embed; prints one markdown table. Without a GPU every row says
``skipped (why)`` and the script still exits 0, so it can be smoke-tested on CPU (``--quick``).

* train: timm ``resnet50`` at 224 px (channels-last, bf16 autocast) + a CLIP loss against a
  trainable projection of fixed text features, batch 256; FLOPs per step from
  ``torch.utils.flop_counter.FlopCounterMode``; MFU = achieved FLOP/s / the best bf16 matmul
  FLOP/s measured on this device (not the datasheet number);
* faiss-gpu: ``VectorIndex.build`` on ``device="cuda"`` of ``IVF4096,SQ8`` and ``IVF4096,Flat`` over
  1M x 384 clustered vectors, recall@10 vs exact search and queries/s (batch of 10k);
* embed: ``write_embedding_shards`` of 1M generated captions with ``--model BUNDLE`` on cuda
  (skipped without ``--model``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROWS: list[tuple[str, str, str]] = []


def row(check: str, value: str, note: str = "") -> None:
    ROWS.append((check, value, note))
    print(f"{check}: {value} {note}", file=sys.stderr, flush=True)


def peak_bf16(device: torch.device) -> float:
    """Best FLOP/s of a few large bf16 matmuls on ``device``."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (time.perf_counter() - t))
    return best


def train_check(device: torch.device, batch: int, steps: int) -> None:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("resnet50", num_classes=512).to(
        device, memory_format=torch.channels_last
    )
    text = torch.nn.Linear(384, 512).to(device)
    params = [*model.parameters(), *text.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    feats = torch.randn(batch, 384, device=device)
    labels = torch.arange(batch, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a = torch.nn.functional.normalize(model(x), dim=-1)
            b = torch.nn.functional.normalize(text(feats), dim=-1)
            logits = 100.0 * a @ b.T
            loss = (
                torch.nn.functional.cross_entropy(logits, labels)
                + torch.nn.functional.cross_entropy(logits.T, labels)
            ) / 2
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    peak = peak_bf16(device)
    row(f"bf16 train samples/s (resnet50@224, b{batch})", f"{batch / dt:,.0f}")
    row(
        "bf16 train MFU",
        f"{flops / dt / peak:.1%}",
        f"({flops / dt / 1e12:.0f} of {peak / 1e12:.0f} TFLOP/s measured matmul peak)",
    )


def faiss_check(n: int, dim: int, nq: int) -> None:
    import faiss

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_index import make_data

    from modalign.retrieval import IndexBuildOptions, VectorIndex

    if faiss.get_num_gpus() == 0:
        row("faiss-gpu", "skipped", "(faiss sees no GPU: install faiss-gpu)")
        return
    x, q = make_data(n, nq, dim, max(8, int(2 * n**0.5)), 0)
    _, truth = faiss.knn(q, x, 10)
    ids = [str(i) for i in range(n)]
    for factory in ("IVF4096,SQ8", "IVF4096,Flat"):
        t = time.perf_counter()
        ix = VectorIndex.build(x, ids, IndexBuildOptions(factory=factory, device="cuda"))
        build = time.perf_counter() - t
        ix.search(q[:100], 10)
        t = time.perf_counter()
        found = ix.search(q, 10).ids
        qps = nq / (time.perf_counter() - t)
        rec = np.mean([len(set(f) & {str(j) for j in tr}) / 10 for f, tr in zip(found, truth)])
        row(
            f"faiss-gpu {factory} {n:,}x{dim}",
            f"{qps:,.0f} q/s",
            f"(recall@10 {rec:.3f}, build {build:.1f}s, {ix.stats.search_params})",
        )


def embed_check(model_dir: str | None, n: int) -> None:
    if not model_dir:
        row("embed 1M captions", "skipped", "(pass --model BUNDLE)")
        return
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed_shards import write_embedding_shards

    model = load_bundle(model_dir, device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "captions.jsonl"
        with manifest.open("w") as fh:
            for i in range(n):
                fh.write(json.dumps({"id": f"c{i}", "text": f"a photo of thing {i}"}) + "\n")
        t = time.perf_counter()
        write_embedding_shards(model, manifest, Path(tmp) / "emb", batch_size=1024)
        dt = time.perf_counter() - t
    row(f"embed {n:,} captions (text tower)", f"{n / dt:,.0f} items/s", f"({dt:.0f}s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="a bundle for the embed check")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args(argv)
    n = 20_000 if args.quick else 1_000_000
    if torch.cuda.is_available():
        train_check(torch.device("cuda"), 32 if args.quick else 256, 3 if args.quick else 20)
    else:
        row("bf16 train samples/s / MFU", "skipped", "(no CUDA device)")
    faiss_check(n, 384, 1000 if args.quick else 10_000)
    if torch.cuda.is_available():
        embed_check(args.model, n)
    else:
        row("embed 1M captions", "skipped", "(no CUDA device)")
    print("\n| check | result | notes |\n|---|---:|---|")
    for check, value, note in ROWS:
        print(f"| {check} | {value} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
