"""clip-retrieval's back-end protocol, so clip-front (or ClipClient) can point at this server:
``POST /knn-service``, ``POST /metadata``, ``GET /indices-list``.

A result's ``id`` is its row in the searched modality's index (as in clip-back); ``/metadata``
maps rows back to records. The query runs through the same decode + micro-batching path as
``/search``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from modalign.retrieval.corpus_index import Hit
from modalign.server.errors import RequestError
from modalign.server.handling import ServerState, answer, json_body
from modalign.server.queries import parse_knn, parse_metadata

__all__ = ["add_clip_routes"]


def add_clip_routes(router: APIRouter, state: ServerState) -> None:
    """Register the clip-retrieval routes on ``router``."""
    engine, limits = state.engine, state.limits

    @router.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        q = parse_knn(await json_body(request), engine, limits)
        hits = await answer(state, q)
        base = str(request.base_url).rstrip("/")
        full = [knn_record(state, h, base) for h in hits[: q.shown]]
        rest = [
            {"id": state.rows[(h.modality, h.id)], "similarity": h.score} for h in hits[q.shown :]
        ]
        return JSONResponse(full + rest)

    @router.post("/metadata")
    async def metadata(request: Request) -> JSONResponse:
        modality, ids = parse_metadata(await json_body(request), engine, limits)
        rows = state.row_ids[modality]
        bad = [i for i in ids if not 0 <= i < len(rows)]
        if bad:
            raise RequestError(400, "ids", f"{bad[0]} is not a row of the {modality} index")
        base = str(request.base_url).rstrip("/")
        out = []
        for i in ids:
            record = engine.item(modality, rows[i])
            hit = Hit(rows[i], 0.0, modality, str(record["value"]), record.get("label"))
            meta = knn_record(state, hit, base)
            meta.pop("similarity")
            meta.pop("id")
            out.append({"id": i, "metadata": meta})
        return JSONResponse(out)

    @router.get("/indices-list")
    async def indices_list() -> list[str]:
        return [engine.index.root.name]


def knn_record(state: ServerState, hit: Hit, base: str) -> dict[str, Any]:
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
