"""A deterministic text model for the embedding loop, and a text manifest writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from modalign.data.modality import modality_specs


class HashModel:
    """A deterministic text 'model' (the loop's Protocol, no training needed)."""

    embed_dim = 4
    fingerprint = "hash-model-1"
    path = "hash-model"

    @property
    def modalities(self) -> list[str]:
        return ["text"]

    def modality_specs(self) -> dict[str, Any]:
        return modality_specs(["text"])

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        rows = [hashlib.sha256(t.encode()).digest()[:4] for t in batch["text"]]
        vec = torch.tensor([[b / 255 + 0.01 for b in r] for r in rows])
        return {"text": torch.nn.functional.normalize(vec, dim=-1)}


def write_texts(path: Path, n: int, start: int = 0) -> Path:
    rows = [{"id": f"t{i}", "text": f"caption number {i}", "label": str(i % 3)}
            for i in range(start, start + n)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
