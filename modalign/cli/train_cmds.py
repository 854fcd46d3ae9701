"""``modalign pretrain`` and ``modalign finetune``."""

from __future__ import annotations

import argparse
from typing import Any

from modalign.cli.common import add_common, add_set, emit, is_main_process, load_cli_config


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    import modalign

    res = modalign.run_pretrain(load_cli_config(args), resume=args.resume)
    result = {
        "output_dir": str(res.output_dir),
        "steps": res.steps,
        "final_loss": res.final_loss,
        "wall_s": round(res.wall_s, 2),
        **res.bad_items,
    }
    if is_main_process():
        text = (
            f"model bundle: {res.output_dir} (step {res.steps}, loss {res.final_loss:.4f}, "
            f"{res.wall_s:.0f}s)"
        )
        emit(args, result, text)
    return result


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    import modalign
    from modalign.report import classify_table

    res = modalign.run_finetune(load_cli_config(args))
    out = res.out_dir
    result = {
        "out": str(out),
        "fused": res.fused,
        "labels_only": res.labels_only,
        "pseudo_labels": res.pseudo,
    }
    table = classify_table(
        {"fused (labels + pseudo-labels)": res.fused, "labels only": res.labels_only}
    )
    emit(args, result, f"classifier bundle: {out}\n\n{table}")
    return result


def add_train_group(sub: Any) -> None:
    for name, func, what in (
        ("pretrain", cmd_pretrain, "contrastive pretraining -> model bundle"),
        ("finetune", cmd_finetune, "few labels + pseudo-labels -> classifier bundle"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("config", help="YAML path or built-in config name (demo, avmnist)")
        add_set(p)
        if name == "pretrain":
            p.add_argument(
                "--resume",
                nargs="?",
                const="latest",
                default=None,
                help="continue from the latest checkpoint (or a given checkpoint dir)",
            )
        add_common(p)
        p.set_defaults(func=func)
