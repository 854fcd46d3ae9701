"""Turn request bodies into queries, checking every field against the limits.

Three ways to ask (``POST /search``): JSON with an inline modality's value
(``{"text": "...", "k": 10, "target": ["image"]}``), multipart with a file in the field named
after its modality (``image=@cat.png``), or JSON ``{"id": ..., "modality": ...}`` of an
indexed item. ``POST /knn-service`` takes clip-retrieval's request (:func:`parse_knn`). Every
problem is a :class:`RequestError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from modalign.server.errors import RequestError
from modalign.server.searcher import Searcher
from modalign.server.settings import ServeLimits

__all__ = ["ParsedQuery", "parse_json", "parse_knn", "parse_metadata", "parse_multipart_fields"]

COMMON_KEYS = frozenset({"k", "target"})
ID_KEYS = frozenset({"id", "modality"})
# clip-retrieval request keys this server accepts and ignores (no safety/aesthetic models)
KNN_IGNORED = frozenset(
    {
        "indice_name",
        "use_mclip",
        "deduplicate",
        "use_safety_model",
        "use_violence_detector",
        "aesthetic_score",
        "aesthetic_weight",
    }
)


@dataclass(frozen=True)
class ParsedQuery:
    """A checked query: a value of ``modality`` to decode, or a ready ``vector``."""

    field: str  # the request field the query came from (named in errors)
    k: int
    targets: tuple[str, ...]
    modality: str | None = None
    value: bytes | str | None = None
    vector: np.ndarray | None = None
    echo: tuple[tuple[str, str], ...] = ()  # what the answer's "query" shows (default: value)
    shown: int = 0  # knn-service: results with metadata (the rest: id + similarity); 0 = all

    def describe(self) -> dict[str, str]:
        """The ``query`` object of the answer: the inline value, or what was uploaded/asked."""
        if self.echo:
            return dict(self.echo)
        if isinstance(self.value, str):
            return {self.field: self.value}
        return {self.field: f"<{self.field} upload, {len(self.value or b'')} bytes>"}


_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)  # ASCII digits only ("²".isdigit() is True)


def _bad(field: str, message: str) -> RequestError:
    return RequestError(400, field, message)


def parse_k(
    raw: Any,
    limits: ServeLimits,
    field: str = "k",
    default: int = 10,
    most: int | None = None,
    flag: str = "--max-k",
) -> int:
    """An integer in 1..``most`` (default ``max_k``; a string of ASCII digits is accepted, as
    multipart sends it). Above the limit, the 400 names the serve ``flag`` that raises it."""
    most = limits.max_k if most is None else most
    if raw is None:
        return min(default, most)
    if isinstance(raw, str) and _INTEGER.fullmatch(raw.strip()):
        digits = raw.strip().lstrip("+-").lstrip("0")
        if len(digits) > 18:  # far beyond any limit; int() of 5,000 digits is refused anyway
            raise _bad(field, f"must be between 1 and {most}, got {len(digits)} digits")
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        shown = raw if not isinstance(raw, str) or len(raw) <= 40 else f"{raw[:40]}..."
        raise _bad(field, f"must be an integer, got {shown!a}")
    if raw.bit_length() > 63:
        raise _bad(field, f"must be between 1 and {most}, got a {raw.bit_length()}-bit number")
    if raw < 1:
        raise _bad(field, f"must be between 1 and {most}, got {raw}")
    if raw > most:
        raise _bad(
            field, f"must be at most {most} on this server, got {raw} (start it with {flag} {raw})"
        )
    return raw


def parse_targets(raw: Any, searcher: Searcher, modality: str | None) -> tuple[str, ...]:
    """Target modalities (a name or a list of names the index holds); default: the others."""
    if raw is None or raw == []:
        return searcher.default_targets(modality)
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _bad("target", f"must be a modality name or a list of them, got {raw!r}")
    unknown = [n for n in names if n not in searcher.target_modalities]
    if unknown:
        raise _bad(
            "target",
            f"the index has no {unknown[0]!r} vectors; it has {', '.join(searcher.target_modalities)}",
        )
    return tuple(dict.fromkeys(names))


def check_modality(searcher: Searcher, name: str) -> str:
    """``name`` if the model takes queries in it, else 400 naming the field."""
    if name not in searcher.query_modalities:
        raise _bad(
            name,
            f"this model has no {name!r} modality; it takes {', '.join(searcher.query_modalities)}",
        )
    return name


def check_inline(searcher: Searcher, name: str, value: Any, limits: ServeLimits) -> str:
    """An inline (text) query: a non-empty string no longer than ``max_query_chars``."""
    if not isinstance(value, str):
        raise _bad(name, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(name, "the query is empty")
    if len(value) > limits.max_query_chars:
        raise _bad(name, f"is {len(value)} characters; the limit is {limits.max_query_chars}")
    return value


def parse_json(body: Any, searcher: Searcher, limits: ServeLimits) -> ParsedQuery:
    """``{"text": ...}`` (any inline modality) or ``{"id": ..., "modality": ...}``."""
    if not isinstance(body, dict):
        raise _bad("body", 'must be a JSON object like {"text": "a dog", "k": 10}')
    inline = [m for m in searcher.query_modalities if searcher.is_inline(m)]
    allowed = COMMON_KEYS | ID_KEYS | set(inline)
    for key in body:
        if key in searcher.query_modalities and key not in inline:
            raise _bad(key, f"{key} is a file modality: upload it as multipart field {key!r}")
        if key not in allowed:
            raise _bad(key, f"unknown field; /search takes {', '.join(sorted(allowed))}")
    given = [m for m in inline if m in body] + (["id"] if "id" in body else [])
    if len(given) != 1:
        raise _bad("body", f"give exactly one query: one of {', '.join([*inline, 'id'])}")
    if given[0] == "id":
        return _by_id(body, searcher, limits)
    if "modality" in body:
        raise _bad("modality", "only goes with 'id' (the query's modality is its field name)")
    name = given[0]
    value = check_inline(searcher, name, body[name], limits)
    k = parse_k(body.get("k"), limits)
    return ParsedQuery(name, k, parse_targets(body.get("target"), searcher, name), name, value)


def _by_id(body: Mapping[str, Any], searcher: Searcher, limits: ServeLimits) -> ParsedQuery:
    item_id = body["id"]
    if not isinstance(item_id, str) or not item_id:
        raise _bad("id", f"must be a non-empty string, got {item_id!r}")
    modality = body.get("modality")
    if modality is None:
        found = [m for m in searcher.target_modalities if searcher.item(m, item_id) is not None]
        if len(found) > 1:
            raise _bad("modality", f"id {item_id!r} is indexed as {', '.join(found)}; pick one")
        modality = found[0] if found else None
    if modality is not None and not isinstance(modality, str):
        raise _bad("modality", f"must be a modality name, got {modality!r}")
    record = searcher.item(modality, item_id) if modality else None
    if record is None or not modality:
        raise RequestError(
            404, "id", f"no indexed item {item_id!r}" + (f" in {modality}" if modality else "")
        )
    check_modality(searcher, modality)
    k = parse_k(body.get("k"), limits)
    targets = parse_targets(body.get("target"), searcher, modality)
    return ParsedQuery(
        "id",
        k,
        targets,
        modality,
        str(record["value"]),
        echo=(("id", item_id), ("modality", modality)),
    )


def parse_multipart_fields(
    files: Mapping[str, bytes],
    fields: Mapping[str, list[str]],
    searcher: Searcher,
    limits: ServeLimits,
) -> ParsedQuery:
    """An upload in the field named after its modality, plus ``k`` and ``target`` fields."""
    for name in files:
        check_modality(searcher, name)
    for name in fields:
        if name not in COMMON_KEYS and name not in searcher.query_modalities:
            raise _bad(name, "unknown field; upload a file in the field named after its modality")
    inline = [m for m in fields if m in searcher.query_modalities]
    given = list(files) + inline
    if len(given) != 1:
        raise _bad(
            "body", f"give exactly one query field: one of {', '.join(searcher.query_modalities)}"
        )
    name = given[0]
    k = parse_k(fields["k"][0] if fields.get("k") else None, limits)
    targets = parse_targets(fields.get("target"), searcher, name)
    if name in files:
        if searcher.is_inline(name):
            value: bytes | str = check_inline(searcher, name, _utf8(files[name], name), limits)
        else:
            value = files[name]
            if not value:
                raise _bad(name, "the uploaded file is empty")
        return ParsedQuery(name, k, targets, name, value)
    return ParsedQuery(
        name, k, targets, name, check_inline(searcher, name, fields[name][0], limits)
    )


def _utf8(data: bytes, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(field, "is not UTF-8 text") from None


def parse_knn(body: Any, searcher: Searcher, limits: ServeLimits) -> ParsedQuery:
    """clip-retrieval's ``/knn-service`` request: text, base64 image (or any file modality),
    or ``embedding_input``; ``modality`` names the index to search, ``num_images`` the count
    with metadata, ``num_result_ids`` (optional, >= num_images) how many ids in all. Keys
    holding null count as absent (clip-front sends ``"image_url": null``)."""
    if not isinstance(body, dict):
        raise _bad("body", 'must be a JSON object like {"text": "a dog", "num_images": 10}')
    body = {k: v for k, v in body.items() if v is not None}
    asked = [m for m in searcher.query_modalities if m in body] + (
        ["embedding_input"] if "embedding_input" in body else []
    )
    if len(asked) > 1:  # clip-front sends text "" beside an image: an empty text is no query
        body = {k: v for k, v in body.items() if not (k in asked and v == "")}
    if "image_url" in body:
        raise _bad("image_url", "this server fetches no URLs; send the image base64 in 'image'")
    allowed = KNN_IGNORED | {"modality", "num_images", "num_result_ids", "embedding_input"}
    for key in body:
        if key not in allowed and key not in searcher.query_modalities:
            raise _bad(key, f"unknown field; /knn-service takes {', '.join(sorted(allowed))}")
    query_keys = [m for m in searcher.query_modalities if m in body]
    query_keys += ["embedding_input"] if "embedding_input" in body else []
    if len(query_keys) != 1:
        raise _bad("body", "give exactly one of text, image (base64) and embedding_input")
    targets = parse_targets(body.get("modality", knn_default_target(searcher)), searcher, None)
    shown = parse_k(body.get("num_images"), limits, field="num_images", default=40)
    k = parse_k(
        body.get("num_result_ids", shown),
        limits,
        field="num_result_ids",
        most=limits.max_result_ids,
        flag="--max-result-ids",
    )
    if k < shown:
        raise _bad("num_result_ids", f"must be >= num_images ({shown}), got {k}")
    key = query_keys[0]
    if key == "embedding_input":
        return ParsedQuery(key, k, targets, vector=_vector(body[key], searcher), shown=shown)
    if searcher.is_inline(key):
        value: bytes | str = check_inline(searcher, key, body[key], limits)
    else:
        value = _base64(body[key], key)
    return ParsedQuery(key, k, targets, key, value, shown=shown)


def knn_default_target(searcher: Searcher) -> str:
    """clip-retrieval's default index is ``image``; an index without images uses its first."""
    return "image" if "image" in searcher.target_modalities else searcher.target_modalities[0]


