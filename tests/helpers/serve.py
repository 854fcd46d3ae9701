"""Helpers for the server tests: a tiny trained index, and uvicorn running in a thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.corpus import tiny_overrides, write_tiny_corpus


@dataclass(frozen=True)
class TinyIndex:
    corpus: Path  # manifest
    model: Path
    index: Path


_BUILT: dict[Path, TinyIndex] = {}


def tiny_index_once(base: Path) -> TinyIndex:
    """:func:`build_tiny_index` under ``base``, built once per test session.

    ``MODALIGN_TEST_SERVE_ROOT=DIR`` reuses (or first builds) the tiny index in DIR across
    runs, for fast iteration on the server tests.
    """
    reuse = os.environ.get("MODALIGN_TEST_SERVE_ROOT")
    if reuse:
        root = Path(reuse)
        if not (root / "index" / "index.json").is_file():
            build_tiny_index(root)
        return TinyIndex(root / "corpus" / "train.jsonl", root / "model", root / "index")
    if base not in _BUILT:
        _BUILT[base] = build_tiny_index(base / "tiny-serve")
    return _BUILT[base]


def build_tiny_index(root: Path, n: int = 32, steps: int = 4) -> TinyIndex:
    """Pretrain the tiny image/audio/text model a few steps and index its corpus (~10-30 s)."""
    from modalign.config import load_config
    from modalign.pretrain.bundle import load_bundle
    from modalign.pretrain.trainer import pretrain
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.index.corpus import build_corpus_index

    manifest = write_tiny_corpus(root / "corpus", n=n)
    model_dir = root / "model"
    cfg = load_config("demo", tiny_overrides(manifest, model_dir, steps=steps, batch=16))
    pretrain(cfg)
    model = load_bundle(model_dir)
    emb, _ = embed_source(model, manifest, batch_size=32)
    build_corpus_index(emb, root / "index", model.fingerprint, str(model_dir.resolve()))
    return TinyIndex(manifest, model_dir, root / "index")


class ThreadedServer:
    """uvicorn serving ``app`` on a free loopback port in a background thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        import uvicorn

        # proto=IPPROTO_TCP, as uvicorn's own bind is: asyncio sets TCP_NODELAY only on such
        # sockets; with Nagle on, every response (two writes) waits ~40 ms for a delayed ACK
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self._sock.close()
