"""Peer formats: a bundle as an open_clip checkpoint or a sentence-transformers directory.

Both fold modalign's projection head into the peer library's own modules, so the peer's forward
gives the bundle's embeddings (``L2norm(head(trunk(x)))``) with nothing of modalign installed:

* ``open_clip``: image and text towers that are open_clip halves. ``encode_image`` is
  ``visual(x) = ln_post(pooled) @ proj``; with the head ``z = W y + b`` the folded projection is
  ``proj' = proj W^T``, and the bias goes into ``ln_post``'s bias: ``delta`` with
  ``delta @ proj' = b`` (exact when ``proj'`` has full column rank, i.e. the visual width is at
  least ``embed_dim``; a least-squares solve, then checked). ``encode_text`` gets a biased
  ``text_projection`` (open_clip's ``text_cfg.proj_bias``): weight ``W P^T``, bias ``b`` (+``W c``
  for a projection that had a bias ``c``). ``normalize=True`` in open_clip is modalign's
  L2 normalisation. ``logit_scale`` is ``1 / loss.init_temperature`` (bundles do not store the
  learned temperature; it does not change embeddings or rankings).
* ``sentence_transformers``: the text tower's own modules (a sentence-transformers tower's
  modules as they are; a transformers tower as ``Transformer`` + ``Pooling``), then the head as
  ``Dense`` modules (identity activation; an ``mlp`` head as ``Dense(GELU)`` + ``Dense``), then
  ``Normalize``. Which text tower kinds fit is a registry (:data:`ST_TEXT_MODULES`).

Every export is checked before it is handed over: a probe input goes through the bundle and
through the folded modules, and a difference above 1e-4 refuses the export (never a silently
different model).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalign.core.errors import UserInputError
from modalign.core.registry import Registry
from modalign.pretrain.bundle import BundleModel
from modalign.pretrain.towers.api import TowerConfig

TOLERANCE = 1e-4

__all__ = [
    "ST_TEXT_MODULES",
    "OpenClipExportOptions",
    "SentenceTransformersExportOptions",
    "export_open_clip",
    "export_sentence_transformers",
]


@dataclass(frozen=True)
class OpenClipExportOptions:
    """``export --format open_clip`` options: which modalities are the two open_clip halves."""

    image: str = "image"
    text: str = "text"


@dataclass(frozen=True)
class SentenceTransformersExportOptions:
    """``export --format sentence_transformers`` options: the text modality to export."""

    modality: str = "text"


STModules = Callable[[Any, TowerConfig, Path], list[nn.Module]]
"""``(trunk, tower_config, scratch_dir) -> sentence-transformers modules`` reproducing the
trunk's output (``scratch_dir``: a temp folder for files the modules load from)."""

ST_TEXT_MODULES: Registry[STModules] = Registry(
    "sentence-transformers text tower", "modalign.export_st_towers"
)
"""Text tower kinds that become sentence-transformers modules, by tower kind."""


# -- shared checks ---------------------------------------------------------------------------
def _tower_kind(model: BundleModel, modality: str) -> str:
    return str(model.cfg.model.towers[modality].kind)


def _require_modality(model: BundleModel, modality: str, fmt: str, option: str) -> None:
    if modality not in model.modalities:
        raise UserInputError(
            f"{model.path}: no {modality!r} tower (the bundle has {', '.join(model.modalities)}); "
            f"name it with --option {option}=MODALITY (modalign export --format {fmt})"
        )


def _require_plain_tower(model: BundleModel, modality: str, fmt: str) -> None:
    """A tower with an adapter (LoRA...) holds peft layers the peer library cannot load."""
    adapter = model.cfg.model.towers[modality].adapter
    if adapter.enabled:
        raise UserInputError(
            f"{model.path}: the {modality!r} tower carries a {adapter.kind!r} adapter; merge it "
            "into the base weights first (modalign export --model BUNDLE --format bundle --merge "
            f"--out MERGED), then export MERGED with --format {fmt}"
        )