def parse_metadata(
    body: Any, searcher: Searcher, limits: ServeLimits
) -> tuple[str | None, list[int]]:
    """clip-retrieval's ``/metadata`` request: ``{"ids": [id, ...], "modality"?}`` (ids as
    ``/knn-service`` returned them; ``modality``: whose record to show, default the item's
    image, else its first)."""
    if not isinstance(body, dict):
        raise _bad("body", 'must be a JSON object like {"ids": [3, 14]}')
    modality = body.get("modality") or None
    if modality is not None and modality not in searcher.target_modalities:
        raise _bad("modality", f"the index has no {modality!r} vectors")
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise _bad("ids", f"must be a list of integer ids (index rows), got {ids!r}")
    if len(ids) > limits.max_k * 10:
        raise _bad("ids", f"at most {limits.max_k * 10} ids per request, got {len(ids)}")
    return modality, ids


def _vector(raw: Any, searcher: Searcher) -> np.ndarray:
    dim = int(searcher.index.meta["dim"])
    if not isinstance(raw, list) or len(raw) != dim:
        size = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise _bad("embedding_input", f"must be a list of {dim} numbers, got {size}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise _bad("embedding_input", "must hold numbers only")
    vec = np.asarray(raw, dtype=np.float32)
    if not all(math.isfinite(v) for v in vec.tolist()):
        raise _bad("embedding_input", "holds NaN or infinite values")
    return vec


def _base64(raw: Any, field: str) -> bytes:
    if not isinstance(raw, str):
        raise _bad(field, "must be a base64 string")
    if raw.startswith("data:") and "," in raw:
        raw = raw.split(",", 1)[1]  # a data: URL as browsers produce it
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(field, "is not valid base64") from None
    if not data:
        raise _bad(field, "is empty")
    return data
