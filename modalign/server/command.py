"""``modalign serve``: the CLI entry (the top-level parser registers it with
:func:`add_serve_command`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from modalign.core.config_io import AT_LEAST_1, POSITIVE, Range, arg_type
from modalign.server.settings import ServeLimits, ServeSettings, check_bind, read_token

__all__ = ["add_serve_command", "cmd_serve", "settings_from_args"]

log = logging.getLogger(__name__)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``modalign`` sub-command parsers."""
    d = ServeLimits()
    p = subparsers.add_parser(
        "serve", help="serve cross-modal search over HTTP (JSON API + web page)"
    )
    p.add_argument("--index", required=True, help="index directory (modalign index build --out)")
    p.add_argument("--model", help="model bundle (default: the one the index records)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=arg_type(int, Range(ge=0, le=65535)), default=8000)
    p.add_argument(
        "--token-file",
        help="file holding the access token (required when --host is not a loopback address)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        default="torch",
        help="run the query encoders in PyTorch (default) or ONNX Runtime (--model: the folder "
        "`modalign export --format onnx` wrote)",
    )
    p.add_argument(
        "--mmap", action="store_true", help="map the FAISS files read-only instead of loading them"
    )
    p.add_argument(
        "--max-k",
        type=arg_type(int, AT_LEAST_1),
        default=d.max_k,
        help=f"largest k (default {d.max_k})",
    )
    p.add_argument(
        "--max-result-ids",
        type=arg_type(int, AT_LEAST_1),
        default=d.max_result_ids,
        help="largest num_result_ids of /knn-service (ids and scores only; default %(default)s)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=arg_type(float, Range(gt=0, le=1024 * 1024)),
        default=d.max_body_bytes / 1048576,
        help="largest request body in MiB (default %(default)g)",
    )
    p.add_argument(
        "--max-decode-mb",
        type=arg_type(float, Range(gt=0, le=1024 * 1024)),
        default=d.max_decode_bytes / 1048576,
        help="most memory decoding one upload may take, in MiB (default %(default)g)",
    )
    p.add_argument(
        "--max-decode-total-mb",
        type=arg_type(float, Range(gt=0, le=1024 * 1024)),
        default=d.max_decode_total_bytes / 1048576,
        help="most memory all concurrent decodes may take, in MiB (default %(default)g)",
    )
    p.add_argument(
        "--max-batch",
        type=arg_type(int, AT_LEAST_1),
        default=d.max_batch,
        help="queries per forward pass",
    )
    p.add_argument(
        "--decode-timeout",
        type=arg_type(float, POSITIVE),
        default=d.decode_timeout_s,
        help="seconds per upload",
    )
    p.add_argument(
        "--torch-threads",
        type=arg_type(int, AT_LEAST_1),
        default=1,
        help="encoder intra-op threads, PyTorch's or ONNX Runtime's (default 1: batching is "
        "the parallelism)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        help="allow browser calls from this origin (e.g. a clip-front page); repeatable",
    )
    p.set_defaults(func=cmd_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Checked settings (token read, limits validated) from parsed arguments."""
    limits = ServeLimits(
        max_body_bytes=int(args.max_upload_mb * 1048576),
        max_k=args.max_k,
        max_result_ids=args.max_result_ids,
        max_decode_bytes=int(args.max_decode_mb * 1048576),
        max_decode_total_bytes=int(args.max_decode_total_mb * 1048576),
        decode_timeout_s=args.decode_timeout,
        max_batch=args.max_batch,
    )
    token = read_token(args.token_file) if args.token_file else None
    settings = ServeSettings(args.host, args.port, token, limits, tuple(args.cors_origin))
    check_bind(settings)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """:func:`modalign.serve` with the flags' settings, until interrupted; returns 0."""
    import modalign

    settings = settings_from_args(args)  # bad flags fail before the model loads
    modalign.serve(
        args.index,
        args.model,
        settings=settings,
        device=args.device,
        mmap=args.mmap,
        torch_threads=args.torch_threads,
        runtime=args.runtime,
    )
    return 0
