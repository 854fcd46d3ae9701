"""Evaluate a modalign bundle's image/text towers with CLIP_benchmark (``clip-benchmark``).

CLIP_benchmark loads models through ``clip_benchmark.models.TYPE2FUNC[model_type]`` ->
``(model, transform, tokenizer)``; :func:`register` adds ``--model_type modalign`` there, with
``--model`` naming the bundle folder (``--pretrained`` is ignored). Run it as::

    python -m modalign.benchmark.clip_adapter eval --model_type modalign \\
        --model runs/demo/model --pretrained none --dataset cifar10 --dataset_root DIR

The model is :class:`ModalignClip` (``encode_image``/``encode_text``); text towers read strings,
so the tokenizer hands CLIP_benchmark row indices into a string table that ``encode_text`` reads
back. Nothing here downloads anything (the bundle's own towers are used).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modalign.core.errors import UserInputError

__all__ = ["ModalignClip", "StringTokenizer", "load_modalign_clip", "register"]


class StringTokenizer:
    """``tokenizer(texts) -> LongTensor`` of positions in a shared string table."""

    def __init__(self) -> None:
        self.table: list[str] = []

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        start = len(self.table)
        self.table.extend(texts)
        return torch.arange(start, start + len(texts), dtype=torch.long)

    def lookup(self, tokens: torch.Tensor) -> list[str]:
        return [self.table[int(i)] for i in tokens.flatten().tolist()]


class ModalignClip(nn.Module):
    """A bundle as a CLIP-like model: L2-normalised ``encode_image`` / ``encode_text``."""

    def __init__(
        self, bundle: Any, tokenizer: StringTokenizer, image: str = "image", text: str = "text"
    ) -> None:
        super().__init__()
        missing = [m for m in (image, text) if m not in bundle.modalities]
        if missing:
            raise UserInputError(
                f"{bundle.path}: no {missing[0]!r} tower for CLIP_benchmark; it has "
                f"{bundle.modalities}"
            )
        self.bundle, self.tokenizer, self.image, self.text = bundle, tokenizer, image, text
        self.encoder = bundle.encoder  # registered so .eval()/.to() reach the towers

    def transform(self, picture: Any) -> torch.Tensor:
        """PIL image -> the image tower's eval input (the bundle's own transforms)."""
        return self.bundle.prepare(self.image, picture)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.bundle.encode_batch({self.image: images})[self.image]

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bundle.encode_batch({self.text: self.tokenizer.lookup(tokens)})[self.text]


def load_modalign_clip(
    model_name: str, pretrained: str = "", cache_dir: str | None = None, device: str = "cpu"
) -> tuple[ModalignClip, Any, StringTokenizer]:
    """CLIP_benchmark's loader signature: ``model_name`` is the bundle folder."""
    from modalign.pretrain.bundle import load_bundle

    tokenizer = StringTokenizer()
    model = ModalignClip(load_bundle(model_name, device=str(device)), tokenizer)
    return model, model.transform, tokenizer


def register(name: str = "modalign") -> None:
    """Make ``--model_type modalign`` known to CLIP_benchmark (idempotent)."""
    try:
        import clip_benchmark.models as cb_models
    except ImportError:
        raise UserInputError(
            "CLIP_benchmark is not installed: pip install clip-benchmark (or modalign[bench])"
        ) from None
    cb_models.TYPE2FUNC[name] = load_modalign_clip
    if name not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(name)  # the CLI's --model_type choices read this list


def main(argv: Sequence[str] | None = None) -> Any:
    """``clip_benchmark`` CLI with ``--model_type modalign`` available."""
    register()
    from clip_benchmark.cli import main as cb_main

    sys.argv = ["clip_benchmark", *(argv if argv is not None else sys.argv[1:])]
    return cb_main()


if __name__ == "__main__":
    main()
