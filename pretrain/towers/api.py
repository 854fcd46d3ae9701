"""What a tower builder returns: :class:`TowerParts` with its declared properties.

A tower declares what the rest of the system needs to know about it (can its trunk be
``torch.compile``-d, are its outputs a pure function of its input, which input geometry it
wants, which weights live outside the bundle) instead of the trainer or the bundle guessing
from attribute names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from torch import nn

from modalign.core.artifact import sha256_file
from modalign.core.config_io import NON_NEGATIVE, Range
from modalign.core.errors import ConfigError
from modalign.core.registry import Registry
from modalign.data.config import DataConfig
from modalign.data.modality import ImagePreset
from modalign.pretrain.towers.adapters import AdapterConfig, AdapterTargets


@dataclass
class TowerConfig:
    """One modality's tower. ``kind`` names a registered tower builder (see ``towers.py``);
    ``options`` are that kind's own typed options (checked against its options dataclass)."""

    kind: str = "timm_image"
    arch: str = "resnet18"  # timm model name, or sentence-transformers path ("" = bundled MiniLM)
    weights: str = ""  # local weights file (.safetensors or timm/torch checkpoint); "" = scratch
    lock: Literal["none", "all", "partial"] = "none"  # "partial": LiT-style, last groups train
    unlocked_groups: Annotated[int, NON_NEGATIVE] = 0
    input_size: Annotated[int, Range(ge=0, note="0 = the tower's own")] = (
        0  # image side in pixels; 0 = the tower's pretrained config (timm: 224)
    )
    in_chans: Annotated[int, Range(ge=0, note="0 = data.image.channels")] = (
        0  # image tower input channels; 0 = data.image.channels
    )
    drop_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0
    head: Literal["linear", "mlp"] = "linear"
    # how the projection head starts (label-free; see modalign.pretrain.projection_init):
    # random (torch's init) | identity (embed_dim = trunk width) | pca | pca_whiten (fitted on
    # the trunk's outputs for the first projection_init_items items of data.train)
    projection_init: Literal["random", "identity", "pca", "pca_whiten"] = "random"
    projection_init_items: Annotated[int, Range(ge=2)] = 4096
    grad_checkpointing: bool = False
    cache_items: Annotated[int, Range(ge=0, note="0 = no cache")] = (
        100_000  # frozen (lock: all) towers: cached outputs kept; 0 = no cache
    )
    options: dict[str, Any] = field(default_factory=dict)  # the kind's own options
    # peft adapter (LoRA, IA3, ...): the base stays frozen, only the adapter trains
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    def __post_init__(self) -> None:
        if self.lock not in ("none", "all", "partial"):
            raise ConfigError(
                f"lock={self.lock!r} is not valid: must be none|all|partial "
                "(--set model.towers.<m>.lock=...)"
            )
        if self.kind in TOWERS:  # plugins passed as tower_builders= check their own options
            TOWERS.options(self.kind, self.options, f"model.towers({self.kind}).options")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ExternalWeights:
    """Weights a bundle references instead of storing (e.g. an installed text model).

    ``files`` maps each weight file (relative to ``path``) to its sha256; ``package``/``version``
    name the distribution that ships them ("" for a local directory).
    """

    package: str
    version: str
    path: str
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What the bundle fingerprint covers: package, version and file hashes (not the path)."""
        return {"package": self.package, "version": self.version, "files": dict(self.files)}


def hash_weight_files(root: str | Path) -> dict[str, str]:
    """sha256 of every weight file under ``root`` (cached by path, size and mtime)."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*"))
    out: dict[str, str] = {}
    for f in files:
        if not f.is_file() or f.suffix not in WEIGHT_SUFFIXES:
            continue
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASH_CACHE:
            _HASH_CACHE[key] = sha256_file(f)
        out[f.name if f == root else f.relative_to(root).as_posix()] = _HASH_CACHE[key]
    return out


def external_weights(path: str | Path, package: str = "") -> ExternalWeights:
    """Describe the weights at ``path`` (shipped by ``package`` when given)."""
    version = ""
    if package:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version(package)
        except PackageNotFoundError:
            version = ""
    return ExternalWeights(package, version, str(path), hash_weight_files(path))


def numbered_layer_groups(trunk: nn.Module) -> list[list[nn.Parameter]]:
    """Layer groups from parameter names ``...layer.<i>...`` (transformers); the rest first."""
    import re

    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in trunk.named_parameters():
        m = re.search(r"\.layer\.(\d+)\.", name)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(p)
    return [groups[k] for k in sorted(groups)]


@dataclass
class TowerParts:
    """A built tower: preprocessor -> trunk (``out_dim`` wide) plus its declared properties.

    compilable:    the trunk takes tensors and may be ``torch.compile``-d.
    cache_outputs: the trunk is frozen and a pure function of its input (outputs may be cached).
    input_preset:  input geometry for the data transforms (image-like towers).
    external:      weights referenced, not stored, by bundles (hashed into the fingerprint).
    layer_groups:  ordered parameter groups for LiT-style partial unlocking.
    adapter_targets: the layers an adapter adapts by default (peft ``target_modules``: names,
                   or one regular expression over full module names); None = none declared.
    """

    preprocessor: nn.Module
    trunk: nn.Module
    out_dim: int
    input_preset: ImagePreset | None = None
    external: ExternalWeights | None = None
    compilable: bool = True
    cache_outputs: bool = False
    layer_groups: Callable[[], list[list[nn.Parameter]]] | None = None
    adapter_targets: AdapterTargets | None = None

    @property
    def image_preset(self) -> ImagePreset | None:
        """Back-compat name of :attr:`input_preset`."""
        return self.input_preset

    def groups(self) -> list[list[nn.Parameter]]:
        """Ordered parameter groups (first = closest to the input)."""
        return self.layer_groups() if self.layer_groups else numbered_layer_groups(self.trunk)


@dataclass(frozen=True)
class TowerTraits:
    """The declared properties of one built tower, kept on the encoder (not parameters)."""

    kind: str
    provider: str
    version: str
    compilable: bool
    cache_outputs: bool
    input_preset: ImagePreset | None
    external: ExternalWeights | None
    adapter: dict[str, str] | None = None  # adapter kind's provenance (name, provider, version)


TowerBuilder = Callable[[TowerConfig, DataConfig], TowerParts]

TOWERS: Registry[TowerBuilder] = Registry("tower kind", "modalign.towers")
"""Tower kinds: the built-ins (registered by :mod:`modalign.pretrain.towers`) and plugins."""
