"""End-to-end training throughput: ``modalign pretrain`` vs ``python -m open_clip_train.main``.

Both trainers read the same WebDataset shards, written once under ``--work`` from the CIFAR-10
train shards (``KEY.jpg``, the original bytes, + ``KEY.txt``, a caption distinct per image:
class name, seeded attribute words, index), and train the same towers with the same settings:
timm ``resnet18`` from scratch at 64 px (average pool, linear projection; RandomResizedCrop
scale 0.9-1 as open_clip's train transform, no flip) and the bundled sentence-transformers
MiniLM-L6 frozen (open_clip ``--lock-text``; mean pooling, trainable linear projection); embed
256, batch 64, fp32, CPU, AdamW (lr 5e-4, wd 0.1, betas 0.9/0.98, eps 1e-6), grad clip 1.0, the
same number of loader workers, no checkpoints or validation during the run. open_clip pads
captions to ``context_length``: ``--context auto`` sets it to the longest caption's token count
so both text towers see as many tokens (``--context 77``: open_clip's default).

Runs are interleaved A B A B ...; each run's throughput comes from its own log: modalign's
``metrics.jsonl`` (``samples_per_s``, ``data_wait`` per ``log_every`` window), open_clip's
``out.log`` (``Batch (t)``: mean step time since its previous line; it logs at steps 1, L+1,
2L+1, ..., so its windows end one step later). Only windows after ``--warmup`` steps that both
logged count; a run's rate is the harmonic mean of its windows' rates. On a machine other jobs
share, wall time mostly measures them, so the bench also polls each run's CPU seconds (main
process + loader workers) as its log windows appear and reports samples per CPU-second.

modalign runs with its defaults, so ``train.frozen_towers: auto`` decides where the frozen text
tower runs: in the loader workers, overlapped with the step, when ``threads + workers <= cores``
(``--threads 1`` with 1 worker on 2 cores), else in the step; each pair's line says which.
Samples/s then gains from the overlap; samples per CPU-second counts the workers' CPU too. Pass
``--modalign-set train.frozen_towers=step`` to compare without it.

Usage: ``python scripts/bench_e2e_openclip.py [--pairs 3] [--steps 100] [--threads 0]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
EMBED, SIZE, LR, WD, CLIP = 256, 64, 5e-4, 0.1, 1.0
OC_MODEL = "modalign-e2e-resnet18-minilm"
REFERENCE, TARGET = 1.3, 1.5  # issue 14: measured before, and the goal
ADJECTIVES = ("small", "large", "blurry", "bright", "dark", "sharp", "faded", "vivid", "old")
COLOURS = ("red", "green", "blue", "yellow", "white", "black", "grey", "brown", "orange")
SCENES = ("outdoors", "indoors", "at dusk", "at noon", "in the rain", "on grass", "in snow")


def caption(label: str, index: int, rng: random.Random) -> str:
    """A caption distinct per image: class name + seeded attribute words + the index."""
    adj, colour, scene = rng.choice(ADJECTIVES), rng.choice(COLOURS), rng.choice(SCENES)
    return f"a {adj} {colour} {label} {scene}, photo number {index}"


def build_shards(cifar: Path, out: Path, samples: int, per_shard: int, seed: int) -> str:
    """Write ``samples`` CIFAR-10 train images with captions as jpg/txt shards (once)."""
    from transformers import AutoTokenizer

    from modalign.core.artifact import atomic_path, atomic_write_json
    from modalign.pretrain.towers.text import bundled_text_model_path

    spec = {"samples": samples, "per_shard": per_shard, "seed": seed, "source": str(cifar)}
    n_shards = -(-samples // per_shard)
    pattern = str(out / f"train-{{000000..{n_shards - 1:06d}}}.tar")
    done = out / "shards.json"
    if done.exists() and json.loads(done.read_text()).get("spec") == spec:
        return pattern
    classes = (cifar / "classes.txt").read_text().split()
    rng, records = random.Random(seed), _cifar_records(cifar, samples)
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(n_shards):
        with atomic_path(out / f"train-{s:06d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                jpg, cls = records[i]
                text = caption(classes[cls], i, rng)
                texts.append(text)
                for ext, data in (("jpg", jpg), ("txt", text.encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tok = AutoTokenizer.from_pretrained(bundled_text_model_path())  # longest caption, tokens:
    most = max(len(ids) for ids in tok(texts)["input_ids"])
    atomic_write_json(done, {"spec": spec, "pattern": pattern, "max_tokens": most})
    return pattern


def _cifar_records(cifar: Path, n: int) -> list[tuple[bytes, int]]:
    """The first ``n`` (jpg bytes, class) pairs of the CIFAR-10 train shards, in file order."""
    records, pending = [], {}
    for shard in sorted(cifar.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                if {"jpg", "cls"} <= pending[key].keys():
                    item = pending.pop(key)
                    records.append((item["jpg"], int(item["cls"])))
                    if len(records) == n:
                        return records
    raise SystemExit(f"{cifar}: only {len(records)} train images; lower --samples")


# ------------------------------------------------------------------ the two runs


def modalign_config(args: argparse.Namespace, pattern: str) -> dict[str, Any]:
    """The ``modalign pretrain`` config of the bench (output.dir is set per run)."""
    image = {"kind": "timm_image", "arch": "resnet18", "input_size": SIZE, "head": "linear"}
    text = {"kind": "sentence_transformer", "arch": "", "lock": "all", "head": "linear"}
    return {
        "data": {"train": pattern, "num_workers": args.workers,
                 "image": {"channels": 3, "train_scale_min": 0.9, "hflip": 0.0}},
        "model": {"modalities": ["image", "text"], "embed_dim": EMBED,
                  "towers": {"image": image, "text": text}},
        "loss": {"kind": "infonce", "pairs": "all"},
        "optim": {"lr": LR, "weight_decay": WD, "betas": [0.9, 0.98], "eps": 1e-6,
                  "warmup_steps": args.warmup, "grad_clip": CLIP},
        "train": {"steps": args.steps, "batch_size": args.batch, "precision": "fp32",
                  "device": "cpu", "log_every": args.log_every, "checkpoint_every": 0,
                  "val_every": 0, "progress": False, "seed": 0},
    }  # fmt: skip


def openclip_argv(args: argparse.Namespace, pattern: str, logs: Path, name: str) -> list[str]:
    return [
        "--model", OC_MODEL, "--train-data", pattern, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch), "--epochs", "1",
        "--batch-size", str(args.batch), "--workers", str(args.workers), "--precision", "fp32",
        "--lr", str(LR), "--wd", str(WD), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--warmup", str(args.warmup), "--grad-clip-norm", str(CLIP), "--lock-text",
        "--log-every-n-steps", str(args.log_every), "--save-frequency", "0",
        "--logs", str(logs), "--name", name, "--seed", "0", "--report-to", "",
    ]  # fmt: skip


def openclip_model_config(context: int) -> dict[str, Any]:
    from modalign.pretrain.towers.text import bundled_text_model_path

    text = bundled_text_model_path()
    return {
        "embed_dim": EMBED,
        "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": True,
                       "image_size": SIZE},
        "text_cfg": {"hf_model_name": text, "hf_tokenizer_name": text,
                     "hf_model_pretrained": True, "hf_proj_type": "linear",
                     "hf_pooler_type": "mean_pooler", "context_length": context},
    }  # fmt: skip


def openclip_main(config: str, argv: list[str]) -> None:
    """(In the child process) register the model config, then open_clip_train's own main.

    webdataset >= 1.0 ends each shard's member stream with an empty end-of-shard dict, which
    open_clip_train 3.3's ``group_by_keys_nothrow`` cannot read (``KeyError: 'fname'``): its
    expander is bound without that marker, as webdataset 0.2 behaved. Nothing else changes.
    """
    from functools import partial

    import open_clip
    import open_clip_train.data as oc_data
    from open_clip_train.main import main
    from webdataset.tariterators import tar_file_expander

    oc_data.tar_file_expander = partial(tar_file_expander, eof_value=None)
    open_clip.add_model_config(config)
    main(argv)


def _tree_cpu(proc: Any) -> float:
    """CPU seconds (user + system) of ``proc`` and its live descendants (loader workers)."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # a worker that just ended
            pass
    return total


