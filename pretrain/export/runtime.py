"""Serve an ONNX export: :class:`OnnxModel`, the ``runtime="onnx"`` twin of ``BundleModel``.

Values are decoded and prepared by the same code as the PyTorch runtime
(:class:`~modalign.pretrain.bundle.model.EmbeddingModel`: the modalities' specs with their eval
transforms, batch by batch); only the towers' forward runs in ONNX Runtime, one session per
modality. How a collated batch becomes the graph's inputs is stated in ``export.json`` (each
modality's ``feed``) and done by the feed kinds in :data:`FEED_KINDS`: ``tensor`` (the prepared
tensor as is), ``tokenizer`` (a ``tokenizers`` JSON file beside the graph), ``open_clip_tokenizer``
(open_clip's BPE tokenizer) and ``hf_feature_extractor`` (a transformers feature extractor
saved beside the graph).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from modalign.core.config_io import from_dict
from modalign.core.errors import UserInputError
from modalign.data.modality import ModalitySpec
from modalign.pretrain.bundle import load_bundle
from modalign.pretrain.bundle.meta import read_presets
from modalign.pretrain.bundle.model import EmbeddingModel
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.export.formats import read_export_meta
from modalign.pretrain.towers import TowerBuilder

Feed = Callable[[Any], dict[str, np.ndarray]]
"""A collated batch of one modality -> the graph's named inputs."""


def _tensor_feed(spec: Mapping[str, Any], root: Path) -> Feed:
    name = str(spec["input"])
    dtype = np.dtype(str(spec.get("dtype", "float32")))

    def feed(batch: Any) -> dict[str, np.ndarray]:
        arr = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else batch
        return {name: np.ascontiguousarray(np.asarray(arr, dtype=dtype))}

    return feed


def _tokenizer_feed(spec: Mapping[str, Any], root: Path) -> Feed:
    """Texts -> ids/masks by the ``tokenizers`` file beside the graph (padding to the longest
    and truncation are set inside the file, as ``export.json`` states)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / str(spec["file"])))
    outputs: dict[str, str] = dict(spec["outputs"])  # graph input -> encoding field

    def feed(texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = tok.encode_batch(list(texts))
        return {
            name: np.asarray([getattr(e, field) for e in enc], dtype=np.int64)
            for name, field in outputs.items()
        }

    return feed


def _open_clip_feed(spec: Mapping[str, Any], root: Path) -> Feed:
    """Texts -> open_clip's BPE token ids (``SimpleTokenizer``, ``context_length`` wide)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=int(spec["context_length"]))
    name = str(spec["input"])

    def feed(texts: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: tok(list(texts)).numpy().astype(np.int64)}

    return feed


def _hf_extractor_feed(spec: Mapping[str, Any], root: Path) -> Feed:
    """Waveforms at ``source_rate`` -> resampled to ``rate`` -> the saved feature extractor."""
    from transformers import AutoFeatureExtractor

    from modalign.pretrain.towers.hf import resample

    fe = AutoFeatureExtractor.from_pretrained(str(root / str(spec["dir"])), local_files_only=True)
    src, rate = int(spec["source_rate"]), int(spec["rate"])
    names = list(spec["inputs"])

    def feed(wave: Any) -> dict[str, np.ndarray]:
        arr = wave.detach().float().cpu().numpy() if isinstance(wave, torch.Tensor) else wave
        clips = resample(np.asarray(arr, dtype=np.float32), src, rate)
        feats = fe(list(clips), sampling_rate=rate, return_tensors="np", padding=True)
        return {n: np.ascontiguousarray(feats[n]) for n in names}

    return feed


FEED_KINDS: dict[str, Callable[[Mapping[str, Any], Path], Feed]] = {
    "tensor": _tensor_feed,
    "tokenizer": _tokenizer_feed,
    "open_clip_tokenizer": _open_clip_feed,
    "hf_feature_extractor": _hf_extractor_feed,
}


def make_feed(spec: Mapping[str, Any], root: Path, where: str) -> Feed:
    """The feed an ``export.json`` entry states (unknown kind -> exit 2 naming it)."""
    kind = str(spec.get("kind"))
    if kind not in FEED_KINDS:
        raise UserInputError(
            f"{where}: unknown input feed {kind!r} (known: {', '.join(FEED_KINDS)}); was this "
            "export written by a newer modalign?"
        )
    return FEED_KINDS[kind](spec, root)


