"""What the routes share: the server state, and the query path (decode -> batcher)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from modalign.retrieval.corpus_index import Hit
from modalign.server.batching import Job, MicroBatcher
from modalign.server.engine import DecodeError, SearchEngine
from modalign.server.errors import RequestError
from modalign.server.queries import ParsedQuery
from modalign.server.settings import ServeLimits

__all__ = ["ServerState", "answer", "json_body", "multipart"]


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
    rows: dict[tuple[str, str], int] = field(default_factory=dict)  # (modality, id) -> row
    row_ids: dict[str, list[str]] = field(default_factory=dict)  # modality -> id per row

    def __post_init__(self) -> None:
        for m, ix in self.engine.index.indexes.items():
            self.row_ids[m] = [fid.split(":", 1)[1] for fid in ix.ids]
            self.rows.update({(m, item): row for row, item in enumerate(self.row_ids[m])})


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


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"is not valid JSON ({exc})") from None


async def multipart(request: Request) -> tuple[dict[str, bytes], dict[str, list[str]]]:
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
