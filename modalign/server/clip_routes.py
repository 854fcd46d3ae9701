"""clip-retrieval's back-end protocol, so clip-front (or ClipClient) can point at this server:
``POST /knn-service``, ``POST /metadata``, ``GET /indices-list``.

A result's ``id`` numbers its *item* (one number per item of the corpus, whatever modality was
searched), so ``/metadata`` with only ``{ids, indice_name}`` (what clip-front sends) returns the
record of that same item: its image (``url``) and its caption, as clip-back's metadata does. The query runs through the same decode + micro-batching path as
``/search``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from modalign.retrieval.index.corpus import Hit
from modalign.server.errors import RequestError
from modalign.server.handling import ServerState, answer, json_body
from modalign.server.queries import knn_default_target, parse_knn, parse_metadata

__all__ = ["add_clip_routes"]


def add_clip_routes(router: APIRouter, state: ServerState) -> None:
    """Register the clip-retrieval routes on ``router``."""
    searcher, limits = state.searcher, state.limits

    @router.post("/knn-service")
    async def knn_service(request: Request) -> JSONResponse:
        q = parse_knn(await json_body(request), searcher, limits)
        hits = await answer(state, q)
        base = str(request.base_url).rstrip("/")
        full = [knn_record(state, h, base) for h in hits[: q.shown]]
        rest = [{"id": state.numbers[h.id], "similarity": h.score} for h in hits[q.shown :]]
        return JSONResponse(full + rest)

    @router.post("/metadata")
    async def metadata(request: Request) -> JSONResponse:
        modality, ids = parse_metadata(await json_body(request), searcher, limits)
        items = state.item_ids
        bad = [i for i in ids if not 0 <= i < len(items)]
        if bad:
            raise RequestError(400, "ids", f"{bad[0]} is not an id this index returned")
        base = str(request.base_url).rstrip("/")
        out = []
        for i in ids:
            item = items[i]
            shown = modality or _shown_modality(state, item)
            if item not in state.has[shown]:
                raise RequestError(400, "ids", f"{i} (item {item!r}) has no {shown} vector")
            record = searcher.item(shown, item)
            if record is None:  # has[shown] holds it, so the index lists it: cannot happen
                raise RequestError(400, "ids", f"{i} (item {item!r}) has no {shown} record")
            hit = Hit(item, 0.0, shown, str(record["value"]), record.get("label"))
            meta = knn_record(state, hit, base)
            meta.pop("similarity")
            meta.pop("id")
            out.append({"id": i, "metadata": meta})
        return JSONResponse(out)

    @router.get("/indices-list")
    async def indices_list() -> list[str]:
        return [searcher.index.root.name]


def _shown_modality(state: ServerState, item: str) -> str:
    """The modality whose record ``/metadata`` shows for an item when the request names none:
    clip-back's default (image, else the index's first) if the item has it, else its first."""
    preferred = knn_default_target(state.searcher)
    if item in state.has[preferred]:
        return preferred
    return next(m for m in state.searcher.target_modalities if item in state.has[m])


def knn_record(state: ServerState, hit: Hit, base: str) -> dict[str, Any]:
    """One clip-retrieval result: ``id`` (the item's number, see module doc), ``similarity``,
    ``caption``, ``url`` (of the media), plus modalign's ``item_id``/``modality``/``label``."""
    rec = state.searcher.hit_record(hit, base)
    out: dict[str, Any] = {
        "id": state.numbers[hit.id],
        "similarity": hit.score,
        "caption": rec["caption"],
        "item_id": hit.id,
        "modality": hit.modality,
    }
    if rec["media_url"]:
        out["url"] = rec["media_url"]
    if hit.label is not None:
        out["label"] = hit.label
    if state.searcher.is_inline_target(hit.modality):
        out["text"] = hit.value
    return out