def session_options(threads: int = 0) -> Any:
    """ONNX Runtime session options; ``threads`` > 0 caps intra-op threads (0 = its default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def providers_for(device: str) -> list[str]:
    """``cpu`` -> the CPU provider; ``cuda``/``auto`` -> CUDA first when onnxruntime-gpu has it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "auto":
            raise UserInputError(
                f"device={device!r}: onnxruntime has no CUDA provider here (available: "
                f"{', '.join(available)}); pip install 'modalign[gpu]' or use device='cpu'"
            )
    return ["CPUExecutionProvider"]


class OnnxModel(EmbeddingModel):
    """An ONNX export loaded for ``encode``/serving: ``encode(image=[...], text=[...])`` as the
    bundle, with each tower's forward in ONNX Runtime. Outputs are L2-normalised (the graphs
    end in the normalisation)."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        modalities: Mapping[str, ModalitySpec] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        path = Path(path)
        meta = read_export_meta(path, "onnx")
        cfg = _read_config(path / str(meta["config"]))
        info = {**meta, "fingerprint": meta["bundle"]["fingerprint"]}
        super().__init__(cfg, info, path, device, modalities, read_presets(meta))
        self.providers = providers_for(device)
        opts = session_options(threads)
        self.sessions: dict[str, Any] = {}
        self.feeds: dict[str, Feed] = {}
        self.outputs: dict[str, str] = {}
        for m, graph in meta["graphs"].items():
            self.sessions[m] = ort.InferenceSession(
                str(path / graph["file"]), opts, providers=self.providers
            )
            self.outputs[m] = str(graph["output"]["name"])
            self.feeds[m] = make_feed(graph["feed"], path, f"{path / 'export.json'}: graphs.{m}")

    @property
    def modalities(self) -> list[str]:
        return list(self.sessions)

    def encode_batch(
        self, batch: Mapping[str, Any], normalize: bool = True
    ) -> dict[str, torch.Tensor]:
        """Encode a collated batch (tensors or text lists per modality) -> L2-normalised
        float32 embeddings (CPU tensors)."""
        if not normalize:
            raise UserInputError(
                "normalize=False: ONNX graphs end in the L2 normalisation; use runtime='torch' "
                "for unnormalised projections"
            )
        out: dict[str, torch.Tensor] = {}
        for m, value in batch.items():
            if m not in self.sessions:
                continue
            (emb,) = self.sessions[m].run([self.outputs[m]], self.feeds[m](value))
            out[m] = torch.from_numpy(np.asarray(emb, dtype=np.float32))
        return out


def _load_torch(
    path: str | Path,
    device: str,
    tower_builders: Mapping[str, TowerBuilder] | None,
    modalities: Mapping[str, ModalitySpec] | None,
    threads: int = 0,
) -> EmbeddingModel:
    # PyTorch's intra-op threads are the process's (torch.set_num_threads), not the model's
    return load_bundle(path, device=device, tower_builders=tower_builders, modalities=modalities)


def _load_onnx(
    path: str | Path,
    device: str,
    tower_builders: Mapping[str, TowerBuilder] | None,
    modalities: Mapping[str, ModalitySpec] | None,
    threads: int = 0,
) -> EmbeddingModel:
    if not (Path(path) / "export.json").is_file() and (Path(path) / "modalign.json").is_file():
        raise UserInputError(
            f"{path}: a model bundle, not an ONNX export; runtime='onnx' loads the folder written "
            f"by `modalign export --model {path} --format onnx --out DIR`"
        )
    return OnnxModel(path, device, modalities, threads)


RUNTIMES: dict[str, Callable[..., EmbeddingModel]] = {"torch": _load_torch, "onnx": _load_onnx}
"""Runtime name -> loader ``(path, device, tower_builders, modalities, threads) -> model``
(``threads``: the model's own intra-op threads where the runtime has them per model, as ONNX
Runtime's sessions do; 0 = the runtime's default)."""


def load_model(
    path: str | Path,
    device: str = "auto",
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    runtime: str = "torch",
    threads: int = 0,
) -> EmbeddingModel:
    """A model for ``encode``/serving: ``runtime="torch"`` loads a bundle (:func:`load_bundle`),
    ``runtime="onnx"`` an ONNX export of one (:class:`OnnxModel`, its sessions on ``threads``
    intra-op threads when > 0; PyTorch's are set per process, ``torch.set_num_threads``)."""
    if runtime not in RUNTIMES:
        raise UserInputError(f"runtime={runtime!r}: valid: {', '.join(RUNTIMES)}")
    return RUNTIMES[runtime](path, device, tower_builders, modalities, threads)


def _read_config(path: Path) -> PretrainConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"{path}: unreadable export config ({exc}); export again") from None
    fields = set(PretrainConfig.__dataclass_fields__)
    return from_dict(PretrainConfig, {k: v for k, v in raw.items() if k in fields}, "")