def _head(model: BundleModel, modality: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The head's linear layers as (weight, bias), input side first (float64)."""
    return [
        (m.weight.detach().double(), None if m.bias is None else m.bias.detach().double())
        for m in model.encoder.heads[modality].modules()
        if isinstance(m, nn.Linear)
    ]


def _linear_head(model: BundleModel, modality: str, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    head = model.cfg.model.towers[modality].head
    layers = _head(model, modality)
    if head != "linear" or len(layers) != 1:
        raise UserInputError(
            f"{model.path}: the {modality!r} tower has a {head!r} projection head, which "
            f"{fmt} cannot hold (only a linear one folds into its projection): export "
            "--format onnx"
        )
    w, b = layers[0]
    return w, torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b


def _check_close(what: str, ours: torch.Tensor, theirs: torch.Tensor, fmt: str) -> float:
    diff = float((ours.double() - theirs.double()).abs().max())
    if not math.isfinite(diff) or diff > TOLERANCE:
        raise UserInputError(
            f"{what}: the {fmt} export differs from the bundle by {diff:.2e} (> {TOLERANCE}) on a "
            f"probe input (the towers and head do not fit {fmt}'s modules exactly): export "
            "--format onnx"
        )
    return diff


# -- open_clip -------------------------------------------------------------------------------
def _open_clip_cfg(tower: TowerConfig) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) of a tower."""
    import open_clip

    from modalign.pretrain.towers.openclip import model_name

    name = model_name(tower.arch, f"model.towers({tower.kind}).arch")
    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8")).get("model_cfg")
    else:
        cfg = open_clip.get_model_config(name)
    if not cfg:
        raise UserInputError(f"model.towers({tower.kind}).arch={tower.arch!r}: no open_clip config")
    return dict(cfg)


def _image_visual(trunk: nn.Module) -> Any:
    """open_clip's ``visual`` inside a modalign open_clip image trunk (cached or not)."""
    from modalign.pretrain.towers.openclip import OpenClipImageTrunk

    found = [m for m in trunk.modules() if isinstance(m, OpenClipImageTrunk)]
    return found[0].visual  # open_clip's VisionTransformer (open_clip ships no types)


def _fold_image(
    visual_state: dict[str, torch.Tensor], w: torch.Tensor, b: torch.Tensor, where: str
) -> dict[str, torch.Tensor]:
    if "proj" not in visual_state or "ln_post.bias" not in visual_state:
        raise UserInputError(
            f"{where}: the open_clip image tower has no `proj` after a biased `ln_post` (not a "
            "VisionTransformer) to fold the projection head into: export --format onnx"
        )
    proj = visual_state["proj"].double() @ w.T  # (width, embed_dim)
    delta = torch.linalg.lstsq(proj.T, b.unsqueeze(1)).solution.squeeze(1)  # delta @ proj = b
    residual = float((delta @ proj - b).abs().max())
    if residual > TOLERANCE:
        raise UserInputError(
            f"{where}: the image head's bias cannot be folded into open_clip's `ln_post` "
            f"(off by {residual:.2e}): the shared space ({w.shape[0]} dims) is wider than what "
            f"the open_clip image tower projects to ({w.shape[1]}) or its visual width: "
            "export --format onnx"
        )
    out = dict(visual_state)
    out["proj"] = proj.float()
    out["ln_post.bias"] = (visual_state["ln_post.bias"].double() + delta).float()
    return out


def _fold_text(
    text_state: dict[str, torch.Tensor], w: torch.Tensor, b: torch.Tensor
) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in text_state.items() if not k.startswith("text_projection")}
    if "text_projection.weight" in text_state:  # already an nn.Linear (proj_bias)
        a = text_state["text_projection.weight"].double()
        c = text_state["text_projection.bias"].double()
        weight, bias = w @ a, w @ c + b
    elif "text_projection" in text_state:  # x @ P
        weight, bias = w @ text_state["text_projection"].double().T, b
    else:  # no projection: the head is the projection
        weight, bias = w, b
    out["text_projection.weight"] = weight.float()
    out["text_projection.bias"] = bias.float()
    return out


