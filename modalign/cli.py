"""``modalign`` command line: parse, load config, call library functions, report.

Contract (``docs/design.md``): ``--json`` prints exactly one JSON object on stdout (logs and
progress go to stderr); exit 0 on success, 2 on a usage/config/input error, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modalign.core.errors import ModalignError, UserInputError

log = logging.getLogger("modalign")

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    elif text is not None:
        print(text)
    else:
        print(json.dumps(result, indent=2, default=str))


def _launch_world() -> tuple[int, int]:
    """(rank, world size) as set by `accelerate launch` / torchrun; (0, 1) when run directly."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _is_main_process() -> bool:
    return _launch_world()[0] == 0


# ---------------------------------------------------------------- handlers (thin by design)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.demo import run_demo

    result, text = run_demo(Path(args.out), steps=args.steps, fresh=args.fresh)
    _emit(args, result, text)
    return result


def cmd_build_demo(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.demo_corpus import build_demo_corpus

    corpus = build_demo_corpus(args.out, seed=args.seed)
    result = {
        "out": str(corpus.root),
        "train": str(corpus.train),
        "test": str(corpus.test),
        "items": corpus.items,
        "wall_s": round(corpus.seconds, 2),
    }
    _emit(
        args,
        result,
        f"wrote {corpus.items} items to {corpus.root} ({corpus.seconds:.1f}s): {corpus.train.name}, {corpus.test.name}",
    )
    return result


def cmd_avmnist(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.avmnist import build_avmnist

    result = build_avmnist(
        args.mnist,
        args.fsdd,
        args.out,
        seed=args.seed,
        images_per_recording=args.images_per_recording,
    )
    _emit(args, result)
    return result


def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.inspect import inspect_source

    result = inspect_source(args.src)
    _emit(args, result)
    return result


def cmd_pack(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.data.pack import pack_shards

    result = pack_shards(args.src, args.out, args.shard_size)
    _emit(args, result)
    return result


def _config(args: argparse.Namespace):
    from modalign.config import load_config

    return load_config(args.config, args.set or [])


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.pretrain.trainer import pretrain

    cfg = _config(args)
    res = pretrain(cfg, resume=args.resume)
    result = {
        "output_dir": str(res.output_dir),
        "steps": res.steps,
        "final_loss": res.final_loss,
        "wall_s": round(res.wall_s, 2),
        **res.bad_items,
    }
    if _is_main_process():
        _emit(
            args,
            result,
            f"model bundle: {res.output_dir} (step {res.steps}, loss {res.final_loss:.4f}, {res.wall_s:.0f}s)",
        )
    return result


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.finetune.pipeline import run_finetune
    from modalign.report import classify_table

    cfg = _config(args)
    out = Path(cfg.finetune.out or Path(cfg.output.dir) / "classifier")
    res = run_finetune(cfg.finetune, out)
    result = {
        "out": str(out),
        "fused": res.fused,
        "labels_only": res.labels_only,
        "pseudo_labels": res.pseudo,
    }
    _emit(
        args,
        result,
        f"classifier bundle: {out}\n\n"
        + classify_table(
            {"fused (labels + pseudo-labels)": res.fused, "labels only": res.labels_only}
        ),
    )
    return result


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import write_embedding_shards

    rank, size = _launch_world()
    model = load_bundle(args.model, device=args.device)
    result = write_embedding_shards(
        model,
        args.data,
        args.out,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        rank=rank,
        world_size=size,
    )
    _emit(args, result)
    return result


def cmd_index_build(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.retrieval.corpus_index import build_corpus_index

    emb, fingerprint, model_path = _embeddings(args)
    stats = build_corpus_index(
        emb,
        args.out,
        fingerprint,
        model_path,
        factory=args.factory,
        device=args.device,
        memory_budget_bytes=args.memory_budget,
        target_recall=args.target_recall,
    )
    result = {"out": args.out, "fingerprint": fingerprint, "modalities": stats}
    _emit(args, result)
    return result


def cmd_index_add(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.retrieval.corpus_index import CorpusIndex

    emb, fingerprint, _ = _embeddings(args)
    index = CorpusIndex.open(args.index)
    added = index.add(emb, fingerprint)
    index.save(args.index)
    result = {
        "index": args.index,
        "added": added,
        "total": {m: len(ix) for m, ix in index.indexes.items()},
    }
    _emit(args, result)
    return result


def _embeddings(args: argparse.Namespace):
    from modalign.pretrain.bundle import load_bundle
    from modalign.retrieval.embed import embed_source, read_embedding_shards

    if args.embeddings:
        emb, meta = read_embedding_shards(args.embeddings)
        return emb, meta["fingerprint"], meta.get("model", "")
    if not (args.model and args.data):
        raise UserInputError("give --model DIR and --data SRC, or --embeddings DIR")
    model = load_bundle(args.model, device=args.device)
    emb, bad = embed_source(model, args.data, batch_size=args.batch_size)
    if bad.total:
        log.warning(bad.summary())
    return emb, model.fingerprint, str(Path(args.model).resolve())


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.pretrain.bundle import load_bundle
    from modalign.report import table
    from modalign.retrieval.corpus_index import CorpusIndex

    queries = {
        m: v
        for m, v in (("text", args.text), ("image", args.image), ("audio", args.audio))
        if v is not None
    }
    if len(queries) != 1:
        raise UserInputError("give exactly one of --text, --image, --audio")
    ((modality, value),) = queries.items()
    if modality == "text" and not value.strip():
        raise UserInputError("--text: the query is empty")
    if modality != "text" and not Path(value).is_file():
        raise UserInputError(f"--{modality} {value}: file not found")
    index = CorpusIndex.open(args.index)
    model_path = args.model or index.meta.get("model")
    if not model_path:
        raise UserInputError(f"{args.index} does not record its model; pass --model DIR")
    model = load_bundle(model_path, device=args.device)
    index.require_model(model.fingerprint)
    vectors = model.encode(**{modality: [value]})[modality].numpy()
    targets = args.target or [m for m in index.modalities if m != modality] or index.modalities
    hits = index.search(vectors, k=args.k, targets=targets)[0]
    result = {"query": {modality: value}, "results": [h.to_dict() for h in hits]}
    _emit(
        args,
        result,
        table(
            ["rank", "score", "modality", "item", "label"],
            [[i + 1, h.score, h.modality, h.value, h.label] for i, h in enumerate(hits)],
        ),
    )
    return result


def cmd_eval_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.pretrain.bundle import load_bundle
    from modalign.report import retrieval_table
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.evaluate import evaluate_pairs

    model = load_bundle(args.model, device=args.device)
    emb, bad = embed_source(model, args.data, batch_size=args.batch_size)
    result = evaluate_pairs(emb, level=args.level)
    result["bad_items"] = bad.total
    _emit(args, result, retrieval_table(result))
    return result


def cmd_eval_classify(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.finetune.pipeline import load_classifier
    from modalign.report import classify_table

    clf = load_classifier(args.model, device=args.device)
    result = clf.evaluate(args.data, drop=args.drop or [])
    if args.noise or args.attack:
        from modalign.finetune.robustness import adversarial, noise_curve

        levels = _floats(args.noise_levels, "--noise-levels")
        result["noise"] = {m: noise_curve(clf, args.data, m, levels) for m in args.noise or []}
        eps = _floats(args.eps, "--eps")
        result["adversarial"] = {
            m: adversarial(clf, args.data, m, eps, attack=args.attack)
            for m in (args.attack_modality or clf.inputs)
            if args.attack
        }
    if args.confusion_png:
        from modalign.finetune.metrics import save_confusion_png

        save_confusion_png(result["confusion"], clf.class_names, args.confusion_png)
    _emit(args, result, classify_table({Path(args.model).name: result}))
    return result


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(
            f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.5,1"
        ) from None


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.finetune.pipeline import load_classifier

    clf = load_classifier(args.model, device=args.device)
    preds = clf.predict(args.data, drop=args.drop or [])
    if args.out:
        from modalign.core.artifact import atomic_write_text

        atomic_write_text(Path(args.out), "".join(json.dumps(p) + "\n" for p in preds))
    result = {"predictions": preds if not args.out else len(preds), "out": args.out}
    _emit(
        args,
        result,
        "\n".join(f"{p['id']}\t{p['label']}\t{p['confidence']:.3f}" for p in preds)
        if not args.out
        else f"wrote {len(preds)} predictions to {args.out}",
    )
    return result


# ---------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, json_flag: bool = True, device: bool = False) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--batch-size", type=int, default=64)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modalign", description="Multimodal self-/semi-supervised representation learning."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="whole pipeline on the built-in corpus; prints a report")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the demo config's)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="rebuild the corpus and retrain from scratch"
    )
    _common(p)
    p.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="corpora: build, inspect, pack").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser(
        "build-demo", help="built-in corpus (pip-only sources) -> files + manifests"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_build_demo)
    p = data.add_parser("avmnist", help="AV-MNIST-style corpus from FSDD + MNIST")
    p.add_argument("--mnist", required=True)
    p.add_argument("--fsdd", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--images-per-recording",
        type=int,
        default=4,
        help="MNIST images paired with each recording",
    )
    _common(p)
    p.set_defaults(func=cmd_avmnist)
    p = data.add_parser("inspect", help="counts per modality, bad items and why")
    p.add_argument("src")
    _common(p)
    p.set_defaults(func=cmd_inspect)
    p = data.add_parser(
        "pack",
        help="manifest -> WebDataset shards",
        description="Write shard-NNNNNN.tar files (each atomically) and index.json into --out; "
        "stale shard files numbered past the new count, left by an earlier larger pack, are removed.",
    )
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    _common(p)
    p.set_defaults(func=cmd_pack)

    for name, func, what in (
        ("pretrain", cmd_pretrain, "contrastive pretraining -> model bundle"),
        ("finetune", cmd_finetune, "few labels + pseudo-labels -> classifier bundle"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("config", help="YAML path or built-in config name (demo, avmnist)")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)"
        )
        if name == "pretrain":
            p.add_argument(
                "--resume",
                nargs="?",
                const="latest",
                default=None,
                help="continue from the latest checkpoint (or a given checkpoint dir)",
            )
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("embed", help="embed a corpus into resumable embedding shards")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-rows", type=int, default=10_000)
    _common(p, device=True)
    p.set_defaults(func=cmd_embed)

    index = sub.add_parser("index", help="FAISS indexes").add_subparsers(
        dest="index_command", required=True, metavar="ACTION"
    )
    p = index.add_parser(
        "build", help="index a corpus (--model/--data) or embedding shards (--embeddings)"
    )
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--embeddings")
    p.add_argument("--out", required=True)
    p.add_argument("--factory", default="auto", help="auto or a FAISS index_factory string")
    p.add_argument("--memory-budget", type=int, default=None, help="bytes the index may use (auto)")
    p.add_argument("--target-recall", type=float, default=0.95)
    _common(p, device=True)
    p.set_defaults(func=cmd_index_build)

    p = index.add_parser("add", help="append items to an existing index without rebuilding it")
    p.add_argument("--index", required=True)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--embeddings")
    _common(p, device=True)
    p.set_defaults(func=cmd_index_add)

    p = sub.add_parser("search", help="query an index by text, image or audio")
    p.add_argument("--index", required=True)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image")
    q.add_argument("--audio")
    p.add_argument("-k", type=int, default=5)
    p.add_argument(
        "--target", action="append", help="modality to search (repeatable; default: all others)"
    )
    p.add_argument("--model", help="model bundle (default: the one the index records)")
    _common(p, device=True)
    p.set_defaults(func=cmd_search)

    ev = sub.add_parser("evaluate", help="retrieval or classification metrics").add_subparsers(
        dest="eval_command", required=True, metavar="WHAT"
    )
    p = ev.add_parser("retrieval", help="Recall@K, mAP, ranks for every modality pair")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--level", choices=["auto", "class", "instance"], default="auto")
    _common(p, device=True)
    p.set_defaults(func=cmd_eval_retrieval)
    p = ev.add_parser(
        "classify", help="accuracy, macro-F1, per-subset accuracy of a classifier bundle"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--drop", action="append", metavar="MODALITY")
    p.add_argument("--confusion-png")
    p.add_argument(
        "--noise",
        action="append",
        metavar="MODALITY",
        help="accuracy vs input noise on this modality",
    )
    p.add_argument("--noise-levels", default="0,0.25,0.5,1,2")
    p.add_argument("--attack", choices=["fgsm", "pgd"], help="L-inf attack on one modality's input")
    p.add_argument("--attack-modality", action="append", metavar="MODALITY")
    p.add_argument("--eps", default="0,0.01,0.03,0.1")
    _common(p, device=True)
    p.set_defaults(func=cmd_eval_classify)

    p = sub.add_parser("predict", help="classify a corpus with a classifier bundle")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--drop", action="append", metavar="MODALITY")
    p.add_argument("--out")
    _common(p, device=True)
    p.set_defaults(func=cmd_predict)
    return parser


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("modalign")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        args.func(args)
    except UserInputError as exc:
        print(f"modalign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modalign: interrupted", file=sys.stderr)
        return 130
    except (ModalignError, Exception) as exc:
        if args.debug:
            raise
        print(
            f"modalign: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