def run(cmd: list[str], log: Path, keys: Callable[[], set[int]]) -> tuple[float, dict]:
    """Run ``cmd`` (stdout+stderr to ``log``); its wall time and, for each log window as it
    appears (``keys()``), the CPU seconds its processes had used by then (polled 4x/s)."""
    import psutil

    marks: dict[int, float] = {}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        tree = psutil.Process(proc.pid)
        while proc.poll() is None:
            cpu = _tree_cpu(tree)
            marks.update((k, cpu) for k in keys() - marks.keys())
            time.sleep(0.25)
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]}... failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0, marks


def _modalign_windows(args: argparse.Namespace, file: Path) -> dict[int, tuple[float, float]]:
    """metrics.jsonl window k (steps (k-1)L+1 .. kL) -> (samples/s, data-wait share)."""
    windows = {}
    for line in file.read_text().splitlines() if file.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "samples_per_s" in r and r["step"] % args.log_every == 0:
            windows[r["step"] // args.log_every] = (r["samples_per_s"], r["data_wait"])
    return windows


OC_LINE = re.compile(
    r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)"
)


def _openclip_windows(args: argparse.Namespace, file: Path) -> dict[int, tuple[float, float]]:
    """out.log window k (the L steps before step kL + 1) -> (samples/s, data-wait share)."""
    windows = {}
    for m in OC_LINE.finditer(file.read_text() if file.exists() else ""):
        step, data_t, batch_t = int(m[1]) // args.batch, float(m[2]), float(m[3])
        if step > 1 and step % args.log_every == 1:
            windows[step // args.log_every] = (args.batch / batch_t, data_t / batch_t)
    return windows


def run_side(args: argparse.Namespace, side: str, pattern: str, k: int) -> dict[str, Any]:
    """One run of ``side`` (modalign | open_clip): its windows, CPU marks and wall time."""
    runs = args.work / "runs"
    if side == "modalign":
        out = runs / f"modalign-{k}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "modalign", "pretrain", str(args.work / "modalign.yaml")]
        cmd += ["--set", f"output.dir={out}", *args.modalign_set]
        log, parse, live = out.with_suffix(".log"), _modalign_windows, out / "metrics.live.jsonl"
    else:
        name = f"openclip-{k}"
        shutil.rmtree(runs / name, ignore_errors=True)
        cmd = [sys.executable, __file__, "_openclip_main", str(args.oc_config)]
        cmd += openclip_argv(args, pattern, runs, name)
        log, parse, live = runs / f"{name}.log", _openclip_windows, runs / name / "out.log"
    wall, marks = run(cmd, log, lambda: set(parse(args, live)))
    final = out / "metrics.jsonl" if side == "modalign" else live
    placed = FROZEN_LINE.search(log.read_text()) if side == "modalign" else None
    frozen = placed[1] if placed else "step"  # train.frozen_towers as the run resolved it
    return {"windows": parse(args, final), "marks": marks, "wall": wall, "frozen": frozen}


# modalign's log line when train.frozen_towers puts frozen towers in the loader workers
FROZEN_LINE = re.compile(r"frozen towers run in the loader: (.+)")


def summarise(args: argparse.Namespace, a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Rates over the windows both runs logged after the warm-up (same steps, same count):
    samples/s from each log, and samples per CPU-second of each run's processes."""
    first = -(-args.warmup // args.log_every) + 1  # window k covers steps (k-1)L+1 .. kL
    keys = sorted(k for k in a["windows"].keys() & b["windows"].keys() if k >= first)
    if not keys:
        raise SystemExit("no log window after the warm-up: raise --steps or lower --warmup")
    out: dict[str, float] = {"windows": len(keys)}
    for side, res in (("m", a), ("o", b)):
        out[f"{side}_rate"] = statistics.harmonic_mean([res["windows"][k][0] for k in keys])
        out[f"{side}_wait"] = statistics.mean([res["windows"][k][1] for k in keys])
        out[f"{side}_wall"] = res["wall"]
        cpu = res["marks"][keys[-1]] - res["marks"][keys[0] - 1]
        out[f"{side}_cpu_rate"] = len(keys) * args.log_every * args.batch / cpu
    out["ratio"] = out["m_rate"] / out["o_rate"]
    out["cpu_ratio"] = out["m_cpu_rate"] / out["o_cpu_rate"]
    return out


# ------------------------------------------------------------------ checks and report


def print_param_counts(cfg_path: Path) -> None:
    """Total / trainable parameters per tower part on both sides, built as the runs build them."""
    import open_clip
    import torch

    from modalign.config import load_config
    from modalign.pretrain.losses import ContrastiveLoss
    from modalign.pretrain.model import build_encoder

    cfg = load_config(str(cfg_path), [])
    enc = build_encoder(cfg.model, cfg.data).encoder
    loss = ContrastiveLoss(list(cfg.model.modalities), cfg.loss)
    oc = open_clip.create_model(OC_MODEL, precision="fp32")
    oc.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)  # what --lock-text does
    parts = {
        "modalign": {"image trunk": enc.trunks["image"], "text trunk": enc.trunks["text"],
                     "projections": enc.heads, "temperature": loss},
        "open_clip": {"image trunk": oc.visual.trunk, "text trunk": oc.text.transformer,
                      "projections": torch.nn.ModuleList([oc.visual.head, oc.text.proj]),
                      "temperature": torch.nn.ParameterList([oc.logit_scale])},
    }  # fmt: skip
    print("| part | modalign params (trainable) | open_clip params (trainable) | dtypes |")
    print("|---|---|---|---|")
    for part in parts["modalign"]:
        row, dtypes = [], set()
        for side in parts:
            ps = list(parts[side][part].parameters())
            dtypes |= {str(p.dtype).removeprefix("torch.") for p in ps}
            row.append(f"{sum(p.numel() for p in ps):,} "
                       f"({sum(p.numel() for p in ps if p.requires_grad):,})")  # fmt: skip
        print(f"| {part} | {row[0]} | {row[1]} | {'/'.join(sorted(dtypes))} |")


# fmt: off
def report(args: argparse.Namespace, rows: list[dict[str, float]], context: int) -> None:
    print(f"\nshared 2-core CPU (OMP_NUM_THREADS {args.threads_note}), batch {args.batch}, fp32, "
          f"{args.workers} loader worker(s), {args.steps} steps/run, windows of {args.log_every} "
          f"steps after {args.warmup} warm-up steps, open_clip context_length {context}\n")
    print("| pair | modalign samples/s | open_clip samples/s | ratio | modalign samples/CPU-s "
          "| open_clip samples/CPU-s | CPU ratio | data wait (m / o) | wall s (m / o) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {i + 1} | {r['m_rate']:.1f} | {r['o_rate']:.1f} | {r['ratio']:.2f}x "
              f"| {r['m_cpu_rate']:.1f} | {r['o_cpu_rate']:.1f} | {r['cpu_ratio']:.2f}x "
              f"| {100 * r['m_wait']:.1f}% / {100 * r['o_wait']:.1f}% "
              f"| {r['m_wall']:.0f} / {r['o_wall']:.0f} |")
    for key, what in (("ratio", "samples/s (logs)"), ("cpu_ratio", "samples per CPU-second")):
        vals = [r[key] for r in rows]
        med = statistics.median(vals)
        print(f"\n{what}: median ratio {med:.2f}x over {len(rows)} pairs (range {min(vals):.2f}-"
              f"{max(vals):.2f}); reference {REFERENCE}x, target >= {TARGET}x: "
              f"{'met' if med >= TARGET else 'NOT met'}")
    wait = statistics.median(r["m_wait"] for r in rows)
    print(f"modalign data wait (median of runs) {100 * wait:.1f}% of step time "
          f"(target < 5%: {'met' if wait < 0.05 else 'NOT met'})")
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get("MODALIGN_CIFAR")
    ap.add_argument("--data", type=Path, default=Path(env) if env else DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=Path("runs/e2e/bench"))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the figures")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--samples", type=int, default=0, help="0 = (steps + 4) x batch")
    ap.add_argument("--context", default="auto", help="open_clip context_length (auto|N)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both; 0 = default")
    ap.add_argument("--modalign-set", nargs="*", default=[], help="extra --set k=v for modalign")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both trainers
    args.threads_note = os.environ.get("OMP_NUM_THREADS", "default")
    return args


def main() -> None:
    import yaml

    from modalign.core.artifact import atomic_write_json, atomic_write_text

    args = parse_args()
    if not (args.data / "classes.txt").exists():
        raise SystemExit(f"{args.data}: no CIFAR-10 shards here; pass --data or MODALIGN_CIFAR")
    samples = args.samples or (args.steps + 4) * args.batch  # no caption seen twice
    shards = args.work / "shards"
    pattern = build_shards(args.data, shards, samples, 2000, seed=0)
    meta = json.loads((shards / "shards.json").read_text())
    context = meta["max_tokens"] if args.context == "auto" else int(args.context)
    cfg_path = args.work / "modalign.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(modalign_config(args, pattern), sort_keys=False))
    oc_cfg = args.oc_config = args.work / "open_clip" / f"{OC_MODEL}.json"
    oc_cfg.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(oc_cfg, openclip_model_config(context))
    import open_clip

    open_clip.add_model_config(str(oc_cfg))
    print_param_counts(cfg_path)
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(args.pairs):
        a = run_side(args, "modalign", pattern, k)
        b = run_side(args, "open_clip", pattern, k)
        rows.append(summarise(args, a, b))
        r = rows[-1]
        where = "loader workers" if a["frozen"] != "step" else "the step"
        print(f"pair {k + 1}: modalign {r['m_rate']:.1f}/s, open_clip {r['o_rate']:.1f}/s, "
              f"{r['ratio']:.2f}x; per CPU-s {r['cpu_ratio']:.2f}x "
              f"(modalign's frozen text tower ran in {where})", flush=True)  # fmt: skip
    report(args, rows, context)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_openclip_main":
        openclip_main(sys.argv[2], sys.argv[3:])
    else:
        main()