def export_open_clip(model: BundleModel, out: Path, opts: OpenClipExportOptions) -> dict[str, Any]:
    """open_clip checkpoint (``open_clip_model.safetensors``) + model config of a bundle whose
    image and text towers are open_clip halves; loads with ``create_model_and_transforms(
    "local-dir:DIR")`` or, after ``add_model_config(DIR/NAME.json)``, ``(NAME, pretrained=...)``.
    """
    import open_clip
    from safetensors.torch import save_file

    from modalign.pretrain.towers.text import hub_offline

    for m, option in ((opts.image, "image"), (opts.text, "text")):
        _require_modality(model, m, "open_clip", option)
        kind = _tower_kind(model, m)
        if kind != "open_clip":
            fits = (
                "--format sentence_transformers (text) or --format onnx"
                if m == opts.text and kind in ST_TEXT_MODULES
                else "--format onnx"
            )
            raise UserInputError(
                f"{model.path}: the {m!r} tower is {kind}, not an open_clip half; an open_clip "
                f"checkpoint needs open_clip image and text towers: export {fits}"
            )
    _require_plain_tower(model, opts.image, "open_clip")
    _require_plain_tower(model, opts.text, "open_clip")
    enc, cfgs = model.encoder, model.cfg.model.towers
    wi, bi = _linear_head(model, opts.image, "open_clip")
    wt, bt = _linear_head(model, opts.text, "open_clip")
    image_cfg, text_cfg = _open_clip_cfg(cfgs[opts.image]), _open_clip_cfg(cfgs[opts.text])
    preset = model.input_presets.get(opts.image) or model.image_preset
    model_cfg = {
        **{k: v for k, v in text_cfg.items() if k not in ("vision_cfg", "text_cfg")},
        "embed_dim": model.embed_dim,
        "vision_cfg": image_cfg["vision_cfg"],
        "text_cfg": {**text_cfg["text_cfg"], "proj_bias": True},
    }
    preprocess_cfg = {}
    if preset is not None:
        preprocess_cfg = {
            "size": preset.input_size,
            "mean": list(preset.mean),
            "std": list(preset.std),
            "interpolation": preset.interpolation,
            "resize_mode": "shortest",
        }
    visual = _image_visual(enc.trunks[opts.image])
    text_trunk: Any = enc.trunks[opts.text]  # OpenClipTextTrunk
    clip = text_trunk.clip  # the CLIP model without its visual
    state = {f"visual.{k}": v for k, v in _fold_image(
        {k: v.detach() for k, v in visual.state_dict().items()}, wi, bi, str(model.path)
    ).items()}  # fmt: skip
    text_state = {k: v.detach() for k, v in clip.state_dict().items() if k != "logit_scale"}
    state.update(_fold_text(text_state, wt, bt))
    init_t = float(model.cfg.loss.init_temperature)
    state["logit_scale"] = torch.tensor(math.log(1.0 / init_t))
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2) + "\n"
    )
    name = f"modalign-{model.fingerprint}"
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=2) + "\n")
    with hub_offline():
        target: Any = open_clip.create_model(f"local-dir:{out}").eval()
    target_keys = set(target.state_dict())
    if "logit_scale" in target_keys and target.state_dict()["logit_scale"].dim():
        state["logit_scale"] = state["logit_scale"].reshape(
            target.state_dict()["logit_scale"].shape
        )
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserInputError(
            f"{model.path}: the towers' open_clip weights do not fit one open_clip model "
            f"({str(exc).splitlines()[0]}); export --format onnx"
        ) from None
    save_file({k: v.contiguous() for k, v in target.state_dict().items()},
              str(out / "open_clip_model.safetensors"))  # fmt: skip
    diffs = _probe_open_clip(model, opts, target, out)
    return {
        "open_clip": {
            "model_name": name,
            "config": f"{name}.json",
            "checkpoint": "open_clip_model.safetensors",
            "open_clip_version": str(open_clip.__version__),
            "logit_scale": {"value": 1.0 / init_t, "from": "loss.init_temperature"},
            "probe_max_abs_diff": diffs,
        }
    }


def _probe_open_clip(
    model: BundleModel, opts: OpenClipExportOptions, target: Any, out: Path
) -> dict[str, float]:
    import open_clip

    from modalign.pretrain.towers.text import hub_offline

    gen = torch.Generator().manual_seed(0)
    side = int(target.visual.image_size[0])
    x = torch.randn(2, 3, side, side, generator=gen)
    texts = ["a photo of a cat", "the sound of rain"]
    with hub_offline():
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    with torch.no_grad():
        ours_i = model.encoder.encode(opts.image, x)
        ours_t = model.encoder.encode(opts.text, texts)
        theirs_i = target.encode_image(x, normalize=True)
        theirs_t = target.encode_text(tokenizer(texts), normalize=True)
    return {
        opts.image: _check_close(f"{model.path} ({opts.image})", ours_i, theirs_i, "open_clip"),
        opts.text: _check_close(f"{model.path} ({opts.text})", ours_t, theirs_t, "open_clip"),
    }


