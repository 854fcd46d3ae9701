"""A searchable corpus: one FAISS index per modality + item map + model fingerprint.

Directory layout::

    DIR/index.json      {"format": "modalign.corpus-index", "format_version", "fingerprint",
                         "model", "modalities", "dim", "files", "media_roots"}
    DIR/items.jsonl     {"id", "modality", "value" (path or text), "label"} per indexed vector
    DIR/<modality>/     a saved :class:`~modalign.retrieval.index.VectorIndex`

``files`` holds the sha256 of ``items.jsonl`` and of every ``<modality>/index.json`` (which in
turn hashes that modality's FAISS file and id list), keyed by path: every file the index reads
is verified on open, and a modality folder copied over another one is refused (its
``index.json`` is not the one recorded under that modality's name). ``media_roots`` lists, per
modality, the folders that held its indexed files at build time: :meth:`CorpusIndex.media_path`
(what the server serves and decodes) answers only for files under them.

The whole directory is written next to the target and swapped in
(:func:`modalign.core.artifact.atomic_dir`) under :func:`~modalign.core.artifact.output_dir`, so a
half-written index never replaces a good one and two writers never interleave. ``modalities``
in ``index.json`` name folders: each must be a plain folder name inside ``DIR`` (a hand-edited
``../../x`` or ``/etc`` is refused before anything is read).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.artifact import (
    OutputKind,
    atomic_dir,
    output_dir,
    read_json_meta,
    sha256_file,
    verify_files,
)
from modalign.core.errors import UserInputError
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index import IndexBuildOptions, VectorIndex

__all__ = ["CorpusIndex", "Hit", "Query", "build_corpus_index"]

FORMAT = "modalign.corpus-index"
FORMAT_VERSION = 2  # 2: files (sha256 of items.jsonl and each <modality>/index.json), media_roots
META_FILE = "index.json"
ITEMS_FILE = "items.jsonl"
INDEX_KIND = OutputKind(FORMAT, "index", ((META_FILE, FORMAT),))
_REBUILD = "rebuild it with `modalign index build`"


@dataclass
class Hit:
    """One search result: an indexed item and its similarity to the query."""

    id: str
    score: float
    modality: str
    value: str
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        """``{"id", "score", "modality", "text"|"path", "label"?}`` as ``search --json`` prints."""
        key = "text" if self.modality == "text" else "path"
        out = {"id": self.id, "score": self.score, "modality": self.modality, key: self.value}
        if self.label is not None:
            out["label"] = self.label
        return out


@dataclass(frozen=True)
class Query:
    """One query of a batch: its vector, how many hits, and which modalities to search."""

    vector: np.ndarray
    k: int = 10
    targets: tuple[str, ...] | None = None


def build_corpus_index(
    emb: Mapping[str, Embeddings],
    out_dir: str | Path,
    fingerprint: str,
    model_path: str = "",
    options: IndexBuildOptions | None = None,
) -> dict[str, Any]:
    """Index every modality in ``emb`` and save atomically; returns build stats per modality.

    ``options``: how each modality's index is built (default ``IndexBuildOptions()``).

    The output directory is locked for the whole build (a second writer fails at once).
    """
    if not emb:
        raise UserInputError("nothing to index: no embeddings were given")
    with output_dir(out_dir, INDEX_KIND, "--out") as out:
        indexes, items = {}, {}
        for m, e in sorted(emb.items()):
            check_folder_name(m, out / META_FILE, "modalities")
            ids = [f"{m}:{i}" for i in e.ids]
            indexes[m] = VectorIndex.build(e.vectors, ids, options, fingerprint=fingerprint)
            items.update(_item_records(e))
        dim = next(iter(emb.values())).vectors.shape[1]
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "model": model_path,
            "modalities": sorted(emb),
            "dim": dim,
        }
        index = CorpusIndex(out, meta, indexes, items)
        index.save(out)
    return index.meta["build"]


def _item_records(e: Embeddings) -> dict[tuple[str, str], dict]:
    return {
        (e.modality, i): {"id": i, "modality": e.modality, "value": v, "label": lab}
        for i, v, lab in zip(e.ids, e.values, e.labels)
    }


def check_folder_name(name: Any, meta_file: Path, key: str) -> str:
    """``name`` if it is a plain folder name inside ``meta_file``'s directory, else exit 2."""
    root = meta_file.parent
    plain = (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not Path(name).is_absolute()
    )
    if plain and (root / name).resolve().parent != root.resolve():
        plain = False  # a symlink leading out of the index directory
    if not plain:
        raise UserInputError(
            f"{meta_file}: {key} entry {name!r} is not a plain folder name inside {root} "
            "(no '/', '..' or absolute paths); the file was edited or is not a modalign index: "
            "rebuild it with `modalign index build`"
        )
    return name


