"""``modalign evaluate retrieval|classify`` and ``modalign predict``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modalign.cli.common import add_common, add_data, emit, floats


def cmd_eval_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from modalign.pretrain import update_card_metrics
    from modalign.pretrain.bundle import load_bundle
    from modalign.report import retrieval_table
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.evaluate import evaluate_pairs

    model = load_bundle(args.model, device=args.device)
    emb, bad = embed_source(model, args.data, batch_size=args.batch_size)
    result = evaluate_pairs(emb, level=args.level)
    result["bad_items"] = bad.total
    card = update_card_metrics(
        args.model, retrieval_card_rows(result), "evaluate retrieval", data=str(args.data)
    )
    result["model_card"] = card.to_dict()
    emit(args, result, retrieval_table(result))
    return result


def retrieval_card_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``evaluate retrieval`` figures as model-card rows: recall@k with its Wilson 95% interval
    over the pair's queries; mAP and ranks without one (``modalign benchmark`` bootstraps them).
    """
    from modalign.benchmark.figures import wilson_interval
    from modalign.pretrain import metric_row

    rows = []
    for pair, figures in result["pairs"].items():
        n = int(figures["queries"])
        for name, value in figures.items():
            if name.startswith("recall@"):
                low, high = wilson_interval(round(value * n), n)
                rows.append(metric_row(f"{pair} {name}", value, low, high, n, "wilson"))
            elif name in ("map", "median_rank"):
                rows.append(metric_row(f"{pair} {name}", value, None, None, n))
    return rows


def _robustness(args: argparse.Namespace, clf: Any, result: dict[str, Any]) -> None:
    from modalign.finetune.robustness import adversarial, noise_curve

    levels = floats(args.noise_levels, "--noise-levels")
    result["noise"] = {m: noise_curve(clf, args.data, m, levels) for m in args.noise or []}
    eps = floats(args.eps, "--eps")
    result["adversarial"] = {
        m: adversarial(clf, args.data, m, eps, attack=args.attack)
        for m in (args.attack_modality or clf.inputs)
        if args.attack
    }


def cmd_eval_classify(args: argparse.Namespace) -> dict[str, Any]:
    import modalign
    from modalign.report import classify_table

    clf = modalign.load_classifier(args.model, device=args.device)
    result = clf.evaluate(args.data, drop=args.drop or [])
    if args.noise or args.attack:
        _robustness(args, clf, result)
    if args.confusion_png:
        from modalign.finetune.metrics import save_confusion_png

        save_confusion_png(result["confusion"], clf.class_names, args.confusion_png)
    emit(args, result, classify_table({Path(args.model).name: result}))
    return result


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    import modalign

    clf = modalign.load_classifier(args.model, device=args.device)
    preds = clf.predict(args.data, drop=args.drop or [])
    if args.out:
        from modalign.core.artifact import atomic_write_text

        atomic_write_text(Path(args.out), "".join(json.dumps(p) + "\n" for p in preds))
        text = f"wrote {len(preds)} predictions to {args.out}"
    else:
        text = "\n".join(f"{p['id']}\t{p['label']}\t{p['confidence']:.3f}" for p in preds)
    result = {"predictions": preds if not args.out else len(preds), "out": args.out}
    emit(args, result, text)
    return result


def add_evaluate_group(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="retrieval or classification metrics").add_subparsers(
        dest="eval_command", required=True, metavar="WHAT"
    )
    p = ev.add_parser("retrieval", help="Recall@K, mAP, ranks for every modality pair")
    p.add_argument("--model", required=True)
    add_data(p)
    p.add_argument("--level", choices=["auto", "class", "instance"], default="auto")
    add_common(p, device=True)
    p.set_defaults(func=cmd_eval_retrieval)
    p = ev.add_parser(
        "classify", help="accuracy, macro-F1, per-subset accuracy of a classifier bundle"
    )
    p.add_argument("--model", required=True)
    add_data(p)
    p.add_argument("--drop", action="append", metavar="MODALITY")
    p.add_argument("--confusion-png")
    p.add_argument("--noise", action="append", metavar="MODALITY",
                   help="accuracy vs input noise on this modality")  # fmt: skip
    p.add_argument("--noise-levels", default="0,0.25,0.5,1,2")
    p.add_argument("--attack", choices=["fgsm", "pgd"], help="L-inf attack on one modality's input")
    p.add_argument("--attack-modality", action="append", metavar="MODALITY")
    p.add_argument("--eps", default="0,0.01,0.03,0.1")
    add_common(p, device=True)
    p.set_defaults(func=cmd_eval_classify)


def add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify a corpus with a classifier bundle")
    p.add_argument("--model", required=True)
    add_data(p)
    p.add_argument("--drop", action="append", metavar="MODALITY")
    p.add_argument("--out")
    add_common(p, device=True)
    p.set_defaults(func=cmd_predict)
