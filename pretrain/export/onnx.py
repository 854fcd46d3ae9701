"""The ``onnx`` export format: one ONNX graph per modality tower, plus what a client needs.

Each graph runs from the tower's input tensor(s) (after the modality's decode + eval
preprocessing) to the L2-normalised embedding in the shared space (output ``embedding``,
``(batch, embed_dim)`` float32), with a dynamic batch axis (and a dynamic sequence axis for
token inputs). Graphs are written by PyTorch's ``torch.export``-based exporter
(``torch.onnx.export(..., dynamo=True)``, onnxscript): it is the one that exports every built-in
tower kind, the timm audio tower's log-mel front end (a complex STFT) included; the
TorchScript-based exporter refuses that front end.

What sits in the graph and what a client does first is decided per tower kind by
:data:`ONNX_TOWERS` (adapters; a kind without one whose modality takes tensors, e.g. a plugin's
image-like tower, is exported whole as a tensor tower):

- tensor towers (``timm_image``, ``timm_audio``, ``hf_vision``, ``open_clip`` image, plugins):
  the prepared tensor goes in; for ``timm_audio`` the log-mel front end is *in* the graph, so
  the input is the waveform;
- text towers (``sentence_transformer``, ``hf_text``): tokenizer *outside* the graph; its
  ``tokenizer.json`` (``tokenizers`` library, padding and truncation set inside) is written
  beside the graph, inputs are ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``);
- ``open_clip`` text: open_clip's BPE token ids (``context_length`` wide) go in;
- ``hf_audio``: the model's feature extractor (saved beside the graph) runs outside.

``export.json`` states, per modality, the graph's inputs (name, dtype, shape), the ``feed`` (how
:class:`~modalign.pretrain.export.runtime.OnnxModel` and clients build them) and the modality's
preprocessing (image size / mean / std / interpolation / crop, audio rate / clip length / mel
settings). Every graph is checked before anything is written: onnxruntime runs probe batches of
1 and 3 through the exported graphs and the runtime's feeds, and the export is refused when
max |diff| to the PyTorch forward exceeds ``options.atol`` (recorded in ``export.json``).
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modalign.core.config_io import POSITIVE, Range, from_dict
from modalign.core.errors import UserInputError
from modalign.core.registry import Registry
from modalign.pretrain.bundle import BundleModel
from modalign.pretrain.export.runtime import make_feed, session_options
from modalign.pretrain.towers.cache import CachedTrunk

GRAPH_OUTPUT = "shared_embedding"  # not "embedding": an FX node of text models is named so
PROBE_TEXTS = (
    "a handwritten seven",
    "someone says the number three out loud, twice",
    "x",
)


@dataclass(frozen=True)
class OnnxOptions:
    """Options of the ``onnx`` export format."""

    opset: Annotated[int, Range(ge=18, le=23)] = 18  # ONNX opset of the graphs
    atol: Annotated[float, POSITIVE] = 1e-4  # refuse the export above this max |diff|
    modalities: list[str] = field(default_factory=list)  # towers to export; [] = all


@dataclass
class OnnxTower:
    """What one modality's graph is: ``module(*inputs) -> (batch, embed_dim)`` L2-normalised.

    ``inputs``: graph input names in ``module.forward`` order; ``example``: example inputs for
    the exporter (batch >= 2); ``dynamic``: per input, the axes that vary (``{0: "batch"}``);
    ``feed``: how a batch becomes the inputs (a :data:`~.runtime.FEED_KINDS` entry, recorded in
    ``export.json``); ``assets``: writes files the feed needs (a tokenizer) into the export
    folder; ``notes``: further facts for clients (e.g. the audio front end in the graph).
    """

    module: nn.Module
    inputs: list[str]
    example: tuple[torch.Tensor, ...]
    dynamic: list[dict[int, str]]
    feed: dict[str, Any]
    assets: Callable[[Path], None] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


OnnxAdapter = Callable[[BundleModel, str], OnnxTower]
"""``(model, modality) -> OnnxTower``: how a tower kind becomes an ONNX graph."""

ONNX_TOWERS: Registry[OnnxAdapter] = Registry("ONNX tower adapter", "modalign.onnx_towers")
"""Tower kind -> ONNX adapter; kinds without one export whole when their input is a tensor."""


class _Embed(nn.Module):
    """``body(*inputs)`` -> projection head -> L2 normalisation (the shared-space embedding)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.body(*inputs)), dim=-1)