class MediaRoots:
    """The folders holding a modality's indexed files: each file's resolved parent, minus those
    inside another one."""

    def __init__(self) -> None:
        self._dirs: dict[str, set[Path]] = {}

    def add(self, modality: str, value: str) -> None:
        """Note ``value``'s folder if it names an existing file (inline text names none)."""
        try:
            path = Path(value).resolve()
            if path.is_file():
                self._dirs.setdefault(modality, set()).add(path.parent)
        except (OSError, ValueError):
            return

    def to_dict(self) -> dict[str, list[str]]:
        """``{modality: [folder, ...]}`` with no folder inside another, sorted."""
        out: dict[str, list[str]] = {}
        for m, dirs in sorted(self._dirs.items()):
            kept: list[Path] = []
            for d in sorted(dirs, key=lambda p: (len(p.parts), str(p))):
                if not any(d.is_relative_to(k) for k in kept):
                    kept.append(d)
            out[m] = sorted(str(k) for k in kept)
        return out


def seal_files(directory: Path, modalities: Iterable[str]) -> dict[str, str]:
    """``{path: sha256}`` of ``items.jsonl`` and each modality's ``index.json`` in ``directory``."""
    names = [ITEMS_FILE, *(f"{m}/{META_FILE}" for m in sorted(modalities))]
    return {n: sha256_file(directory / n) for n in names}


