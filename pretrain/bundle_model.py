"""A loaded model bundle: encode any of its modalities from paths, bytes, values or arrays."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modalign.core.errors import UserInputError
from modalign.data.decode import crop_or_pad
from modalign.data.modality import ImagePreset, ModalitySpec, modality_specs
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.model import MultimodalEncoder


def _as_source(value: Any) -> Any:
    """A value ``spec.load`` accepts: paths/bytes/inline values pass; in-memory objects adapt.

    A PIL image becomes PNG bytes (arrays are handled by :func:`_from_array`).
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(value, Path):
        return str(value)
    return value


def _from_array(spec: ModalitySpec, value: np.ndarray) -> torch.Tensor:
    target = spec.placeholder
    if not isinstance(target, torch.Tensor):
        raise UserInputError(f"{spec.name}: this modality takes files or values, not arrays")
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim == 1 and target.ndim == 1:
        arr = crop_or_pad(arr, int(target.shape[0]), None)
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if tensor.numel() == target.numel() and tensor.shape != target.shape:
        tensor = tensor.reshape(target.shape)
    if tensor.shape != target.shape:
        raise UserInputError(
            f"{spec.name}: array of shape {tuple(arr.shape)} does not fit this model's input "
            f"{tuple(target.shape)}; pass a file path or bytes instead"
        )
    return tensor


class BundleModel:
    """A loaded model bundle: ``encode(image=..., text=..., depth=...)`` in eval mode."""

    def __init__(
        self,
        encoder: MultimodalEncoder,
        cfg: PretrainConfig,
        meta: dict[str, Any],
        path: Path,
        device: str,
        modalities: Mapping[str, ModalitySpec] | None = None,
        presets: Mapping[str, ImagePreset] | None = None,
    ) -> None:
        self.encoder = encoder.eval().to(device)
        self._extra_specs = dict(modalities or {})
        self.cfg, self.meta, self.path, self.device = cfg, meta, path, device
        self.input_presets: dict[str, ImagePreset] = dict(presets or {})
        self._specs: dict[str, ModalitySpec] | None = None

    @property
    def image_preset(self) -> ImagePreset | None:
        """Back-compat: the first declared input preset."""
        return next(iter(self.input_presets.values()), None)

    @property
    def modalities(self) -> list[str]:
        return self.encoder.modalities

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def modality_specs(self) -> dict[str, ModalitySpec]:
        """Decoders and eval transforms matching how this model was trained."""
        if self._specs is None:
            self._specs = modality_specs(
                self.modalities, self.cfg.data, self.input_presets, self._extra_specs
            )
        return self._specs

    @torch.no_grad()
    def encode_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a collated batch (tensors or text lists per modality) -> normalised embeddings."""
        inputs = {
            m: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
            for m, v in batch.items()
            if m in self.modalities
        }
        return {m: e.float().cpu() for m, e in self.encoder(inputs).items()}

    def encode(self, batch_size: int = 64, **values: Any) -> dict[str, torch.Tensor]:
        """Embed any subset of modalities: ``encode(image=[...], text=[...])``.

        Each value is a path, bytes, an inline value (text), an in-memory object (PIL image) or
        an array holding the decoded value; it is read through that modality's spec. Returns
        L2-normalised ``(n, embed_dim)`` tensors keyed by modality.
        """
        out: dict[str, torch.Tensor] = {}
        for modality, items in values.items():
            if items is None:
                continue
            if modality not in self.modalities:
                raise UserInputError(
                    f"this model has no {modality!r} tower; it has {self.modalities}"
                )
            if isinstance(items, (str, bytes, Path, np.ndarray)) or not isinstance(items, Sequence):
                items = [items]
            spec = self.modality_specs()[modality]
            prepared = [self.prepare(modality, v) for v in items]
            chunks = [
                self.encode_batch({modality: spec.collate(prepared[i : i + batch_size])})[modality]
                for i in range(0, len(prepared), batch_size)
            ]
            out[modality] = torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim)
        return out

    def prepare(self, modality: str, value: Any) -> Any:
        """One input value -> the model input, through the modality's spec (eval transforms)."""
        spec = self.modality_specs()[modality]
        if isinstance(value, np.ndarray):
            return _from_array(spec, value)
        return spec.load(_as_source(value), False, np.random.default_rng(0))