# -- sentence-transformers -------------------------------------------------------------------
def _dense_head(model: BundleModel, modality: str) -> list[nn.Module]:
    from sentence_transformers.sentence_transformer.modules import Dense

    layers = _head(model, modality)
    modules: list[nn.Module] = []
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        modules.append(
            Dense(
                w.shape[1],
                w.shape[0],
                bias=b is not None,
                activation_function=nn.Identity() if last else nn.GELU(),
                init_weight=w.float().clone(),
                init_bias=None if b is None else b.float().clone(),
            )
        )
    return modules


def export_sentence_transformers(
    model: BundleModel, out: Path, opts: SentenceTransformersExportOptions
) -> dict[str, Any]:
    """A sentence-transformers directory (``SentenceTransformer(DIR)``) of the text tower: its
    modules, the projection head as ``Dense``, then ``Normalize``."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize

    m = opts.modality
    _require_modality(model, m, "sentence_transformers", "modality")
    kind = _tower_kind(model, m)
    if kind not in ST_TEXT_MODULES:
        fits = "--format onnx" + (", or --format open_clip" if kind == "open_clip" else "")
        raise UserInputError(
            f"{model.path}: the {m!r} tower is {kind}, which sentence-transformers has no module "
            f"for (text towers that fit: {', '.join(ST_TEXT_MODULES.names())}): export {fits}"
        )
    _require_plain_tower(model, m, "sentence_transformers")
    trunk = model.encoder.trunks[m]
    with tempfile.TemporaryDirectory(prefix="modalign-st-") as scratch:
        modules = ST_TEXT_MODULES.get(kind).factory(trunk, model.cfg.model.towers[m], Path(scratch))
        st = SentenceTransformer(modules=[*modules, *_dense_head(model, m), Normalize()],
                                 device="cpu")  # fmt: skip
        st.eval()
        texts = ["a photo of a cat", "the sound of rain", "seven"]
        with torch.no_grad():
            ours = model.encoder.encode(m, texts)
        theirs = st.encode(texts, convert_to_tensor=True, batch_size=len(texts))
        diff = _check_close(f"{model.path} ({m})", ours, theirs, "sentence_transformers")
        st.save(str(out))
    return {
        "sentence_transformers": {
            "modality": m,
            "embedding_dimension": model.embed_dim,
            "modules": [type(x).__name__ for x in st],
            "sentence_transformers_version": sentence_transformers.__version__,
            "probe_max_abs_diff": diff,
        }
    }


def _st_tower_modules(trunk: Any, tower: TowerConfig, scratch: Path) -> list[nn.Module]:
    """A ``sentence_transformer`` tower: its own modules, as trained."""
    return [module for module in trunk.st]


_ST_POOLING = {"cls": "cls", "masked_mean": "mean"}  # modalign hf pooling -> sentence-transformers


def _hf_text_modules(trunk: Any, tower: TowerConfig, scratch: Path) -> list[nn.Module]:
    """An ``hf_text`` tower: ``Transformer`` (its weights as trained, its tokenizer and
    truncation length) + ``Pooling`` with the same pooling."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    pooling = trunk.opts.pooling
    if pooling not in _ST_POOLING:
        raise UserInputError(
            f"model.towers(hf_text).options.pooling={pooling!r} has no sentence-transformers "
            f"Pooling mode (cls and masked_mean do): export --format onnx"
        )
    trunk.model.save_pretrained(scratch)
    trunk.tokenizer.save_pretrained(scratch)
    transformer = Transformer(str(scratch), max_seq_length=trunk.opts.max_length)
    dim = int(transformer.get_embedding_dimension())
    return [transformer, Pooling(dim, pooling_mode=_ST_POOLING[pooling])]


ST_TEXT_MODULES.add("sentence_transformer", _st_tower_modules)
ST_TEXT_MODULES.add("hf_text", _hf_text_modules)
