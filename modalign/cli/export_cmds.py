"""``modalign export --model BUNDLE --format FORMAT --out DIR``: a bundle in a format other tools
read (:func:`modalign.pretrain.export_bundle`; formats from its registry)."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from modalign.cli.common import add_common, emit
from modalign.core.errors import UserInputError


def format_options(pairs: list[str] | None) -> dict[str, Any]:
    """``--option KEY=VALUE`` pairs -> the format's options (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserInputError(
                f"--option {pair!r}: expected KEY=VALUE, e.g. --option opset=18 (the format's "
                "options are listed in its documentation)"
            )
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from modalign.pretrain.export import export_bundle, read_export_meta

    options = format_options(args.option)
    if args.merge:  # the bundle format: adapters folded into the base weights
        options["merge"] = True
    out = export_bundle(args.model, args.out, args.format, options)
    meta = read_export_meta(out)
    result = {
        "out": str(out),
        "format": args.format,
        "bundle": meta.get("bundle", {}),
        "files": sorted(meta.get("files", {})),
    }
    graphs = meta.get("graphs") or {}
    if graphs:
        result["max_abs_diff"] = {m: g["max_abs_diff"] for m, g in graphs.items()}
    text = f"exported {args.model} as {args.format} into {out}: " + ", ".join(result["files"])
    if graphs:
        text += "\nmax |diff| vs PyTorch: " + json.dumps(result["max_abs_diff"])
    emit(args, result, text)
    return result


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="write a bundle in another format (onnx, open_clip, sentence_transformers)"
    )
    p.add_argument("--model", required=True, help="model bundle directory")
    p.add_argument(
        "--format",
        required=True,
        help="onnx, open_clip, sentence_transformers, bundle, or a plugin's format (an unknown "
        "name lists the installed ones)",
    )
    p.add_argument("--out", required=True, help="a new or empty folder (or an earlier export)")
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the format (repeatable), e.g. --option opset=18",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="--format bundle: fold every tower's adapter (LoRA...) into its base weights, a "
        "standalone bundle with the same embeddings (= --option merge=true)",
    )
    add_common(p)
    p.set_defaults(func=cmd_export)