def _unwrap(trunk: nn.Module) -> nn.Module:
    """The trunk itself (a frozen tower's output cache is a runtime concern, not the graph's)."""
    return trunk.inner if isinstance(trunk, CachedTrunk) else trunk


def _embed(model: BundleModel, modality: str, body: nn.Module) -> nn.Module:
    return _Embed(body, model.encoder.heads[modality]).eval()


def tensor_tower(model: BundleModel, modality: str) -> OnnxTower:
    """A tower taking the modality's prepared tensor: preprocessor + trunk + head in the graph."""
    enc = model.encoder
    body = nn.Sequential(enc.preprocessors[modality], _unwrap(enc.trunks[modality]))
    spec = model.modality_specs()[modality]
    placeholder = spec.placeholder
    if not isinstance(placeholder, torch.Tensor):
        raise UserInputError(
            f"modality {modality!r} (tower kind {_kind(model, modality)!r}): its inputs are "
            f"{type(placeholder).__name__} values, not tensors, and no ONNX adapter is "
            "registered for this tower kind (ONNX_TOWERS.add); it cannot be exported to ONNX"
        )
    gen = torch.Generator().manual_seed(0)
    example = torch.randn((2, *placeholder.shape), generator=gen).to(placeholder.dtype) * 0.5
    return OnnxTower(
        _embed(model, modality, body),
        ["input"],
        (example,),
        [{0: "batch"}],
        {"kind": "tensor", "input": "input", "dtype": str(placeholder.dtype).split(".")[-1]},
    )


def timm_audio_tower(model: BundleModel, modality: str) -> OnnxTower:
    """The waveform tower with its log-mel front end in the graph (stated in ``notes``)."""
    tower = tensor_tower(model, modality)
    a = model.cfg.data.audio
    tower.notes["front_end"] = {
        "in_graph": True,
        "steps": "stft -> power -> mel -> dB with top_db floor -> per-clip standardisation",
        "stft": {
            "n_fft": a.n_fft,
            "hop_length": a.hop_length,
            "window": "hann, periodic, n_fft long",
            "center": True,
            "pad_mode": "constant (zeros)",
            "power": 2.0,
            "precision": "float64, output float32",
        },
        "mel": {
            "n_mels": a.n_mels,
            "fmin": a.f_min,
            "fmax": a.f_max if a.f_max is not None else a.sample_rate / 2,
            "filterbank": "librosa.filters.mel (Slaney scale and norm)",
        },
        "db": {"formula": "10*log10(max(mel, amin))", "amin": 1e-10, "top_db": a.top_db},
        "standardise": "per clip: (x - mean) / max(std, 1e-3), std with Bessel's correction",
    }
    return tower


