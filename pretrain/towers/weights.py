"""Local weight files for towers: reading (no code execution), strict key checks, hub guards.

Every pretrained tower reads its weights from a local path. :func:`read_state_dict` reads a
``.safetensors`` file or a torch checkpoint with ``weights_only=True``; :func:`check_keys`
turns missing / unexpected / mis-shaped keys into one :class:`ConfigError` (exit 2) that lists
them and names the file, so no layer is ever left silently random.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from modalign.core.errors import ConfigError

NESTED_KEYS = ("state_dict", "model", "state_dict_ema")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/", "http://", "https://")


def local_path(path: str, key: str, what: str = "file or directory") -> Path:
    """``path`` as an existing local path, else exit 2 naming ``key`` and how to pass one.

    A hub id (``hf-hub:org/name``, ``org/name`` not on disk) is refused: modalign never downloads.
    """
    if not path:
        raise ConfigError(f"{key}: no path given; set it to a local {what} (--set {key}=PATH)")
    p = Path(path).expanduser()
    if p.exists():
        return p
    hub = path.startswith(HUB_PREFIXES) or (path.count("/") == 1 and not path.startswith("."))
    hint = (
        f"{path!r} looks like a hub id; modalign never downloads weights: save the model to a "
        f"local directory (e.g. with the library's save_pretrained / huggingface-cli download "
        f"--local-dir DIR) and pass that"
        if hub
        else f"{path!r} does not exist"
    )
    raise ConfigError(f"{key}: {hint} (--set {key}=PATH to a local {what})")


def read_state_dict(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """Tensors of a local ``.safetensors`` file or torch checkpoint (``weights_only=True``).

    A checkpoint nesting its tensors under ``state_dict`` / ``model`` / ``state_dict_ema`` is
    unwrapped, and a DataParallel ``module.`` prefix removed.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"{key}: tower weights {str(path)!r} not found; give a local .safetensors or .pth file"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(p))  # torch.load below: anything
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / not a checkpoint: name the file
        raise ConfigError(f"{key}: cannot read weights file {str(p)!r}: {exc}") from None
    for nested in NESTED_KEYS:
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
            break
    if not isinstance(state, Mapping):
        raise ConfigError(f"{key}: {str(p)!r} holds no state dict (tensor name -> tensor)")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _listed(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], path: str, key: str
) -> None:
    """Every tensor of ``own`` present in ``state`` with the same shape, and nothing extra."""
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = {k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)}
    if not (missing or unexpected or shapes):
        return
    parts = []
    if len(missing) == len(own):
        parts.append("no tensor matches the architecture")
    if missing:
        parts.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listed(unexpected)}")
    if shapes:
        parts.append(
            "shape mismatch: "
            + _listed(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes)
        )
    raise ConfigError(
        f"{key}: weights file {path!r} does not fit the tower ({'; '.join(parts)}); give weights "
        "saved from the same architecture (and in_chans / num_classes=0 trunk)"
    )


def load_strict(module: torch.nn.Module, path: str, key: str = "weights") -> None:
    """Load ``path`` into ``module``: every key loaded or exit 2 listing what does not fit."""
    state = read_state_dict(path, key)
    check_keys(module.state_dict(), state, path, key)
    module.load_state_dict(state, strict=True)
