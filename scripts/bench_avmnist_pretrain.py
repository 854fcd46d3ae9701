"""Retrieval quality after pretraining from scratch on the AV-MNIST-style corpus (real data).

Builds the corpus with :func:`modalign.data.corpora.avmnist.build_avmnist` (FSDD recordings paired by
digit with MNIST images: takes 5-49 with MNIST train images, takes 0-4 with MNIST test images),
pretrains image + audio towers from scratch with a frozen MiniLM text tower (LiT-style) under a
wall-clock budget, then embeds the FSDD test split and scores retrieval at class level (a hit is
any item of the same digit): precision@1 (= class-level recall@1) and mAP over the full ranking,
for audio->image, image->audio, text->audio and text->image.

Usage::

    python scripts/bench_avmnist_pretrain.py [--mnist D] [--fsdd D] [--work DIR]
        [--steps 300] [--set key=value ...]

The config is the built-in ``avmnist`` config plus ``--set`` overrides. Prints markdown tables; ``--json`` also writes ``metrics.json`` to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(
    os.environ.get("MODALIGN_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)

PAIRS = [("audio", "image"), ("image", "audio"), ("text", "audio"), ("text", "image")]


def build_corpus(mnist: Path, fsdd: Path, out: Path, images_per_recording: int) -> Path:
    from modalign.data.corpora.avmnist import build_avmnist

    if not (out / "train.jsonl").is_file():
        build_avmnist(mnist, fsdd, out, seed=0, images_per_recording=images_per_recording)
    return out


def train(corpus: Path, out: Path, steps: int, overrides: list[str]) -> tuple[float, Any]:
    import modalign  # run_pretrain wires validation on data.val (val_every)

    sets = [
        f"data.train={corpus / 'train.jsonl'}",
        f"data.val={corpus / 'test.jsonl'}",
        f"output.dir={out}",
        f"train.steps={steps}",
        *overrides,
    ]
    t0 = time.perf_counter()
    result = modalign.run_pretrain(modalign.load_config("avmnist", sets))
    return time.perf_counter() - t0, result


def test_split(corpus: Path) -> tuple[list[dict], list[dict]]:
    """Unique test recordings (queries/gallery for audio) and every test image."""
    rows = [json.loads(line) for line in (corpus / "test.jsonl").read_text().splitlines()]
    audio = list({r["audio"]: r for r in rows}.values())
    return rows, audio


def embed(model_dir: Path, corpus: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import modalign

    model = modalign.load(model_dir)
    rows, audio_rows = test_split(corpus)
    image = model.encode(image=[str(corpus / r["image"]) for r in rows])["image"].numpy()
    audio = model.encode(audio=[str(corpus / r["audio"]) for r in audio_rows])["audio"].numpy()
    text = model.encode(text=[r["text"] for r in rows])["text"].numpy()
    return {
        "image": (image, np.array([r["digit"] for r in rows])),
        "audio": (audio, np.array([r["digit"] for r in audio_rows])),
        "text": (text, np.array([r["digit"] for r in rows])),
    }


def score(emb: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    out = {}
    for q, g in PAIRS:
        (qx, qy), (gx, gy) = emb[q], emb[g]
        p1, ap = class_level_metrics(qx, gx, qy, gy)
        out[f"{q}->{g}"] = {"p@1": p1, "map": ap, "queries": len(qx), "gallery": len(gx)}
    return out


def class_level_metrics(
    queries: np.ndarray, gallery: np.ndarray, qy: np.ndarray, gy: np.ndarray
) -> tuple[float, float]:
    """(precision@1, mAP) with every gallery item of the query's class relevant."""
    try:
        from modalign.retrieval.metrics import retrieval_metrics

        m = retrieval_metrics(queries, gallery, qy, gy, ks=(1,))
        return float(m.recall[1]), float(m.map)
    except ImportError:
        pass
    sims = queries @ gallery.T
    order = np.argsort(-sims, axis=1, kind="stable")
    rel = gy[order] == qy[:, None]
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, gallery.shape[0] + 1)
    ap = (hits / ranks * rel).sum(axis=1) / np.maximum(rel.sum(axis=1), 1)
    return float(rel[:, 0].mean()), float(ap.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist", type=Path, default=SHARED / "mnist")
    ap.add_argument("--fsdd", type=Path, default=SHARED / "fsdd")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-avmnist"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--images-per-recording", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--eval-only", action="store_true", help="score an existing run in --work")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    corpus = build_corpus(args.mnist, args.fsdd, args.work / "corpus", args.images_per_recording)
    model_dir = args.work / "model"
    wall, final_loss = float("nan"), float("nan")
    if not args.eval_only:
        wall, result = train(corpus, model_dir, args.steps, args.set)
        final_loss = result.final_loss
    metrics = score(embed(model_dir, corpus))
    resolved = yaml.safe_load((model_dir / "config.yaml").read_text())
    print_report(args, resolved, metrics, wall, final_loss)
    if args.json:
        (args.work / "metrics.json").write_text(json.dumps({"pairs": metrics, "wall_s": wall}))


def print_report(args, cfg: dict, metrics: dict, wall: float, loss: float) -> None:
    print(
        f"\nAV-MNIST (FSDD test takes 0-4 x MNIST test images), {cfg['train']['steps']} steps x "
        f"batch {cfg['train']['batch_size']}, pretrain wall {wall:.0f} s, final loss {loss:.3f}, "
        f"overrides: {args.set or 'none'}\n"
    )
    print("| query -> gallery | queries | gallery | P@1 | mAP |")
    print("|---|---|---|---|---|")
    for pair, m in metrics.items():
        print(f"| {pair} | {m['queries']} | {m['gallery']} | {m['p@1']:.3f} | {m['map']:.3f} |")


if __name__ == "__main__":
    main()