def _token_tower(
    model: BundleModel,
    modality: str,
    body: nn.Module,
    names: Sequence[str],
    tokenizer: Any,
    max_length: int,
) -> OnnxTower:
    """A text tower whose HF fast ``tokenizer`` runs outside the graph, saved beside it."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_length)
    backend.enable_padding(
        pad_id=int(tokenizer.pad_token_id or 0),
        pad_token=str(tokenizer.pad_token),
        direction=str(getattr(tokenizer, "padding_side", "right")),
    )
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise UserInputError(
            f"modality {modality!r}: tokenizer input {unknown[0]!r} has no tokenizers field; "
            "this text tower cannot be exported to ONNX"
        )
    enc = backend.encode_batch(list(PROBE_TEXTS[:2]))
    example = tuple(
        torch.tensor([getattr(e, fields[n]) for e in enc], dtype=torch.long) for n in names
    )
    file = f"{modality}/tokenizer.json"

    def assets(root: Path) -> None:
        (root / modality).mkdir(parents=True, exist_ok=True)
        backend.save(str(root / file))

    return OnnxTower(
        _embed(model, modality, body),
        list(names),
        example,
        [{0: "batch", 1: "sequence"} for _ in names],
        {
            "kind": "tokenizer",
            "file": file,
            "outputs": {n: fields[n] for n in names},
            "max_length": max_length,
            "padding": "longest in the batch, " + str(getattr(tokenizer, "padding_side", "right")),
            "pad_id": int(tokenizer.pad_token_id or 0),
            "truncation": "longest_first",
            "lowercase": "as the tokenizer.json's normalizer does",
        },
        assets,
    )


class _Features(nn.Module):
    """Named token tensors -> ``fn(dict)`` (a tower's forward after its tokenizer)."""

    def __init__(self, names: Sequence[str], fn: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        super().__init__()
        self.names, self.fn = list(names), fn

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(dict(zip(self.names, inputs, strict=True)))


def sentence_transformer_tower(model: BundleModel, modality: str) -> OnnxTower:
    """sentence-transformers: its modules in the graph, its tokenizer beside it."""
    trunk: Any = model.encoder.trunks[modality]  # a SentenceTransformerTrunk
    st = trunk.st
    tokenizer = st.tokenizer
    names = list(tokenizer(["x"], return_tensors="pt").keys())
    body = _Features(names, lambda feats: st(feats)["sentence_embedding"])
    body.add_module("st", st)
    return _token_tower(model, modality, body, names, tokenizer, int(st.max_seq_length))


def hf_text_tower(model: BundleModel, modality: str) -> OnnxTower:
    """transformers text model + pooling in the graph, its tokenizer beside it."""
    from modalign.pretrain.towers.hf import pool

    trunk: Any = model.encoder.trunks[modality]  # an HFTextTrunk
    hf, opts, tokenizer = trunk.model, trunk.opts, trunk.tokenizer
    names = list(tokenizer(["x"], return_tensors="pt").keys())

    def forward(feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(hf(**feats), opts.pooling, feats.get("attention_mask"))

    body = _Features(names, forward)
    body.add_module("model", hf)
    return _token_tower(model, modality, body, names, tokenizer, int(opts.max_length))


def hf_audio_tower(model: BundleModel, modality: str) -> OnnxTower:
    """transformers audio model + pooling in the graph; resampling and the model's feature
    extractor (saved beside the graph) run before it."""
    trunk: Any = _unwrap(model.encoder.trunks[modality])  # an HFAudioTrunk
    placeholder = model.modality_specs()[modality].placeholder
    gen = torch.Generator().manual_seed(0)
    waves = torch.randn((2, *placeholder.shape), generator=gen) * 0.1
    feats = trunk.features(waves)
    names = list(feats)

    def forward(named: dict[str, torch.Tensor]) -> torch.Tensor:
        return trunk.from_features(dict(named))

    body = _Features(names, forward)
    body.add_module("trunk", trunk)
    folder = f"{modality}/feature_extractor"

    def assets(root: Path) -> None:
        trunk.extractor.save_pretrained(str(root / folder))

    return OnnxTower(
        _embed(model, modality, body),
        names,
        tuple(feats[n] for n in names),
        [{0: "batch", 1: "frames"} for _ in names],
        {
            "kind": "hf_feature_extractor",
            "dir": folder,
            "class": type(trunk.extractor).__name__,
            "source_rate": trunk.source_rate,
            "rate": trunk.rate,
            "resample": "scipy.signal.resample_poly when the rates differ",
            "inputs": names,
        },
        assets,
    )


def open_clip_tower(model: BundleModel, modality: str) -> OnnxTower:
    """open_clip image half: a tensor tower; text half: token ids in, tokenizer outside."""
    from modalign.pretrain.towers.openclip import OpenClipOptions

    cfg = model.cfg.model.towers[modality]
    opts = from_dict(OpenClipOptions, dict(cfg.options or {}), "model.towers(open_clip).options")
    if opts.part == "image":
        return tensor_tower(model, modality)
    trunk: Any = model.encoder.trunks[modality]  # an OpenClipTextTrunk
    clip, tokenizer = trunk.clip, trunk.tokenizer
    from open_clip.tokenizer import SimpleTokenizer

    body = _Features(["input_ids"], lambda f: clip.encode_text(f["input_ids"]))
    body.add_module("clip", clip)
    if not isinstance(tokenizer, SimpleTokenizer):  # open_clip's HFTokenizer: a tokenizers file
        return _token_tower(
            model, modality, body, ["input_ids"], tokenizer.tokenizer, int(tokenizer.context_length)
        )
    example = tokenizer(list(PROBE_TEXTS[:2])).long()
    return OnnxTower(
        _embed(model, modality, body),
        ["input_ids"],
        (example,),
        [{0: "batch"}],
        {
            "kind": "open_clip_tokenizer",
            "input": "input_ids",
            "tokenizer": "open_clip.tokenizer.SimpleTokenizer (CLIP BPE, lower-cased, ftfy)",
            "context_length": int(tokenizer.context_length),
        },
    )


ONNX_TOWERS.add("timm_image", tensor_tower)
ONNX_TOWERS.add("hf_vision", tensor_tower)
ONNX_TOWERS.add("timm_audio", timm_audio_tower)
ONNX_TOWERS.add("sentence_transformer", sentence_transformer_tower)
ONNX_TOWERS.add("hf_text", hf_text_tower)
ONNX_TOWERS.add("hf_audio", hf_audio_tower)
ONNX_TOWERS.add("open_clip", open_clip_tower)


def _kind(model: BundleModel, modality: str) -> str:
    return model.cfg.model.towers[modality].kind


def onnx_tower(model: BundleModel, modality: str) -> OnnxTower:
    """The adapter of ``modality``'s tower kind, or the whole-tower tensor export."""
    kind = _kind(model, modality)
    adapter = ONNX_TOWERS.get(kind).factory if kind in ONNX_TOWERS else tensor_tower
    return adapter(model, modality)


# -- preprocessing stated for clients ------------------------------------------------------------
def _image_preprocessing(model: BundleModel, modality: str) -> dict[str, Any]:
    preset = model.input_presets.get(modality)
    if preset is None:
        return {}
    channels = model.cfg.data.image.channels
    mean, std = list(preset.mean), list(preset.std)
    if len(mean) != channels:  # the data layer fits RGB statistics to one channel the same way
        mean, std = [float(np.mean(mean))], [float(np.mean(std))]
    return {
        "decode": "PIL: EXIF transpose, 16-bit scaled to 8-bit, convert to "
        + ("L" if channels == 1 else "RGB"),
        "channels": channels,
        "resize_shorter_to": math.floor(preset.input_size / preset.crop_pct),
        "resize_longer": "int(shorter_to * longer / shorter) (torchvision Resize on a PIL image)",
        "interpolation": preset.interpolation,
        "center_crop": preset.input_size,
        "center_crop_offset": "int(round((side - crop) / 2))",
        "scale": 1 / 255,
        "mean": mean,
        "std": std,
        "layout": "CHW float32, (x * scale - mean) / std",
    }


def _audio_preprocessing(model: BundleModel, modality: str) -> dict[str, Any]:
    a = model.cfg.data.audio
    return {
        "decode": "libsndfile: float32 in [-1, 1] (PCM16: int / 32768), mono = mean of channels",
        "sample_rate": a.sample_rate,
        "resample": "librosa.resample (soxr_hq) when the file's rate differs",
        "clip_samples": a.clip_samples,
        "crop_or_pad": "longer: centre crop at (n - clip) // 2; shorter: zero pad, "
        "(clip - n) // 2 on the left, the rest on the right",
    }


def _text_preprocessing(model: BundleModel, modality: str) -> dict[str, Any]:
    return {"decode": "UTF-8 text, leading/trailing whitespace stripped; empty text refused"}


PREPROCESSING: dict[str, Callable[[BundleModel, str], dict[str, Any]]] = {
    "image": _image_preprocessing,
    "audio": _audio_preprocessing,
    "text": _text_preprocessing,
}
"""Built-in modality -> its decode + eval preprocessing, stated for clients (plugins: their own
loader, named in ``export.json``)."""


# -- export ------------------------------------------------------------------------------------
_OPERATOR = re.compile(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def _operator(exc: BaseException) -> str:
    """The first ATen operator an exporter error names (its chain searched), else ""."""
    for e in _chain(exc):
        found = _OPERATOR.search(str(e))
        if found:
            return found.group(1)
    return ""


def _reason(exc: BaseException) -> str:
    """The innermost error of the chain, one line."""
    inner = _chain(exc)[-1]
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text[:300]}"


def _export_graph(tower: OnnxTower, opset: int, modality: str, kind: str) -> Any:
    """``torch.onnx.export`` (dynamo) of one tower -> an ``ONNXProgram``; refusals name the tower
    and the operator."""
    import warnings

    dims: dict[str, Any] = {}
    shapes = []
    for axes in tower.dynamic:
        shapes.append(
            {i: dims.setdefault(name, torch.export.Dim.DYNAMIC) for i, name in axes.items()}
        )
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                tower.module,
                tower.example,
                dynamo=True,
                input_names=tower.inputs,
                output_names=[GRAPH_OUTPUT],
                dynamic_shapes=(tuple(shapes),),  # forward(*inputs): one varargs tuple
                opset_version=opset,
                verbose=False,
                report=False,
            )
    except Exception as exc:
        op = _operator(exc)
        what = f"operator {op} is not supported" if op else f"the exporter failed ({_reason(exc)})"
        raise UserInputError(
            f"modality {modality!r}: tower kind {kind!r} cannot be exported to ONNX: {what} "
            f"(torch.onnx.export, opset {opset}); nothing was written"
        ) from None
    return program


def _probe_values(model: BundleModel, modality: str, n: int) -> list[Any]:
    """``n`` probe values for ``modality``: texts, or random tensors shaped like its inputs."""
    placeholder = model.modality_specs()[modality].placeholder
    if not isinstance(placeholder, torch.Tensor):
        return [PROBE_TEXTS[i % len(PROBE_TEXTS)] for i in range(n)]
    gen = torch.Generator().manual_seed(1234 + n)
    return list(torch.rand((n, *placeholder.shape), generator=gen).to(placeholder.dtype) - 0.5)


def check_graph(
    model: BundleModel,
    modality: str,
    graph: Path,
    feed_spec: Mapping[str, Any],
    root: Path,
    values: Sequence[Any] | None = None,
) -> float:
    """max |diff| between ``model.encode_batch`` (PyTorch) and the graph in onnxruntime fed by
    the runtime's feed, over probe batches of 1 and 3 (or the given ``values``)."""
    import onnxruntime as ort

    spec = model.modality_specs()[modality]
    session = ort.InferenceSession(
        str(graph), session_options(1), providers=["CPUExecutionProvider"]
    )
    feed = make_feed(feed_spec, root, f"graphs.{modality}")
    batches = (
        [values] if values is not None else [_probe_values(model, modality, n) for n in (1, 3)]
    )
    worst = 0.0
    for batch in batches:
        collated = spec.collate(list(batch))
        want = model.encode_batch({modality: collated})[modality].numpy()
        (got,) = session.run([GRAPH_OUTPUT], feed(collated))
        if got.shape != want.shape:
            raise UserInputError(
                f"modality {modality!r}: the ONNX graph gave shape {got.shape} for a batch of "
                f"{len(batch)}, PyTorch {want.shape}; the export is refused"
            )
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def _shape(t: torch.Tensor, axes: Mapping[int, str]) -> list[Any]:
    return [axes.get(i, int(s)) for i, s in enumerate(t.shape)]


def export_onnx(model: BundleModel, out: Path, opts: OnnxOptions) -> dict[str, Any]:
    """Write ``<modality>.onnx`` per tower (+ tokenizer/extractor files and ``config.yaml``)
    into ``out``; every graph is exported before any is written, and verified after."""
    import onnx

    unknown = [m for m in opts.modalities if m not in model.modalities]
    if unknown:
        raise UserInputError(
            f"export.onnx.modalities: {unknown[0]!r} is not a modality of this bundle "
            f"({', '.join(model.modalities)})"
        )
    towers = {m: onnx_tower(model, m) for m in opts.modalities or model.modalities}
    programs = {
        m: _export_graph(t, opts.opset, m, _kind(model, m)) for m, t in towers.items()
    }  # all exported (or refused) before anything is written
    graphs: dict[str, Any] = {}
    for m, tower in towers.items():
        programs[m].save(str(out / f"{m}.onnx"))
        if tower.assets is not None:
            tower.assets(out)
        onnx.checker.check_model(str(out / f"{m}.onnx"))
        diff = check_graph(model, m, out / f"{m}.onnx", tower.feed, out)
        if not diff <= opts.atol:
            raise UserInputError(
                f"modality {m!r} (tower kind {_kind(model, m)!r}): onnxruntime differs from the "
                f"PyTorch forward by max |diff| {diff:.3g} > atol {opts.atol:g}; the export is "
                "refused (nothing was written)"
            )
        describe = PREPROCESSING.get(m)
        graphs[m] = {
            "file": f"{m}.onnx",
            "tower": {"kind": _kind(model, m), "arch": model.cfg.model.towers[m].arch},
            "inputs": [
                {"name": n, "dtype": str(x.dtype).split(".")[-1], "shape": _shape(x, axes)}
                for n, x, axes in zip(tower.inputs, tower.example, tower.dynamic, strict=True)
            ],
            "output": {
                "name": GRAPH_OUTPUT,
                "dtype": "float32",
                "shape": ["batch", model.embed_dim],
                "l2_normalised": True,
            },
            "feed": tower.feed,
            "preprocessing": describe(model, m)
            if describe
            else {"loader": f"the {m!r} modality's own loader (plugin)"},
            **tower.notes,
            "max_abs_diff": diff,
        }
    shutil.copyfile(model.path / "config.yaml", out / "config.yaml")
    import onnxruntime

    return {
        "config": "config.yaml",
        "modalities": list(graphs),
        "embed_dim": model.embed_dim,
        "input_presets": dict(model.meta.get("input_presets") or {}),
        "graphs": graphs,
        "exporter": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": opts.opset,
            "method": "torch.onnx.export(dynamo=True)",
        },
    }
