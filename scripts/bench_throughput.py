"""Training throughput: modalign's pretrain step vs open_clip's, same towers, same data.

Both sides train CLIP-style on the same preloaded CIFAR-10 batches (images decoded once,
resized to the tower's input size and normalised; captions "a photo of a {class}"):

* image tower: timm ``resnet18`` from scratch at 64 px, global average pool, linear projection
  with bias (open_clip: ``timm_model_name`` vision config, ``timm_proj_bias=True``);
* text tower: the bundled sentence-transformers MiniLM-L6, frozen, mean pooling, trainable
  linear projection (open_clip: ``hf_model_name`` text config with ``mean_pooler``, locked with
  ``lock_text_tower``). modalign L2-normalises the sentence embedding before its projection
  (sentence-transformers' Normalize module); open_clip projects the raw mean;
* AdamW (no decay on norms/biases/temperature), grad clipping at 1.0, fp32, same batch size.

What is timed: the training step only (forward, loss, backward, clip, optimizer step), after
warmup, rounds of both sides interleaved so a busy machine hurts both alike; data loading is
excluded (both sides get the same preloaded tensors; open_clip also gets its captions
pre-tokenised, as its data loader would hand them over, padded to the longest caption so both
text towers see the same token count). Captions are made unique per image ("a photo of a cat,
picture 17") because modalign embeds each distinct string of a frozen text tower once per
batch and caches it across steps, which open_clip does not do: with CIFAR's 10 class captions
that alone would skip almost all text compute. Rows: "modalign (text cache cleared)" clears the
cache before every step (like for like); "modalign (default)" keeps it (warm after the warmup
pass, as in epoch 2+ of a real run). The step's FLOPs come from
``torch.utils.flop_counter.FlopCounterMode``; the machine's peak is the best of a few large
fp32 matmuls (same thread count).

Usage: ``python scripts/bench_throughput.py [--data DIR] [--batch 64] [--steps 8] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EMBED_DIM, LR, WEIGHT_DECAY, CLIP_NORM = 256, 5e-4, 0.1, 1.0


def load_cifar(root: Path, n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """First ``n`` samples of the train shards -> normalised (n, 3, size, size), captions."""
    from PIL import Image

    classes = (root / "classes.txt").read_text().split()
    images, captions, pending = [], [], {}
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                sample = pending[key]
                if "jpg" in sample and "cls" in sample:
                    img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                    img = img.resize((size, size), Image.BICUBIC)
                    images.append(np.asarray(img, dtype=np.float32) / 255.0)
                    label = classes[int(sample["cls"])]
                    captions.append(f"a photo of a {label}, picture {len(captions)}")
                    del pending[key]
                if len(images) == n:
                    break
        if len(images) == n:
            break
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    mean, std = (
        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    )
    return (x - mean) / std, captions


# ------------------------------------------------------------------ modalign side


def modalign_step_fn(batch_size: int, out_dir: str, text_cache: bool) -> tuple[Callable, Any]:
    """The trainer's own step (``trainer._train_step`` + ``update.apply_update``) on a batch dict."""
    from modalign.config import load_config
    from modalign.pretrain import trainer, update

    cfg = load_config(
        None,
        [
            "data.train=unused.jsonl",
            "data.image.channels=3",
            "model.modalities=[image,text]",
            f"model.embed_dim={EMBED_DIM}",
            "model.towers.image.arch=resnet18",
            "model.towers.image.input_size=64",
            f"optim.lr={LR}",
            f"optim.weight_decay={WEIGHT_DECAY}",
            f"optim.grad_clip={CLIP_NORM}",
            "optim.warmup_steps=0",
            f"train.batch_size={batch_size}",
            "train.precision=fp32",
            "train.device=cpu",
            f"output.dir={out_dir}",
        ],
    )
    run = trainer._setup(cfg, None, None, None)
    run.task.train()
    if not text_cache:
        text = run.core.encoder.trunks["text"]
        text.register_forward_pre_hook(lambda module, args: module._cache.clear())
    counter = {"step": 0}

    def step(batch: dict[str, Any]) -> float:
        out = trainer._train_step(run.task, run.core, [batch], run.accelerator, cfg)
        loss = float(out.value)
        counter["step"] += 1
        update.apply_update(run, out, loss, counter["step"])
        return loss

    return step, run.core


