"""Shared CLI pieces: output contract (``--json``), common flags, ``--set`` pairs, the world."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from modalign.core.errors import UserInputError
from modalign.core.world import launch_world


def emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    """``--json``: exactly one JSON object on stdout; else ``text`` (or pretty JSON).

    The JSON is strict (RFC 8259): a float that is not finite (a loss never computed, a
    metric of nothing) is written as ``null``, never as ``NaN``/``Infinity``."""
    if getattr(args, "json", False):
        sys.stdout.write(json_text(result) + "\n")
    elif text is not None:
        print(text)
    else:
        print(json_text(result, indent=2))


def json_text(obj: Any, indent: int | None = None) -> str:
    """``obj`` as strict JSON: non-finite floats become ``null``; other objects ``str()``."""
    return json.dumps(_finite(obj), default=str, indent=indent, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def emit_error(message: str, exit_code: int) -> None:
    """``--json`` on failure: the one JSON object on stdout is ``{"error", "exit_code"}``."""
    sys.stdout.write(json_text({"error": message, "exit_code": exit_code}) + "\n")
    sys.stdout.flush()


def is_main_process() -> bool:
    """Rank 0 as ``accelerate launch`` / torchrun set it (True when run directly)."""
    return launch_world().rank == 0


def add_common(p: argparse.ArgumentParser, json_flag: bool = True, device: bool = False) -> None:
    """``--json`` and (for model commands) ``--device``/``--batch-size``."""
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if device:
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--batch-size", type=int, default=64)


DATA_HELP = "SRC: manifest (.jsonl/.csv/.parquet) or WebDataset shard pattern (.tar, {a..b})"


def add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, metavar="SRC", help=DATA_HELP)


def add_set(p: argparse.ArgumentParser) -> None:
    """``--set a=1 b=2`` (several pairs after one flag) and repeated ``--set`` flags."""
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override config keys: --set a=1 b=2 (repeatable)",
    )


def set_pairs(args: argparse.Namespace) -> list[str]:
    """The ``--set`` pairs; a word without ``=`` is a usage error naming it."""
    pairs = list(getattr(args, "set", None) or [])
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise UserInputError(
            f"--set {bad[0]!r}: expected KEY=VALUE (e.g. --set train.steps=10 model.embed_dim=64); "
            "put the config name before --set"
        )
    return pairs


def load_cli_config(args: argparse.Namespace) -> Any:
    import modalign

    return modalign.load_config(args.config, set_pairs(args))


def floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(
            f"{flag} {text!r}: expected comma-separated numbers, e.g. 0,0.5,1"
        ) from None
