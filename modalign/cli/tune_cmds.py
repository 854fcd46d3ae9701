"""``modalign tune CONFIG --budget TRIALS|DURATION [--study DIR] [--stage finetune|pretrain]``."""

from __future__ import annotations

import argparse
from typing import Any

from modalign.cli.common import add_common, add_set, emit, set_pairs
from modalign.tune.outputs import comparison_text


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    import modalign

    res = modalign.run_tune(
        args.config,
        args.budget,
        args.study,
        stage=args.stage,
        overrides=set_pairs(args),
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seed,
        val_per_class=args.val_per_class,
        metric=args.metric,
        label_splits=args.label_splits,
    )
    result = {
        "study": str(res.study_dir),
        "stage": res.stage,
        "best_value": res.best_value,
        "best_params": res.best_params,
        "trials": res.trials,
        "new_trials": res.new_trials,
        "files": res.files,
        "baseline": res.baseline,
    }
    text = (
        f"{res.trials} trials ({res.new_trials} new); best validation score "
        f"{res.best_value:.4f}\nbest config: {res.files['best']} "
        f"(use it as: modalign {res.stage} {res.files['best']})"
    )
    if res.baseline is not None:
        text += "\n" + comparison_text(res.baseline)
    emit(args, result, text)
    return result


def add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="AutoML (Optuna) over fine-tuning or pretraining settings")
    p.add_argument("config", help="YAML config or built-in name (as for finetune/pretrain)")
    p.add_argument("--budget", required=True, help="trials (20) or wall time (90s, 30m, 2h)")
    p.add_argument("--study", help="study folder (SQLite storage; resumable)")
    p.add_argument("--stage", choices=["finetune", "pretrain"], default="finetune")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    p.add_argument("--pruner", choices=["median", "sha", "none"], default="median")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument(
        "--val-per-class",
        type=int,
        default=5,
        help="finetune stage: validation rows per class, drawn from the training labels",
    )
    p.add_argument(
        "--label-splits",
        type=int,
        default=1,
        help="finetune stage: score each trial on N seeded splits of the training labels "
        "(few labels / validation / pool) and average; 3 ranks configurations more reliably "
        "than 1 when labels are few, at N times the cost per trial",
    )
    p.add_argument(
        "--metric",
        help="finetune stage: what trials maximise on validation: subsets (mean accuracy over "
        "modality subsets, the default) or accuracy (each row's modalities present)",
    )
    add_set(p)
    add_common(p)
    p.set_defaults(func=cmd_tune)
