"""``modalign demo`` and ``modalign data build-demo|avmnist|icons|inspect|pack``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modalign.cli.common import add_common, emit


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.demo import run_demo

    result, text = run_demo(Path(args.out), steps=args.steps, fresh=args.fresh)
    emit(args, result, text)
    return result


def cmd_build_demo(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.corpora.demo import build_demo_corpus

    corpus = build_demo_corpus(args.out, seed=args.seed)
    result = {
        "out": str(corpus.root),
        "train": str(corpus.train),
        "test": str(corpus.test),
        "items": corpus.items,
        "wall_s": round(corpus.seconds, 2),
    }
    text = (
        f"wrote {corpus.items} items to {corpus.root} ({corpus.seconds:.1f}s): "
        f"{corpus.train.name}, {corpus.test.name}"
    )
    emit(args, result, text)
    return result


def cmd_avmnist(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.corpora.avmnist import build_avmnist

    result = build_avmnist(
        args.mnist,
        args.fsdd,
        args.out,
        seed=args.seed,
        images_per_recording=args.images_per_recording,
    )
    emit(args, result)
    return result


def cmd_icons(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.core.errors import UserInputError
    from modalign.data.corpora.icons import GET_PACKAGE, build_icons

    if not args.package:
        raise UserInputError(
            f"modalign data icons needs --package PATH: the @tabler/icons package; {GET_PACKAGE}"
        )
    result = build_icons(
        args.package,
        args.out,
        seed=args.seed,
        size=args.size,
        min_category_items=args.min_category_items,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        audio=args.audio,
        workers=args.workers,
    )
    items = result["items"]
    text = (
        f"wrote {items['train']} train + {items['test']} test icons in "
        f"{len(result['categories'])} categories to {result['out']} "
        f"({result['package']['name']} {result['package']['version']}, "
        f"{result['package']['license']}; {result['wall_s']:.1f}s)"
    )
    emit(args, result, text)
    return result


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.inspect import inspect_source

    result = inspect_source(args.src)
    emit(args, result)
    return result


def cmd_pack(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.pack import pack_shards

    result = pack_shards(args.src, args.out, args.shard_size)
    emit(args, result)
    return result


def add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="whole pipeline on the built-in corpus; prints a report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the demo config's)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="rebuild the corpus and retrain from scratch"
    )
    add_common(p)
    p.set_defaults(func=cmd_demo)


def add_data_group(sub: Any) -> None:
    data = sub.add_parser("data", help="corpora: build, inspect, pack").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser(
        "build-demo", help="built-in corpus (pip-only sources) -> files + manifests"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    p.set_defaults(func=cmd_build_demo)
    p = data.add_parser("avmnist", help="AV-MNIST-style corpus from FSDD + MNIST")
    p.add_argument("--mnist", required=True)
    p.add_argument("--fsdd", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-recording", type=int, default=4,
                   help="MNIST images paired with each recording")  # fmt: skip
    add_common(p)
    p.set_defaults(func=cmd_avmnist)
    p = data.add_parser(
        "icons",
        help="instance-level image + caption (+ speech) corpus from the npm package @tabler/icons",
        description="Render @tabler/icons (npm pack @tabler/icons, or npm install "
        "@tabler/icons) into images, captions (name + tags) and spoken names; label = category "
        "(categories with >= --min-category-items icons); split by item family, seeded.",
    )
    p.add_argument("--package", help="package folder or its npm pack .tgz")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="PNG side in pixels")
    p.add_argument("--min-category-items", type=int, default=20,
                   help="drop categories with fewer icons")  # fmt: skip
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="also write val.jsonl, carved out of train (model selection)")  # fmt: skip
    p.add_argument("--no-audio", dest="audio", action="store_false",
                   help="skip the spoken names (no eSpeak needed)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="speech synthesis processes")
    add_common(p)
    p.set_defaults(func=cmd_icons)
    p = data.add_parser("inspect", help="counts per modality, bad items and why")
    p.add_argument("src", metavar="SRC")
    add_common(p)
    p.set_defaults(func=cmd_inspect)
    p = data.add_parser(
        "pack",
        help="manifest -> WebDataset shards",
        description="Write shard-NNNNNN.tar files (each atomically) and index.json into --out; "
        "stale shard files numbered past the new count, left by an earlier larger pack, are removed.",
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    add_common(p)
    p.set_defaults(func=cmd_pack)
