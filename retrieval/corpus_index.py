"""A searchable corpus: one FAISS index per modality + item map + model fingerprint.

Directory layout::

    DIR/index.json      {"format": "modalign.corpus-index", "fingerprint", "model", "modalities", "dim"}
    DIR/items.jsonl     {"id", "modality", "value" (path or text), "label"} per indexed vector
    DIR/<modality>/     a saved :class:`~modalign.retrieval.index.VectorIndex`

The whole directory is written next to the target and swapped in, so a half-written index
never replaces a good one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalign.core.artifact import atomic_dir, read_json_meta
from modalign.core.errors import UserInputError
from modalign.retrieval.embed import Embeddings
from modalign.retrieval.index import VectorIndex

FORMAT = "modalign.corpus-index"


@dataclass
class Hit:
    id: str
    score: float
    modality: str
    value: str
    label: str | None

    def to_dict(self) -> dict[str, Any]:
        key = "text" if self.modality == "text" else "path"
        out = {"id": self.id, "score": self.score, "modality": self.modality, key: self.value}
        if self.label is not None:
            out["label"] = self.label
        return out


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
    """Index every modality in ``emb`` and save atomically; returns build stats per modality."""
    indexes, items = {}, {}
    for m, e in sorted(emb.items()):
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
    index = CorpusIndex(Path(out_dir), meta, indexes, items)
    index.save(out_dir)
    return index.meta["build"]


def _item_records(e: Embeddings) -> dict[tuple[str, str], dict]:
    return {
        (e.modality, i): {"id": i, "modality": e.modality, "value": v, "label": lab}
        for i, v, lab in zip(e.ids, e.values, e.labels)
    }


class CorpusIndex:
    """Load with :meth:`open`; :meth:`search` takes query vectors of one modality."""

    def __init__(
        self,
        root: Path,
        meta: dict[str, Any],
        indexes: dict[str, VectorIndex],
        items: dict[tuple[str, str], dict],
    ) -> None:
        self.root, self.meta, self.indexes, self.items = root, meta, indexes, items

    @classmethod
    def open(cls, directory: str | Path, expected_fingerprint: str | None = None) -> CorpusIndex:
        root = Path(directory)
        meta = read_json_meta(
            root / "index.json", "modalign index", "build one with `modalign index build`"
        )
        indexes = {
            m: VectorIndex.load(root / m, expected_fingerprint=meta.get("fingerprint"))
            for m in meta["modalities"]
        }
        items = {}
        with (root / "items.jsonl").open(encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                items[(r["modality"], r["id"])] = r
        index = cls(root, meta, indexes, items)
        if expected_fingerprint is not None:
            index.require_model(expected_fingerprint)
        return index

    def require_model(self, fingerprint: str) -> None:
        """Refuse queries embedded by a model other than the one that built the index."""
        if self.meta.get("fingerprint") != fingerprint:
            raise UserInputError(
                f"{self.root}: built with model {self.meta.get('fingerprint')}, but the query model is "
                f"{fingerprint}; rebuild the index with this model"
            )

    @property
    def modalities(self) -> list[str]:
        return list(self.meta["modalities"])

    def add(self, emb: Mapping[str, Embeddings], fingerprint: str) -> dict[str, int]:
        """Append items without retraining (IVF/PQ keep their trained quantisers)."""
        if fingerprint != self.meta["fingerprint"]:
            raise UserInputError(
                f"{self.root}: built with model {self.meta['fingerprint']}, but these embeddings come from "
                f"{fingerprint}; embed them with the index's model or build a new index"
            )
        added = {}
        for m, e in emb.items():
            if m not in self.indexes:
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
        self.meta["build"] = {
            m: {"items": len(ix), "factory": ix.factory, **ix.stats.__dict__}
            for m, ix in sorted(self.indexes.items())
        }
        with atomic_dir(out) as tmp:
            for m, ix in self.indexes.items():
                ix.save(tmp / m)
            (tmp / "items.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in self.items.values())
            )
            (tmp / "index.json").write_text(json.dumps(self.meta, indent=2))
        self.root = out

    def search(
        self, vectors: np.ndarray, k: int = 10, targets: Sequence[str] | None = None
    ) -> list[list[Hit]]:
        """Top-k hits per query over the target modalities, merged by score."""
        targets = list(targets or self.modalities)
        unknown = [t for t in targets if t not in self.indexes]
        if unknown:
            raise UserInputError(f"the index has no {unknown} vectors; it has {self.modalities}")
        per_query: list[list[Hit]] = [[] for _ in range(len(np.atleast_2d(vectors)))]
        for m in targets:
            res = self.indexes[m].search(vectors, k)
            for q, (scores, ids) in enumerate(zip(res.scores, res.ids)):
                for s, full_id in zip(scores, ids):
                    item_id = full_id.split(":", 1)[1]
                    r = self.items[(m, item_id)]
                    per_query[q].append(Hit(item_id, float(s), m, r["value"], r.get("label")))
        return [sorted(h, key=lambda x: -x.score)[:k] for h in per_query]
