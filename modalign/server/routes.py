"""The HTTP routes: /search, /knn-service, /media/{key}, /healthz, /info, /indices-list, /."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile

from modalign.retrieval.corpus_index import Hit
from modalign.server.batching import Job, MicroBatcher
from modalign.server.engine import DecodeError, SearchEngine
from modalign.server.errors import RequestError
from modalign.server.queries import ParsedQuery, parse_json, parse_knn, parse_multipart_fields
from modalign.server.settings import ServeLimits

__all__ = ["ServerState", "build_router"]


@dataclass
class ServerState:
    """What every route shares: the engine, its batcher, the limits and a decode pool."""

    engine: SearchEngine
    limits: ServeLimits
    batcher: MicroBatcher
    decode_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="modalign-decode")
    )
    started: float = field(default_factory=time.time)
    rows: dict[tuple[str, str], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m, ix in self.engine.index.indexes.items():
            self.rows.update({(m, fid.split(":", 1)[1]): row for row, fid in enumerate(ix.ids)})


async def answer(state: ServerState, q: ParsedQuery) -> list[Hit]:
    """Decode (bounded in time, off the event loop), then encode + search in the batcher."""
    if q.vector is not None:
        return await state.batcher.run(Job(q.k, q.targets, vector=q.vector))
    try:
        if state.engine.is_inline(q.modality):  # a string: nothing slow to bound, no thread hop
            prepared = state.engine.decode(q.modality, q.value)
        else:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(
                state.decode_pool, state.engine.decode, q.modality, q.value
            )
            prepared = await asyncio.wait_for(pending, state.limits.decode_timeout_s)
    except TimeoutError:
        raise RequestError(
            422, q.field, f"decoding took longer than {state.limits.decode_timeout_s:g} s"
        ) from None
    except DecodeError as exc:
        raise RequestError(400, q.field, f"cannot be decoded as {q.modality}: {exc}") from None
    return await state.batcher.run(Job(q.k, q.targets, modality=q.modality, prepared=prepared))


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"is not valid JSON ({exc})") from None


async def _multipart(request: Request) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    try:
        form = await request.form(max_files=4, max_fields=16)
    except Exception as exc:
        raise RequestError(400, "body", f"is not valid multipart form data ({exc})") from None
    files: dict[str, bytes] = {}
    fields: dict[str, list[str]] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name in files:
                raise RequestError(400, name, "give one file per field")
            files[name] = await value.read()
        else:
            fields.setdefault(name, []).append(value)
    return files, fields


def build_router(state: ServerState) -> APIRouter:
    """All routes, closed over ``state``."""
    router = APIRouter()
    engine, limits = state.engine, state.limits

    @router.post("/search")
    async def search(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            files, fields = await _multipart(request)
            q = parse_multipart_fields(files, fields, engine, limits)
        elif ctype.startswith("application/json") or not ctype:
            q = parse_json(await _json_body(request), engine, limits)
        else:
            raise RequestError(
                415, "content-type", f"{ctype!r}: send application/json or multipart/form-data"
            )
        hits = await answer(state, q)
        return JSONResponse(
            {"query": q.describe(), "results": [engine.hit_record(h) for h in hits]}
        )

    @router.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        q = parse_knn(await _json_body(request), engine, limits)
        hits = await answer(state, q)
        base = str(request.base_url).rstrip("/")
        return JSONResponse([_knn_record(state, h, base) for h in hits])

    @router.get("/indices-list")
    async def indices_list() -> list[str]:
        return [engine.index.root.name]

    @router.get("/media/{key:path}")
    async def media(key: str) -> Response:
        found = engine.media(key)
        if found is None:
            raise RequestError(404, "key", f"{key!r} is not a media item of this index")
        return FileResponse(found.path, media_type=found.media_type)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/info")
    async def info() -> dict[str, Any]:
        out = engine.info()
        out["limits"] = limits.__dict__
        out["batching"] = state.batcher.stats.to_dict()
        out["uptime_s"] = round(time.time() - state.started, 1)
        return out

    page_html = render_page()

    @router.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    return router


def render_page() -> str:
    """The web page as one document: its CSS and JS inlined, so that only ``/`` needs the
    token (``?access_token=``) and the page loads nothing from anywhere else."""
    static = resources.files("modalign.server").joinpath("static")
    html = static.joinpath("index.html").read_text("utf-8")
    css = static.joinpath("style.css").read_text("utf-8")
    js = static.joinpath("app.js").read_text("utf-8").replace("</", "<\\/")
    html = html.replace(
        '<link rel="stylesheet" href="static/style.css">', f"<style>\n{css}</style>"
    )
    return html.replace('<script src="static/app.js"></script>', f"<script>\n{js}</script>")


def _knn_record(state: ServerState, hit: Hit, base: str) -> dict[str, Any]:
    """One clip-retrieval result: ``id`` (row in its modality's index), ``similarity``,
    ``caption``, ``url`` (of the media), plus modalign's ``item_id``/``modality``/``label``."""
    rec = state.engine.hit_record(hit, base)
    out: dict[str, Any] = {
        "id": state.rows[(hit.modality, hit.id)],
        "similarity": hit.score,
        "caption": rec["caption"],
        "item_id": hit.id,
        "modality": hit.modality,
    }
    if rec["media_url"]:
        out["url"] = rec["media_url"]
    if hit.label is not None:
        out["label"] = hit.label
    if state.engine.is_inline_target(hit.modality):
        out["text"] = hit.value
    return out
