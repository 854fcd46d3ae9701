"""A searchable corpus: one FAISS index per modality + item map + model fingerprint.

Directory layout::

    DIR/index.json      {"format": "modalign.corpus-index", "fingerprint", "model", "modalities", "dim"}
    DIR/items.jsonl     {"id", "modality", "value" (path or text), "label"} per indexed vector
    DIR/<modality>/     a saved :class:`~modalign.retrieval.index.VectorIndex`

The whole directory is written next to the target and swapped in
(:func:`modalign.core.artifact.atomic_dir`) under :func:`~modalign.core.artifact.lock_dir`, so a
half-written index never replaces a good one and two writers never interleave. ``modalities``
in ``index.json`` name folders: each must be a plain folder name inside ``DIR`` (a hand-edited
``../../x`` or ``/etc`` is refused before anything is read).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.artifact import LOCK_FILE, atomic_dir, lock_dir, read_json_meta
from modalign.core.errors import UserInputError
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index import VectorIndex

__all__ = ["CorpusIndex", "Hit", "Query", "build_corpus_index"]

FORMAT = "modalign.corpus-index"
META_FILE = "index.json"
ITEMS_FILE = "items.jsonl"


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
    factory: str = "auto",
    device: str = "cpu",
    memory_budget_bytes: int | None = None,
    target_recall: float = 0.95,
) -> dict[str, Any]:
    """Index every modality in ``emb`` and save atomically; returns build stats per modality.

    The output directory is locked for the whole build (a second writer fails at once).
    """
    if not emb:
        raise UserInputError("nothing to index: no embeddings were given")
    out = Path(out_dir)
    _check_replaceable(out)
    with lock_dir(out, "index directory"):
        indexes, items = {}, {}
        for m, e in sorted(emb.items()):
            _check_folder_name(m, out / META_FILE, "modalities")
            indexes[m] = VectorIndex.build(
                e.vectors,
                [f"{m}:{i}" for i in e.ids],
                factory=factory,
                device=device,
                fingerprint=fingerprint,
                memory_budget_bytes=memory_budget_bytes,
                target_recall=target_recall,
            )
            items.update(_item_records(e))
        dim = next(iter(emb.values())).vectors.shape[1]
        meta = {
            "format": FORMAT,
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


def _check_folder_name(name: Any, meta_file: Path, key: str) -> str:
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


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not a corpus index."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out} exists and is not a directory; choose another --out")
    stray = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
    if stray and not (out / META_FILE).is_file():
        raise UserInputError(
            f"{out} is a non-empty directory without {META_FILE}; refusing to overwrite "
            "something that is not an index: choose an empty or new directory"
        )


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
        meta = read_json_meta(meta_file, "modalign index", "build one with `modalign index build`")
        modalities = meta.get("modalities")
        if not isinstance(modalities, list) or not modalities:
            raise UserInputError(
                f"{meta_file}: key 'modalities' must be a non-empty list of folder names; "
                "rebuild the index with `modalign index build`"
            )
        for m in modalities:
            _check_folder_name(m, meta_file, "modalities")
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
                _check_folder_name(m, self.root / META_FILE, "modalities")
                self.indexes[m] = VectorIndex.build(
                    e.vectors, [f"{m}:{i}" for i in e.ids], fingerprint=fingerprint
                )
                self.meta["modalities"] = sorted(self.indexes)
            else:
                self.indexes[m].add(e.vectors, [f"{m}:{i}" for i in e.ids])
            self.items.update(_item_records(e))
            added[m] = len(e)
        return added

    def save(self, directory: str | Path) -> None:
        """Write every modality's index, the item map and metadata; swapped in atomically."""
        out = Path(directory)
        _check_replaceable(out)
        self.meta["build"] = {
            m: {"items": len(ix), "factory": ix.factory, **ix.stats.__dict__}
            for m, ix in sorted(self.indexes.items())
        }
        with lock_dir(out, "index directory"), atomic_dir(out) as tmp:
            for m, ix in self.indexes.items():
                ix.save(tmp / m)
            (tmp / ITEMS_FILE).write_text(
                "".join(json.dumps(r) + "\n" for r in self.items.values()), encoding="utf-8"
            )
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
