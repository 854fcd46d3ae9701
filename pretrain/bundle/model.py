"""A loaded model bundle: encode any of its modalities from paths, bytes, values or arrays."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sized
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


class EmbeddingModel:
    """What every runtime of a bundle shares: ``encode(image=..., text=...)`` decodes and
    prepares values through the modalities' specs (eval transforms) and batches them; a
    runtime supplies :attr:`modalities` and :meth:`encode_batch` (the towers' forward):
    :class:`BundleModel` in PyTorch, ``OnnxModel`` (:mod:`modalign.pretrain.export`) in ONNX
    Runtime."""

    def __init__(
        self,
        cfg: PretrainConfig,
        meta: dict[str, Any],
        path: Path,
        device: str,
        modalities: Mapping[str, ModalitySpec] | None = None,
        presets: Mapping[str, ImagePreset] | None = None,
    ) -> None:
        self._extra_specs = dict(modalities or {})
        self.cfg, self.meta, self.path, self.device = cfg, meta, path, device
        self.input_presets: dict[str, ImagePreset] = dict(presets or {})
        self._specs: dict[str, ModalitySpec] | None = None

    @property
    def modalities(self) -> list[str]:  # pragma: no cover - defined by each runtime
        raise NotImplementedError

    def encode_batch(
        self, batch: Mapping[str, Any], normalize: bool = True
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - defined by each runtime
        """Encode a collated batch (tensors or text lists per modality) -> embeddings."""
        raise NotImplementedError

    @property
    def image_preset(self) -> ImagePreset | None:
        """Back-compat: the first declared input preset."""
        return next(iter(self.input_presets.values()), None)

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

    def encode(
        self,
        batch_size: int = 64,
        *,
        convert_to_numpy: bool = False,
        normalize: bool = True,
        show_progress_bar: bool = False,
        **values: Any,
    ) -> dict[str, torch.Tensor | np.ndarray]:
        """Embed any subset of modalities: ``encode(image=[...], text=[...])``.

        Each value is a path, bytes, an inline value (text), an in-memory object (PIL image) or
        an array holding the decoded value; it is read through that modality's spec. Values
        are decoded batch by batch as they are encoded, so memory is bounded by ``batch_size``
        whatever the number of inputs (any iterable works, e.g. a generator). Returns
        ``(n, embed_dim)`` float32 embeddings keyed by modality: L2-normalised (the shared
        space; cosine = dot product) unless ``normalize=False``, as tensors or, with
        ``convert_to_numpy``, arrays (the sentence-transformers options).
        """
        if batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {batch_size}")
        out: dict[str, torch.Tensor | np.ndarray] = {}
        for modality, items in values.items():
            if items is None:
                continue
            if modality not in self.modalities:
                raise UserInputError(
                    f"this model has no {modality!r} tower; it has {self.modalities}"
                )
            if isinstance(items, (str, bytes, Path, np.ndarray)) or not isinstance(items, Iterable):
                items = [items]
            chunks = list(
                self._encode_stream(modality, items, batch_size, normalize, show_progress_bar)
            )
            emb = torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim)
            out[modality] = emb.numpy() if convert_to_numpy else emb
        return out

    def _encode_stream(
        self, modality: str, items: Iterable[Any], batch_size: int, normalize: bool, bar: bool
    ) -> Iterator[torch.Tensor]:
        from tqdm.auto import tqdm

        spec = self.modality_specs()[modality]
        total = len(items) if isinstance(items, Sized) else None
        with tqdm(total=total, desc=f"encode {modality}", disable=not bar) as progress:
            for chunk in _chunks(items, batch_size):
                prepared = [self.prepare(modality, v) for v in chunk]
                yield self.encode_batch({modality: spec.collate(prepared)}, normalize)[modality]
                progress.update(len(chunk))

    def prepare(self, modality: str, value: Any) -> Any:
        """One input value -> the model input, through the modality's spec (eval transforms)."""
        spec = self.modality_specs()[modality]
        if isinstance(value, np.ndarray):
            return _from_array(spec, value)
        return spec.load(_as_source(value), False, np.random.default_rng(0))


class BundleModel(EmbeddingModel):
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
        device = resolve_device(device)
        self.encoder = encoder.eval().to(device)
        super().__init__(cfg, meta, path, device, modalities, presets)

    @property
    def modalities(self) -> list[str]:
        return self.encoder.modalities

    @torch.inference_mode()
    def encode_batch(
        self, batch: Mapping[str, Any], normalize: bool = True
    ) -> dict[str, torch.Tensor]:
        """Encode a collated batch (tensors or text lists per modality) -> embeddings (CPU,
        float32; L2-normalised unless ``normalize=False``)."""
        inputs = {
            m: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
            for m, v in batch.items()
            if m in self.modalities
        }
        return {m: e.float().cpu() for m, e in self.encoder(inputs, normalize).items()}


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
