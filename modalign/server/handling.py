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

from modalign.retrieval.index.corpus import Hit
from modalign.server.batching import Job, MicroBatcher
from modalign.server.errors import RequestError
from modalign.server.queries import ParsedQuery
from modalign.server.searcher import DecodeError, Searcher
from modalign.server.settings import ServeLimits

__all__ = ["ServerState", "answer", "json_body", "multipart"]


@dataclass
class ServerState:
    """What every route shares: the searcher, its batcher, the limits and a decode pool."""

    searcher: Searcher
    limits: ServeLimits
    batcher: MicroBatcher
    decode_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="modalign-decode")
    )
    started: float = field(default_factory=time.time)
    # clip-retrieval ids: one number per *item* (not per modality row), so an id returned by a
    # search over any modality names the same item in /metadata (clip-front sends no modality)
    item_ids: list[str] = field(default_factory=list)  # number -> item id
    numbers: dict[str, int] = field(default_factory=dict)  # item id -> number
    has: dict[str, set[str]] = field(default_factory=dict)  # modality -> its item ids
    decoding: int = 0  # bytes reserved by the decodes running now (see DecodeBudget)

    def __post_init__(self) -> None:
        for m, ix in self.searcher.index.indexes.items():  # index order, then row order
            self.has[m] = set()
            for fid in ix.ids:
                item = fid.split(":", 1)[1]
                self.has[m].add(item)
                if item not in self.numbers:
                    self.numbers[item] = len(self.item_ids)
                    self.item_ids.append(item)


def reserve_decode(state: ServerState, q: ParsedQuery) -> int:
    """Bytes the upload's decode will hold (from its header), reserved against the server's
    total; 413 when one upload alone is over ``max_decode_bytes``, 429 while the decodes
    already running leave too little of ``max_decode_total_bytes``. Nothing is decoded yet."""
    limits = state.limits
    if not isinstance(q.value, bytes) or q.modality is None:
        return 0
    try:
        cost = state.searcher.decode_cost(q.modality, q.value)
    except DecodeError as exc:
        raise RequestError(400, q.field, f"cannot be decoded as {q.modality}: {exc}") from None
    mib = 1048576
    if cost > limits.max_decode_bytes:
        raise RequestError(
            413,
            q.field,
            f"decoding it would take about {cost / mib:.0f} MiB; this server decodes at most "
            f"{limits.max_decode_bytes / mib:.0f} MiB per upload (serve --max-decode-mb)",
        )
    if state.decoding + cost > limits.max_decode_total_bytes:
        raise RequestError(
            429,
            q.field,
            f"the server is decoding other uploads ({state.decoding / mib:.0f} of "
            f"{limits.max_decode_total_bytes / mib:.0f} MiB in use, this one needs "
            f"{cost / mib:.0f} MiB); retry in a moment",
        )
    state.decoding += cost
    return cost


async def answer(state: ServerState, q: ParsedQuery) -> list[Hit]:
    """Decode (bounded in time and memory, off the event loop), then encode + search in the
    batcher."""
    if q.vector is not None:
        return await state.batcher.run(Job(q.k, q.targets, vector=q.vector))
    if q.modality is None or q.value is None:  # the parsers give a vector or both of these
        raise RequestError(400, q.field, "the query has neither a vector nor a value")
    try:
        if state.searcher.is_inline(q.modality):  # a string: nothing slow to bound, no thread hop
            prepared = state.searcher.decode(q.modality, q.value)
        else:
            cost = reserve_decode(state, q)
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(
                state.decode_pool, state.searcher.decode, q.modality, q.value
            )

            def release(_: Any) -> None:  # when the decode ends, also after a timeout
                state.decoding -= cost

            pending.add_done_callback(release)
            prepared = await asyncio.wait_for(pending, state.limits.decode_timeout_s)
    except TimeoutError:
        raise RequestError(
            422, q.field, f"decoding took longer than {state.limits.decode_timeout_s:g} s"
        ) from None
    except DecodeError as exc:
        raise RequestError(400, q.field, f"cannot be decoded as {q.modality}: {exc}") from None
    return await state.batcher.run(Job(q.k, q.targets, modality=q.modality, prepared=prepared))


MAX_JSON_DEPTH = 32  # no request shape nests deeper than 3; clip-front's is 2


async def json_body(request: Request) -> Any:
    """The request body as JSON, or 400 naming the field: invalid JSON, nesting deeper than
    :data:`MAX_JSON_DEPTH`, integers too long to be any value, strings that are not Unicode
    text (a lone surrogate such as ``"\\ud800"`` cannot be encoded in any answer)."""
    raw = await request.body()
    try:
        body = json.loads(raw, parse_int=_bounded_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"is not valid JSON ({exc})") from None
    except RecursionError:  # the C parser gives up near the interpreter's recursion limit
        raise RequestError(
            400, "body", f"nests too deeply; at most {MAX_JSON_DEPTH} levels"
        ) from None
    except ValueError as exc:
        raise RequestError(400, "body", f"holds a value this server cannot read ({exc})") from None
    check_text(body)
    return body


class HugeNumber:
    """A JSON integer too long to be any valid value (kept as its digit count, never parsed:
    ``int()`` of thousands of digits is slow and refused above 4,300)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit number>"


def _bounded_int(text: str) -> int | HugeNumber:
    return int(text) if len(text) <= 40 else HugeNumber(len(text.lstrip("-")))


def check_text(body: Any) -> None:
    """400 naming the field when a key or string value is not encodable Unicode text, or the
    body nests deeper than :data:`MAX_JSON_DEPTH` (walked without recursion)."""
    stack: list[tuple[str, Any, int]] = [("body", body, 1)]
    while stack:
        where, node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH and isinstance(node, (dict, list)):
            raise RequestError(400, "body", f"nests deeper than {MAX_JSON_DEPTH} levels")
        items: list[tuple[Any, Any]] = []
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        elif isinstance(node, str):
            _encodable(node, where)
        for key, value in items:
            name = key if isinstance(key, str) else f"{where}[{key}]"
            if isinstance(key, str):
                _encodable(key, "body")
            stack.append((name if where == "body" else f"{where}.{name}", value, depth + 1))


def _encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            400,
            where,
            f"holds {exc.object[exc.start : exc.end]!a}, which is not Unicode text "
            "(a lone surrogate); send UTF-8 text",
        ) from None


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
