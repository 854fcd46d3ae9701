"""Classifier bundle I/O: a fusion head plus a reference to its pretrained model bundle.

Files (written with :func:`modalign.core.artifact.atomic_files` under ``output_dir(out)``)::

    OUT/head.safetensors   head weights
    OUT/finetune.yaml      the fine-tuning config, every strategy's options resolved
    OUT/classifier.json    {"format", "format_version", "class_names", "inputs",
                            "head": {"kind", "options" (resolved), "dims", "provider", "version"},
                            "model": RELATIVE path of the model bundle from OUT,
                            "model_fingerprint", "results", "files": {name: sha256},
                            "meta_sha256": sha256 of this JSON itself (format version 3)}

The model is found by its path relative to the classifier folder, so moving both folders
together keeps the classifier loadable; a model whose fingerprint changed is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalign.core.artifact import (
    OutputKind,
    atomic_files,
    check_seal,
    output_dir,
    read_json_meta,
    remove_stale_temp,
    verify_files,
)
from modalign.core.config_io import dump_yaml, from_dict
from modalign.core.errors import UserInputError
from modalign.finetune.config import FinetuneConfig
from modalign.finetune.embedded import EmbeddedSet, embed_labeled
from modalign.finetune.evaluate import evaluate_head, predict
from modalign.finetune.head_base import FusionHead
from modalign.finetune.heads import HEADS
from modalign.pretrain.bundle import BundleModel, load_bundle

FORMAT = "modalign.classifier-bundle"
FORMAT_VERSION = 3  # 3: classifier.json sealed (meta_sha256)
META = "classifier.json"
_FIX = "create one with `modalign finetune`"
CLASSIFIER_KIND = OutputKind(FORMAT, "classifier bundle", ((META, FORMAT),))


def save_classifier(
    out: Path,
    head: FusionHead,
    cfg: FinetuneConfig,
    class_names: Sequence[str],
    model: BundleModel,
    results: dict[str, Any],
) -> None:
    """Write the classifier bundle into ``out`` (crash-safe; other files in ``out`` untouched)."""
    from safetensors.torch import save

    out = Path(out)
    spec = cfg.head
    rel_model = os.path.relpath(Path(model.path).resolve(), out.resolve())
    with output_dir(out, CLASSIFIER_KIND, "finetune.out"):
        remove_stale_temp(out)
        with atomic_files(out, META, seal=True) as (tmp, meta):
            state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
            (tmp / "head.safetensors").write_bytes(save(state))
            (tmp / "finetune.yaml").write_text(dump_yaml(cfg.resolved()), encoding="utf-8")
            meta.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "class_names": list(class_names),
                    "inputs": list(cfg.inputs),
                    "head": {
                        "kind": spec.kind,
                        "options": spec.resolved(),
                        "dims": dict(head.dims),
                        **_provider(spec.kind),
                    },
                    "model": rel_model,
                    "model_fingerprint": model.fingerprint,
                    "results": results,
                }
            )


def _provider(kind: str) -> dict[str, str]:
    p = HEADS.provenance(kind)
    return {"provider": p["provider"], "version": p["version"]}


@dataclass
class Classifier:
    """A loaded classifier bundle: pretrained model + fusion head."""

    model: BundleModel
    head: FusionHead
    class_names: list[str]
    inputs: list[str]
    cfg: FinetuneConfig

    def _check_drop(self, drop: Sequence[str]) -> None:
        bad = [m for m in drop if m not in self.inputs]
        if bad:
            raise UserInputError(
                f"--drop {bad[0]}: this classifier never had that modality; its inputs are "
                f"{self.inputs}"
            )

    def embed(self, src: str) -> EmbeddedSet:
        """Embed ``src`` with the classifier's inputs (labels mapped to its classes)."""
        return embed_labeled(self.model, src, self.inputs, self.class_names)[0]

    def evaluate(self, src: str, drop: Sequence[str] = ()) -> dict[str, Any]:
        """Accuracy / macro-F1 / per-subset accuracy on labeled ``src``, ``drop`` hidden."""
        self._check_drop(drop)
        return evaluate_head(self.head, self.embed(src), len(self.class_names), drop)

    def predict(self, src: str, drop: Sequence[str] = ()) -> list[dict[str, Any]]:
        """One ``{"id", "label", "confidence"}`` per item of ``src``."""
        self._check_drop(drop)
        s = self.embed(src)
        probs = predict(self.head, s, drop).softmax(1)
        conf, idx = probs.max(1)
        return [
            {"id": i, "label": self.class_names[int(c)], "confidence": float(p)}
            for i, c, p in zip(s.ids, idx, conf)
        ]


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """Load a classifier bundle (safetensors + JSON + YAML; no code executed).

    The head is rebuilt from its registered kind and stored options; a head whose plugin is not
    installed is refused naming the package. The model bundle is looked up relative to ``path``.
    """
    from safetensors.torch import load_file

    root = Path(path)
    meta = _read_meta(root)
    head = _build_head(root, meta)  # first: a missing head plugin is named before anything else
    verify_files(root, meta, "classifier bundle")
    model = _load_model(root, meta, device)
    import yaml

    cfg = from_dict(
        FinetuneConfig, yaml.safe_load((root / "finetune.yaml").read_text()), "finetune"
    )
    head.load_state_dict(load_file(str(root / "head.safetensors")))
    head.to(device)
    return Classifier(model, head.eval(), meta["class_names"], meta["inputs"], cfg)


def _read_meta(root: Path) -> dict[str, Any]:
    meta = read_json_meta(root / META, "classifier bundle", _FIX, format=FORMAT)
    if "format_version" not in meta:
        raise UserInputError(
            f"{root / META}: written by modalign 0.1 (absolute model path, head options not "
            "stored); fine-tune again to write a current classifier bundle"
        )
    meta = read_json_meta(
        root / META, "classifier bundle", _FIX, format=FORMAT, max_version=FORMAT_VERSION
    )
    # from version 3 the metadata is sealed: an edited class list or head is refused
    check_seal(root / META, meta, "classifier bundle", required=meta["format_version"] >= 3)
    return meta


def _load_model(root: Path, meta: dict[str, Any], device: str) -> BundleModel:
    """The model bundle at the classifier's relative path, fingerprint checked."""
    model_dir = root / meta["model"]
    try:
        model = load_bundle(model_dir, device=device)
    except UserInputError as exc:
        raise UserInputError(
            f"{root}: its model bundle is expected at {meta['model']!r} relative to the "
            f"classifier ({model_dir.resolve()}) and could not be loaded there ({exc}); move the "
            "model and classifier folders together (keeping their relative place) or fine-tune "
            "again"
        ) from None
    if model.fingerprint != meta["model_fingerprint"]:
        raise UserInputError(
            f"{root}: its pretrained model at {model_dir.resolve()} has changed (fingerprint "
            f"{model.fingerprint} != {meta['model_fingerprint']}); fine-tune again"
        )
    return model


def _build_head(root: Path, meta: dict[str, Any]) -> FusionHead:
    h = meta["head"]
    entry = HEADS.require(h["kind"], h.get("provider", "modalign"), f"classifier bundle {root}")
    opts = HEADS.options(h["kind"], h["options"], f"{root / META}: head.options")
    dims = {m: int(d) for m, d in h["dims"].items()}
    return entry.factory(dims, len(meta["class_names"]), opts)


__all__ = ["FORMAT", "Classifier", "load_classifier", "save_classifier"]
