"""The HTTP routes: /search, /knn-service, /metadata, /indices-list, /media/{key}, /healthz,
/info and the page at /."""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from modalign.server.clip_routes import add_clip_routes
from modalign.server.errors import RequestError
from modalign.server.handling import ServerState, answer, json_body, multipart
from modalign.server.queries import parse_json, parse_multipart_fields

__all__ = ["ServerState", "build_router", "render_page"]


# A media file is shown as what its bytes are, never as a page: no type guessing by the
# browser, and nothing in it may run or load anything (sandboxed, no sources at all).
MEDIA_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


def build_router(state: ServerState) -> APIRouter:
    """All routes, closed over ``state``."""
    router = APIRouter()
    searcher, limits = state.searcher, state.limits

    @router.post("/search")
    async def search(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            files, fields = await multipart(request)
            q = parse_multipart_fields(files, fields, searcher, limits)
        elif ctype.startswith("application/json") or not ctype:
            q = parse_json(await json_body(request), searcher, limits)
        else:
            raise RequestError(
                415, "content-type", f"{ctype!r}: send application/json or multipart/form-data"
            )
        hits = await answer(state, q)
        return JSONResponse(
            {"query": q.describe(), "results": [searcher.hit_record(h) for h in hits]}
        )

    @router.get("/media/{key:path}")
    async def media(key: str) -> Response:
        found = searcher.media(key)
        if found is None:
            raise RequestError(
                404,
                "key",
                f"{key!r} is not a media item of this index (or its bytes are not a media type "
                "its modality declares)",
            )
        return FileResponse(found.path, media_type=found.media_type, headers=MEDIA_HEADERS)

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/info")
    async def info() -> dict[str, Any]:
        out = searcher.info()
        out["limits"] = limits.__dict__
        out["batching"] = state.batcher.stats.to_dict()
        out["uptime_s"] = round(time.time() - state.started, 1)
        return out

    add_clip_routes(router, state)
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
