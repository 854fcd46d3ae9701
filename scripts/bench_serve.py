"""Load-test ``modalign serve`` on loopback: p50/p99 latency and queries/s for text, image and
audio queries at 1, 8 and 32 concurrent clients, on a real index and on a 1M-vector index.

The server runs as a subprocess (``python -m modalign.server``) bound to 127.0.0.1 on a free
port; the load comes from asyncio + httpx in this process. Every cell is bounded by a request
count and a time limit, and the server is stopped at the end, so the script stops by itself.

    python scripts/bench_serve.py --index runs/demo/index          # demo index (modalign demo)
    python scripts/bench_serve.py --index runs/demo/index --million runs/bench-1m
    python scripts/bench_serve.py ... --json                       # also one JSON line

The 1M index holds synthetic unit vectors (clustered, of the model's dimension) under the
index's model fingerprint; it is built once into the ``--million`` directory and reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m modalign.server`` on 127.0.0.1:PORT until stopped."""

    def __init__(self, index: Path, max_k: int = 100) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "modalign.server", "--index", str(index), "--host",
               "127.0.0.1", "--port", str(self.port), "--max-k", str(max_k)]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise SystemExit("server did not start in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def query_sets(corpus_items: list[dict], n: int = 64, n_text: int = 1000) -> dict[str, list[dict]]:
    """Request kwargs per query kind, drawn from the index's own items (files and captions)."""
    by = {m: [r for r in corpus_items if r["modality"] == m] for m in ("text", "image", "audio")}
    out: dict[str, list[dict]] = {}
    if by["text"]:  # unique strings: the frozen text trunk caches embeddings per string
        texts = [r["value"] for r in by["text"][:64]]
        out["text"] = [
            {"json": {"text": f"{texts[i % len(texts)]} {i}", "k": 10}} for i in range(n_text)
        ]
    for m in ("image", "audio"):
        files = [r for r in by[m] if Path(r["value"]).is_file()][: min(n, 32)]
        if files:
            out[m] = [
                {"files": {m: (Path(r["value"]).name, Path(r["value"]).read_bytes())},
                 "data": {"k": "10"}}
                for r in files
            ]  # fmt: skip
    return out


def with_target(reqs: list[dict], target: str) -> list[dict]:
    out = []
    for r in reqs:
        r = dict(r)
        if "json" in r:
            r["json"] = {**r["json"], "target": [target]}
        else:
            r["data"] = {**r["data"], "target": target}
        out.append(r)
    return out


def raw_request(port: int, kwargs: dict) -> bytes:
    """One pre-encoded HTTP/1.1 keep-alive POST /search (body built by httpx once)."""
    req = httpx.Request("POST", f"http://127.0.0.1:{port}/search", **kwargs)
    body = req.read()
    head = (
        f"POST /search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {req.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection: the load generator should cost the
    two shared cores as little as possible (httpx spends ~1 ms of CPU per request)."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __aenter__(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def call(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)


async def run_cell(port: int, reqs: list[bytes], clients: int, max_requests: int, max_s: float):
    """``clients`` concurrent connections sending ``reqs`` round robin until ``max_requests``
    or ``max_s``; returns (latencies, wall seconds, non-200 answers)."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(max_requests))
    stop_at = time.perf_counter() + max_s

    async def loop(warm: bool) -> None:
        nonlocal errors
        async with Connection(port) as conn:
            if warm:  # first-request costs (connection, caches) stay out of the figures
                for raw in reqs[:3]:
                    await conn.call(raw)
                return
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                t = time.perf_counter()
                status, _ = await conn.call(reqs[i % len(reqs)])
                latencies.append(time.perf_counter() - t)
                errors += status != 200

    await loop(warm=True)
    start = time.perf_counter()
    await asyncio.gather(*(loop(warm=False) for _ in range(clients)))
    return latencies, time.perf_counter() - start, errors


def bench_index(label: str, index: Path, target: str | None, args) -> list[dict]:
    items = [json.loads(line) for _, line in zip(range(5000), (index / "items.jsonl").open())]
    if target is not None:  # the 1M index: queries come from the real corpus
        items = [json.loads(line) for line in (Path(args.index) / "items.jsonl").open()]
    kinds = query_sets(items)
    server = Server(index)
    rows = []
    try:
        server.wait()
        for kind, reqs in kinds.items():
            if target is not None:
                reqs = with_target(reqs, target)
            raws = [raw_request(server.port, r) for r in reqs]
            offset = 0  # each cell starts where the last stopped: no text query repeats
            for c in CONCURRENCY:
                n = min(args.max_requests, max(args.min_requests, 12 * c))
                cell = raws[offset:] + raws[:offset]
                offset = (offset + n + 3) % len(raws)
                lat, wall, errors = asyncio.run(run_cell(server.port, cell, c, n, args.max_seconds))
                ms = np.asarray(lat) * 1000
                rows.append({
                    "index": label, "query": kind, "clients": c, "requests": len(lat),
                    "p50_ms": round(float(np.percentile(ms, 50)), 1),
                    "p99_ms": round(float(np.percentile(ms, 99)), 1),
                    "qps": round(len(lat) / wall, 1), "errors": errors,
                })  # fmt: skip
                print(_row(rows[-1]), flush=True)
        info = httpx.get(f"{server.url}/info", timeout=10).json()
        print(f"  batching on {label}: {info['batching']}", flush=True)
    finally:
        server.stop()
    return rows


def _row(r: dict) -> str:
    return (f"{r['index']:<12} {r['query']:<6} {r['clients']:>7} {r['requests']:>8} "
            f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['qps']:>8} {r['errors']:>6}")  # fmt: skip


def build_million(src_index: Path, out: Path, n: int, seed: int = 0) -> Path:
    """A CorpusIndex of ``n`` synthetic clustered unit vectors (modality ``synthetic``)."""
    from modalign.retrieval.embed import Embeddings
    from modalign.retrieval.index.corpus import build_corpus_index

    if (out / "index.json").is_file():
        return out
    meta = json.loads((src_index / "index.json").read_text())
    dim = int(meta["dim"])
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.8 * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(n)]
    emb = Embeddings("synthetic", ids, x, [None] * n, [f"synthetic/{i}" for i in ids])
    t = time.perf_counter()
    build_corpus_index({"synthetic": emb}, out, meta["fingerprint"], meta.get("model", ""))
    print(f"built the {n}-vector index in {time.perf_counter() - t:.0f} s -> {out}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--index", required=True, help="a modalign index (e.g. runs/demo/index)")
    p.add_argument("--million", help="directory for the 1M-vector index (built once, reused)")
    p.add_argument("--million-n", type=int, default=1_000_000)
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--max-seconds", type=float, default=20.0, help="per cell")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    print(f"{'index':<12} {'query':<6} {'clients':>7} {'requests':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'q/s':>8} {'errors':>6}")  # fmt: skip
    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPUs, load average {load:.1f} at start", flush=True)
    rows = bench_index("demo", Path(args.index), None, args)
    if args.million:
        big = build_million(Path(args.index), Path(args.million), args.million_n)
        rows += bench_index(f"{args.million_n // 1000}k-vec", big, "synthetic", args)
    for label in dict.fromkeys(r["index"] for r in rows):
        text = {r["clients"]: r for r in rows if r["index"] == label and r["query"] == "text"}
        if 1 in text and 32 in text:
            print(f"{label}: text p50 at 1 client {text[1]['p50_ms']} ms (target <= 25); "
                  f"32-client throughput {text[32]['qps'] / text[1]['qps']:.1f}x 1-client "
                  "(target >= 3x)")  # fmt: skip
    print(f"# load average {os.getloadavg()[0]:.1f} at the end (was {load:.1f})")
    if args.json:
        print(json.dumps({"rows": rows, "load_start": load, "load_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
