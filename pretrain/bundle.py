"""Model bundles: ``config.yaml`` + ``model.safetensors`` + ``modalign.json``.

Loading never executes code from the bundle: YAML (safe loader), JSON and safetensors only.
Frozen towers whose weights come from an installed package (the bundled MiniLM text model)
are referenced, not copied, so bundles stay small.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from modalign.core.artifact import atomic_dir, read_json_meta
from modalign.core.config_io import dump_yaml, from_dict
from modalign.core.errors import UserInputError
from modalign.data.decode import crop_or_pad, decode_text
from modalign.data.modality import ImagePreset, ModalitySpec, default_modalities
from modalign.pretrain.config import PretrainConfig
from modalign.pretrain.model import MultimodalEncoder, build_encoder
from modalign.pretrain.towers import TowerBuilder, default_tower_builders, is_frozen

FORMAT = "modalign.model-bundle"
FORMAT_VERSION = 1


def _external_trunk_prefixes(encoder: MultimodalEncoder, cfg: PretrainConfig) -> list[str]:
    """Frozen towers loaded from an installed model are not stored (they are referenced)."""
    return [
        f"trunks.{m}."
        for m in encoder.modalities
        if cfg.model.towers[m].kind == "sentence_transformer" and is_frozen(encoder.trunks[m])
    ]


def encoder_state(encoder: MultimodalEncoder, cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    skip = _external_trunk_prefixes(encoder, cfg)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    return {k: v for k, v in state.items() if not any(k.startswith(p) for p in skip)}


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_bundle(
    out_dir: str | Path,
    encoder: MultimodalEncoder,
    cfg: PretrainConfig,
    image_preset: ImagePreset | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle files into ``out_dir`` atomically (checkpoints/ etc. are left alone)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = encoder_state(encoder, cfg)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "modalities": encoder.modalities,
        "embed_dim": encoder.embed_dim,
        "fingerprint": state_fingerprint(state),
        "image_preset": dataclasses.asdict(image_preset) if image_preset else None,
        "towers": {
            m: {"kind": cfg.model.towers[m].kind, "arch": cfg.model.towers[m].arch}
            for m in encoder.modalities
        },
        "versions": _versions(),
        **(extra or {}),
    }
    # The three files are staged together and then moved in, so a crash leaves the old bundle.
    with atomic_dir(out_dir / ".bundle") as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(dump_yaml(cfg))
        (tmp / "modalign.json").write_text(json.dumps(meta, indent=2))
    staged = out_dir / ".bundle"
    for name in ("model.safetensors", "config.yaml", "modalign.json"):
        (staged / name).replace(out_dir / name)
    staged.rmdir()
    return out_dir


def _versions() -> dict[str, str]:
    import timm

    from modalign.core.version import __version__

    return {
        "modalign": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / "modalign.json"
    meta = read_json_meta(meta_file, "model bundle", "pass the output.dir of `modalign pretrain`")
    if meta.get("format") != FORMAT:
        raise UserInputError(
            f"{meta_file}: format {meta.get('format')!r} is not a model bundle ({FORMAT})"
        )
    return meta


class BundleModel:
    """A loaded model bundle: ``encode(image=..., audio=..., text=...)`` in eval mode."""

    def __init__(
        self,
        encoder: MultimodalEncoder,
        cfg: PretrainConfig,
        meta: dict[str, Any],
        path: Path,
        device: str,
        modalities: Mapping[str, ModalitySpec] | None = None,
    ) -> None:
        self.encoder = encoder.eval().to(device)
        self._extra_specs = dict(modalities or {})
        self.cfg, self.meta, self.path, self.device = cfg, meta, path, device
        preset = ImagePreset(**meta["image_preset"]) if meta.get("image_preset") else None
        if preset is not None:
            preset = dataclasses.replace(preset, mean=tuple(preset.mean), std=tuple(preset.std))
        self.image_preset = preset
        self._specs: dict[str, ModalitySpec] | None = None

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
            specs = {
                **default_modalities(self.cfg.data, self.image_preset),
                **self._extra_specs,
            }
            self._specs = {m: specs[m] for m in self.modalities if m in specs}
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

    def encode(
        self,
        image: Sequence[Any] | None = None,
        audio: Sequence[Any] | None = None,
        text: Sequence[str] | None = None,
        batch_size: int = 64,
        **others: Sequence[Any],
    ) -> dict[str, torch.Tensor]:
        """Embed any subset of modalities. Images: paths, bytes or PIL images; audio: paths,
        bytes or 1-D float arrays at the model's sample rate; text: strings. Returns L2-normalised
        ``(n, embed_dim)`` tensors keyed by modality."""
        requested = {
            k: v
            for k, v in {"image": image, "audio": audio, "text": text, **others}.items()
            if v is not None
        }
        out: dict[str, torch.Tensor] = {}
        for modality, values in requested.items():
            if modality not in self.modalities:
                raise UserInputError(
                    f"this model has no {modality!r} tower; it has {self.modalities}"
                )
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                values = [values]
            prepared = [self._prepare(modality, v) for v in values]
            spec = self.modality_specs()[modality]
            chunks = [
                self.encode_batch({modality: spec.collate(prepared[i : i + batch_size])})[modality]
                for i in range(0, len(prepared), batch_size)
            ]
            out[modality] = torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim)
        return out

    def _prepare(self, modality: str, value: Any) -> Any:
        spec = self.modality_specs()[modality]
        rng = np.random.default_rng(0)
        if modality == "text":
            return decode_text(value)
        if modality == "audio" and isinstance(value, np.ndarray):
            return torch.from_numpy(
                crop_or_pad(value.astype(np.float32), self.cfg.data.audio.clip_samples, None)
            )
        if modality == "image" and isinstance(value, Image.Image):
            import io

            buf = io.BytesIO()
            value.save(buf, format="PNG")
            value = buf.getvalue()
        return spec.load(value if isinstance(value, bytes) else str(value), False, rng)


def load_bundle(
    path: str | Path,
    device: str = "cpu",
    tower_builders: Mapping[str, TowerBuilder] | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
) -> BundleModel:
    """Load a model bundle directory written by :func:`save_bundle`.

    A bundle trained with custom towers or modalities (``pretrain(tower_builders=...,
    modalities=...)``) needs the same builders to rebuild its towers, and the same specs to
    decode inputs for ``encode``; bundles never carry code.
    """
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_bundle_meta(path)
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserInputError(f"{path / 'config.yaml'}: unreadable bundle config ({exc})") from None
    # A bundle written from the full app config also holds other sections (finetune...).
    sections = {f.name for f in dataclasses.fields(PretrainConfig)}
    cfg = from_dict(PretrainConfig, {k: v for k, v in (raw or {}).items() if k in sections}, "")
    for tower in cfg.model.towers.values():
        tower.weights = ""  # the bundle holds the trained weights; don't re-read init files
    builders = {**default_tower_builders(), **(tower_builders or {})}
    encoder = build_encoder(cfg.model, cfg.data, builders).encoder
    weights = path / "model.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise UserInputError(
            f"{weights}: cannot read model weights ({exc}); re-export the bundle"
        ) from None
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    skip = _external_trunk_prefixes(encoder, cfg)
    missing = [k for k in missing if not any(k.startswith(p) for p in skip)]
    if missing or unexpected:
        raise UserInputError(
            f"{weights}: weights do not match the bundle config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return BundleModel(encoder, cfg, meta, path, device, modalities)