def modalign_batch(images: torch.Tensor, captions: list[str]) -> dict[str, Any]:
    n = len(captions)
    ones = torch.ones(n, dtype=torch.bool)
    return {"id": list(range(n)), "image": images, "text": captions,
            "present": {"image": ones, "text": ones.clone()}}  # fmt: skip


# ------------------------------------------------------------------ open_clip side


def open_clip_step_fn(context_length: int) -> tuple[Callable, Any, Callable]:
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    from modalign.pretrain.towers import bundled_text_model_path

    text_path = bundled_text_model_path()
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=EMBED_DIM,
        vision_cfg={"timm_model_name": "resnet18", "timm_model_pretrained": False,
                    "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": True,
                    "image_size": 64},
        text_cfg={"hf_model_name": text_path, "hf_tokenizer_name": text_path,
                  "hf_model_pretrained": True, "hf_proj_type": "linear",
                  "hf_pooler_type": "mean_pooler", "context_length": context_length},
    )  # fmt: skip
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    model.train()
    tokenizer = HFTokenizer(text_path, context_length=context_length)
    loss_fn = open_clip.ClipLoss()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        images, tokens = batch
        img, txt, scale = model(images, tokens)[:3]
        loss = loss_fn(img, txt, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.item()

    return step, model, tokenizer


# ------------------------------------------------------------------ measurement


def longest_caption_tokens(captions: list[str]) -> int:
    """Token count of the longest caption (with special tokens), as MiniLM tokenises it."""
    from transformers import AutoTokenizer

    from modalign.pretrain.towers import bundled_text_model_path

    tok = AutoTokenizer.from_pretrained(bundled_text_model_path())
    return max(len(ids) for ids in tok(captions)["input_ids"])


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm the BLAS
    best = min(_time(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(step: Callable, batch: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def timed_round(step: Callable, batches: list[Any]) -> float:
    """Samples per second over one pass of ``batches``."""
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    n = sum(len(b["text"]) if isinstance(b, dict) else len(b[0]) for b in batches)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("MODALIGN_CIFAR", DEFAULT_DATA))
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="warmup steps; 0 = one full pass")
    args = ap.parse_args()

    n = args.batch * args.steps
    images, captions = load_cifar(args.data, n, 64)
    chunks = [
        (images[i : i + args.batch], captions[i : i + args.batch]) for i in range(0, n, args.batch)
    ]
    tmp = tempfile.mkdtemp(prefix="bench-throughput-")
    sides: dict[str, tuple[Callable, list[Any]]] = {}
    for name, cache in (("modalign (text cache cleared)", False), ("modalign (default)", True)):
        step, _ = modalign_step_fn(args.batch, f"{tmp}/{len(sides)}", cache)
        sides[name] = (step, [modalign_batch(x, c) for x, c in chunks])
    oc_step, _, tokenizer = open_clip_step_fn(longest_caption_tokens(captions))
    sides["open_clip"] = (oc_step, [(x, tokenizer(c)) for x, c in chunks])

    for step, batches in sides.values():  # one full pass: warms allocators and text cache
        for b in batches[: args.warmup or len(batches)]:
            step(b)
    flops = {name: step_flops(step, batches[0]) for name, (step, batches) in sides.items()}
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (step, batches) in sides.items():
            rates[name].append(timed_round(step, batches))
    peak = matmul_peak_gflops()
    report(args, rates, flops, peak)


def report(args: argparse.Namespace, rates: dict, flops: dict, peak: float) -> None:
    base = statistics.median(rates["open_clip"])  # the ratio's denominator
    print(f"\nCPU threads: {torch.get_num_threads()}, batch {args.batch}, fp32, "
          f"{args.rounds} rounds x {args.steps} steps (median), matmul peak {peak:.1f} GFLOP/s\n")  # fmt: skip
    print(
        "| trainer | samples/s (median) | rounds | vs open_clip | GFLOP/step | GFLOP/s | % of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rates.items():
        med = statistics.median(r)
        gflop = flops[name] / 1e9
        achieved = gflop * med / args.batch
        print(f"| {name} | {med:.1f} | {', '.join(f'{x:.1f}' for x in r)} | {med / base:.2f}x "
              f"| {gflop:.2f} | {achieved:.1f} | {100 * achieved / peak:.0f}% |")  # fmt: skip


if __name__ == "__main__":
    main()
