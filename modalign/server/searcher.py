"""The searcher the server stands on: one model bundle + one corpus index, loaded once.

:class:`Searcher` prepares a query value with
:meth:`~modalign.pretrain.bundle.BundleModel.prepare` (the one code path ``BundleModel.encode``
uses, so a query gives the same vector here as in ``modalign search``),
encodes many decoded values of one modality in one forward pass, and searches many vectors at
once (:meth:`~modalign.retrieval.index.corpus.CorpusIndex.search_batch`). It knows which files
the index lists, and serves only those (:meth:`media`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch

from modalign.core.errors import UserInputError
from modalign.data.decode import BadItem
from modalign.data.media import SNIFF_BYTES
from modalign.data.modality import ModalitySpec
from modalign.pretrain import EmbeddingModel, load_model
from modalign.retrieval.index.corpus import CorpusIndex, Hit, Query

__all__ = ["DecodeError", "MediaFile", "Searcher"]

log = logging.getLogger(__name__)

SNIFFED_KEYS = 65536
"""Media keys whose sniffed type :meth:`Searcher.served_type` keeps (oldest dropped first)."""


class DecodeError(ValueError):
    """A query value cannot be decoded by its modality (names the reason)."""


@dataclass(frozen=True)
class MediaFile:
    """A file the index lists, with the content type its bytes show (one its modality
    declares, :attr:`~modalign.data.modality.ModalitySpec.sniff`; never from its name)."""

    path: Path
    media_type: str


class Searcher:
    """Batched encode + search over a model (a bundle, or its ONNX export) and a
    :class:`CorpusIndex`."""

    def __init__(self, model: EmbeddingModel, index: CorpusIndex) -> None:
        index.require_model(model.fingerprint)
        self.model, self.index = model, index
        self.specs: dict[str, ModalitySpec] = dict(model.modality_specs())
        self._media = {
            media_key(m, item_id): (m, item_id)
            for (m, item_id), r in index.items.items()
            if m in self.specs and not self.specs[m].inline
        }
        # media key -> (its file's stat signature, the type media() gave for that version)
        self._sniffed: dict[str, tuple[tuple[int, ...], str | None]] = {}

    @classmethod
    def open(
        cls,
        index_dir: str | Path,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        mmap: bool = False,
        runtime: str = "torch",
        threads: int = 0,
    ) -> Searcher:
        """Load the index and its model (the one the index records unless ``model_dir``);
        ``mmap`` maps the FAISS files read-only instead of reading them into memory.
        ``runtime="onnx"``: ``model_dir`` is an ONNX export of the index's model, run in ONNX
        Runtime (:func:`modalign.pretrain.load_model`) on ``threads`` intra-op threads (> 0;
        0: its default)."""
        index = CorpusIndex.open(index_dir, mmap=mmap)
        model_path = model_dir or index.meta.get("model")
        if not model_path:
            raise UserInputError(f"{index_dir} does not record its model; pass --model DIR")
        if runtime == "onnx" and not model_dir:
            raise UserInputError(
                f"--runtime onnx: pass --model EXPORT_DIR (written by `modalign export --model "
                f"{model_path} --format onnx --out EXPORT_DIR`)"
            )
        return cls(load_model(model_path, device=device, runtime=runtime, threads=threads), index)

    # -- what can be asked -----------------------------------------------------------------
    @property
    def query_modalities(self) -> list[str]:
        """Modalities a query may be given in (the model's, in its order)."""
        return [m for m in self.model.modalities if m in self.specs]

    @property
    def target_modalities(self) -> list[str]:
        """Modalities the index holds vectors for."""
        return self.index.modalities

    def is_inline(self, modality: str) -> bool:
        """True when the modality's value is inline (text), False when it is a file."""
        return bool(self.specs[modality].inline)

    def default_targets(self, modality: str | None) -> tuple[str, ...]:
        """Every indexed modality but the query's own (all of them if that leaves none)."""
        others = [m for m in self.index.modalities if m != modality]
        return tuple(others or self.index.modalities)

    # -- decode / encode / search ----------------------------------------------------------
    def decode(self, modality: str, value: bytes | str) -> Any:
        """One query value -> model input, by ``BundleModel.prepare`` (as ``encode`` does).

        A file modality's value given as a path (a query by indexed id) is read only if it is
        under the folders the index recorded for that modality at build time."""
        if isinstance(value, str) and not self.specs[modality].inline:
            allowed = self.index.allowed_file(modality, value)
            if allowed is None:
                raise DecodeError(
                    f"{value}: not a file under the corpus folders this index was built from"
                )
            value = str(allowed)
        try:
            return self.model.prepare(modality, value)
        except BadItem as exc:
            raise DecodeError(str(exc)) from None
        except (OSError, ValueError, RuntimeError, TypeError) as exc:
            raise DecodeError(f"{type(exc).__name__}: {exc}") from None

    def decode_cost(self, modality: str, data: bytes) -> int:
        """Peak bytes decoding an uploaded ``data`` takes, from its header (the modality's
        ``decode_bytes``; a modality without one: the upload's own size). DecodeError when the
        header cannot be read."""
        estimate = self.specs[modality].decode_bytes
        if estimate is None:
            return len(data)
        try:
            return int(estimate(data))
        except ValueError as exc:
            raise DecodeError(str(exc)) from None

    def encode(self, modality: str, prepared: Sequence[Any]) -> np.ndarray:
        """L2-normalised ``(n, dim)`` float32 vectors of decoded values, one forward pass."""
        batch = self.specs[modality].collate(list(prepared))
        with torch.inference_mode():
            out = self.model.encode_batch({modality: batch})[modality]
        return out.numpy().astype(np.float32, copy=False)

    def warm_up(self) -> None:
        """One forward pass per query modality on its placeholder (lazy init, allocator), so
        the first real query is not the slow one. Failures are only logged."""
        for m in self.query_modalities:
            try:
                self.encode(m, [self.specs[m].placeholder])
            except Exception as exc:
                log.warning(
                    "warm-up of %s failed (%s); the first %s query will be slower", m, exc, m
                )

    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        """Hits for many queries (each its own k and targets), as one at a time would give."""
        return self.index.search_batch(queries)

    # -- items and media -------------------------------------------------------------------
    def item(self, modality: str, item_id: str) -> dict[str, Any] | None:
        """The indexed item's record (``value`` is a listed path or the inline text)."""
        return self.index.item(modality, item_id)

    def media(self, key: str) -> MediaFile | None:
        """The listed file for a media key (``modality:id``), or None: never a request path, and
        never a file outside the corpus folders recorded at build time (a symlink swapped in)."""
        listed = self._media.get(key)
        if listed is None:
            return None
        path = self.index.media_path(*listed)
        if path is None:
            return None
        media_type = self._sniff(listed[0], path)
        return MediaFile(path, media_type) if media_type is not None else None

    def _sniff(self, modality: str, path: Path) -> str | None:
        """The media type ``path``'s first bytes show, if its modality declares it; else None
        (a modality without a sniffer declares none, so its files are not served)."""
        sniff = self.specs[modality].sniff
        if sniff is None:
            return None
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError:
            return None
        return sniff(head)

    def hit_record(self, hit: Hit, base_url: str = "") -> dict[str, Any]:
        """``search --json``'s record plus ``caption``, ``media_url`` and ``media_type``."""
        out = hit.to_dict()
        key = media_key(hit.modality, hit.id)
        listed = key in self._media
        out["caption"] = self._caption(hit)
        media_type = self.served_type(key) if listed else None  # what /media would serve
        out["media_url"] = f"{base_url}/media/{quote(key, safe='')}" if media_type else None
        out["media_type"] = media_type
        return out

    def served_type(self, key: str) -> str | None:
        """The media type :meth:`media` serves a listed key's file as (None: not served).

        Sniffed once per version of the file: the result is kept with the file's stat
        signature (device, inode, size, mtime, ctime; the path's symlinks followed) and used
        while a ``stat`` gives the same, so a search answer does not open and read each hit's
        file. A file replaced, rewritten or re-linked after that is sniffed again.
        ``/media`` itself always checks and sniffs live (:meth:`media`)."""
        listed = self._media.get(key)
        record = self.index.items.get(listed) if listed is not None else None
        if record is None:
            return None
        try:
            st = os.stat(str(record["value"]))
        except (OSError, ValueError):
            self._sniffed.pop(key, None)
            return None
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        kept = self._sniffed.get(key)
        if kept is not None and kept[0] == signature:
            return kept[1]
        found = self.media(key)
        media_type = found.media_type if found is not None else None
        if key not in self._sniffed and len(self._sniffed) >= SNIFFED_KEYS:
            del self._sniffed[next(iter(self._sniffed))]
        self._sniffed[key] = (signature, media_type)
        return media_type

    def _caption(self, hit: Hit) -> str | None:
        """The item's own text if inline, else the first inline value indexed under its id."""
        if self.is_inline_target(hit.modality):
            return hit.value
        for m in self.index.modalities:
            if self.is_inline_target(m):
                record = self.index.item(m, hit.id)
                if record is not None:
                    return str(record["value"])
        return hit.label

    def is_inline_target(self, modality: str) -> bool:
        """Inline per the model's spec; an indexed modality the model lacks counts as a file."""
        spec = self.specs.get(modality)
        return bool(spec is not None and spec.inline)

    def info(self) -> dict[str, Any]:
        """Model and index statistics for ``GET /info``."""
        build = self.index.meta.get("build", {})
        return {
            "model": {
                "path": str(self.model.path),
                "fingerprint": self.model.fingerprint,
                "embed_dim": self.model.embed_dim,
                "modalities": list(self.model.modalities),
            },
            "index": {
                "name": self.index.root.name,
                "fingerprint": self.index.meta.get("fingerprint"),
                "dim": self.index.meta.get("dim"),
                "modalities": {
                    m: {
                        "items": len(ix),
                        "factory": ix.factory,
                        "search_params": build.get(m, {}).get("search_params", {}),
                    }
                    for m, ix in self.index.indexes.items()
                },
            },
            "query_modalities": {
                m: {
                    "inline": self.is_inline(m),
                    "suffixes": list(self.specs[m].file_suffixes()),
                    "default_targets": list(self.default_targets(m)),
                }
                for m in self.query_modalities
            },
        }


def media_key(modality: str, item_id: str) -> str:
    """The key ``/media/{key}`` takes: ``modality:id`` (ids repeat across modalities)."""
    return f"{modality}:{item_id}"