class CorpusIndex:
    """Load with :meth:`open`; :meth:`search` / :meth:`search_batch` take query vectors."""

    def __init__(
        self,
        root: Path,
        meta: dict[str, Any],
        indexes: dict[str, VectorIndex],
        items: dict[tuple[str, str], dict],
    ) -> None:
        self.root, self.meta, self.indexes, self.items = root, meta, indexes, items

    @classmethod
    def open(
        cls, directory: str | Path, expected_fingerprint: str | None = None, mmap: bool = False
    ) -> CorpusIndex:
        """Load an index directory; every modality folder name is checked before it is read.

        ``mmap=True`` maps each FAISS index read-only instead of reading it into RAM."""
        root = Path(directory)
        meta_file = root / META_FILE
        meta = read_json_meta(
            meta_file, "modalign index", "build one with `modalign index build`", format=FORMAT
        )
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserInputError(
                f"{meta_file}: index format version {meta.get('format_version')!r}; this modalign "
                f"reads version {FORMAT_VERSION} (every file hashed, media roots recorded): "
                f"{_REBUILD}"
            )
        modalities = meta.get("modalities")
        if not isinstance(modalities, list) or not modalities:
            raise UserInputError(
                f"{meta_file}: key 'modalities' must be a non-empty list of folder names; "
                "rebuild the index with `modalign index build`"
            )
        for m in modalities:
            check_folder_name(m, meta_file, "modalities")
        _verify(root, meta, modalities)
        indexes = {
            m: VectorIndex.load(root / m, expected_fingerprint=meta.get("fingerprint"), mmap=mmap)
            for m in modalities
        }
        index = cls(root, meta, indexes, _read_items(root / ITEMS_FILE))
        if expected_fingerprint is not None:
            index.require_model(expected_fingerprint)
        return index

    def require_model(self, fingerprint: str) -> None:
        """Refuse queries embedded by a model other than the one that built the index."""
        if self.meta.get("fingerprint") != fingerprint:
            raise UserInputError(
                f"{self.root}: built with model {self.meta.get('fingerprint')}, but the query "
                f"model is {fingerprint}; rebuild the index with this model"
            )

    @property
    def modalities(self) -> list[str]:
        """Indexed modalities, sorted."""
        return list(self.meta["modalities"])

    def item(self, modality: str, item_id: str) -> dict[str, Any] | None:
        """The item record (``id``, ``modality``, ``value``, ``label``) or None."""
        return self.items.get((modality, item_id))

    def media_path(self, modality: str, item_id: str) -> Path | None:
        """The indexed item's file, resolved, if it lies under a folder this modality's files were
        in at build time (``media_roots``) and exists; else None (never another path)."""
        record = self.items.get((modality, item_id))
        if record is None:
            return None
        return self.allowed_file(modality, str(record["value"]))

    def allowed_file(self, modality: str, value: str) -> Path | None:
        """``value`` resolved if it is an existing file under ``modality``'s media roots."""
        try:
            path = Path(value).resolve()
        except (OSError, ValueError):
            return None
        roots = [Path(r) for r in (self.meta.get("media_roots") or {}).get(modality, [])]
        if not any(path.is_relative_to(r) for r in roots) or not path.is_file():
            return None
        return path

    def check_growable(self) -> None:
        """UserInputError when an indexed modality cannot grow in place (a sharded build), so
        ``index add`` refuses before it embeds anything."""
        for ix in self.indexes.values():
            ix.check_growable()

    def add(self, emb: Mapping[str, Embeddings], fingerprint: str) -> dict[str, int]:
        """Append items without retraining (IVF/PQ keep their trained quantisers)."""
        if fingerprint != self.meta["fingerprint"]:
            raise UserInputError(
                f"{self.root}: built with model {self.meta['fingerprint']}, but these embeddings "
                f"come from {fingerprint}; embed them with the index's model or build a new index"
            )
        added = {}
        for m, e in emb.items():
            if m not in self.indexes:
                check_folder_name(m, self.root / META_FILE, "modalities")
                self.indexes[m] = VectorIndex.build(
                    e.vectors, [f"{m}:{i}" for i in e.ids], fingerprint=fingerprint
                )
                self.meta["modalities"] = sorted(self.indexes)
            else:
                self.indexes[m].add(e.vectors, [f"{m}:{i}" for i in e.ids])
            self.items.update(_item_records(e))
            added[m] = len(e)
        return added

    def save(self, directory: str | Path, key: str = "--out") -> None:
        """Write every modality's index, the item map and metadata; swapped in atomically.

        ``key`` names the flag that gave ``directory`` in errors (``--out``, ``--index``)."""
        self.meta["build"] = {
            m: {"items": len(ix), "factory": ix.factory, **ix.stats.__dict__}
            for m, ix in sorted(self.indexes.items())
        }
        roots = MediaRoots()
        for r in self.items.values():
            roots.add(r["modality"], r["value"])
        with output_dir(directory, INDEX_KIND, key) as out, atomic_dir(out) as tmp:
            for m, ix in self.indexes.items():
                ix.save(tmp / m)
            (tmp / ITEMS_FILE).write_text(
                "".join(json.dumps(r) + "\n" for r in self.items.values()), encoding="utf-8"
            )
            self.meta["format_version"] = FORMAT_VERSION
            self.meta["media_roots"] = roots.to_dict()
            self.meta["files"] = seal_files(tmp, self.indexes)
            (tmp / META_FILE).write_text(json.dumps(self.meta, indent=2), encoding="utf-8")
        self.root = out

    def search(
        self, vectors: np.ndarray, k: int = 10, targets: Sequence[str] | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query over the target modalities, merged by score."""
        rows = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        key = None if targets is None else tuple(targets)
        return self.search_batch([Query(row, k, key) for row in rows])

    def search_batch(self, queries: Sequence[Query]) -> list[list[Hit]]:
        """Hits for several queries at once, each with its own k and targets.

        Queries are grouped by (target, k); within a group FAISS is asked one query row at a
        time, because its multi-query kernels (BLAS, SIMD blocks) round differently from its
        one-query path: the results are bit for bit those of searching each query alone. (What
        batching saves in a server is the encoder's forward pass, not this.)
        """
        plans = [self._targets(q.targets) for q in queries]
        groups: dict[tuple[str, int], list[int]] = {}
        for qi, (q, targets) in enumerate(zip(queries, plans)):
            if q.k < 1:
                raise UserInputError(f"k must be >= 1, got {q.k}")
            for m in targets:
                groups.setdefault((m, q.k), []).append(qi)
        found: dict[tuple[int, str], list[Hit]] = {}
        for (m, k), members in groups.items():
            vectors = np.stack([np.asarray(queries[qi].vector, np.float32) for qi in members])
            for qi, hits in zip(members, self._search_one(m, vectors, k)):
                found[(qi, m)] = hits
        return [
            sorted((h for m in targets for h in found[(qi, m)]), key=lambda x: -x.score)[: q.k]
            for qi, (q, targets) in enumerate(zip(queries, plans))
        ]

    def _targets(self, targets: Sequence[str] | None) -> list[str]:
        chosen = list(targets or self.modalities)
        unknown = [t for t in chosen if t not in self.indexes]
        if unknown:
            raise UserInputError(f"the index has no {unknown} vectors; it has {self.modalities}")
        return chosen

    def _search_one(self, modality: str, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        out: list[list[Hit]] = []
        for row in vectors:
            res = self.indexes[modality].search(row[None, :], k)
            out.append([self._hit(modality, i, s) for s, i in zip(res.scores[0], res.ids[0])])
        return out

    def _hit(self, modality: str, full_id: str, score: float) -> Hit:
        item_id = full_id.split(":", 1)[1]
        r = self.items[(modality, item_id)]
        return Hit(item_id, float(score), modality, r["value"], r.get("label"))


def _verify(root: Path, meta: dict[str, Any], modalities: Sequence[str]) -> None:
    """Every file the index reads is listed in ``files`` with a matching sha256 (exit 2)."""
    files = meta.get("files")
    needed = [ITEMS_FILE, *(f"{m}/{META_FILE}" for m in modalities)]
    if not isinstance(files, dict) or any(n not in files for n in needed):
        missing = [n for n in needed if not isinstance(files, dict) or n not in files]
        raise UserInputError(
            f"{root / META_FILE}: records no checksum for {', '.join(missing)}; the file was "
            f"edited or the index is incomplete: {_REBUILD}"
        )
    if not isinstance(meta.get("media_roots"), dict):
        raise UserInputError(
            f"{root / META_FILE}: key 'media_roots' missing or corrupt; {_REBUILD}"
        )
    verify_files(root, {"files": {n: files[n] for n in needed}}, "index")


def _read_items(path: Path) -> dict[tuple[str, str], dict]:
    items: dict[tuple[str, str], dict] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):  # noqa: B007 (n names the line in the error)
                r = json.loads(line)
                items[(r["modality"], r["id"])] = r
    except FileNotFoundError:
        raise UserInputError(f"{path} is missing; rebuild the index") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserInputError(f"{path}: line {n} is corrupt ({exc}); rebuild the index") from None
    return items
