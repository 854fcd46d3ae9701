"""The root config: YAML file or built-in name + ``--set`` overrides -> typed dataclasses.

Sections come from the layers that own them (``data`` from modalign.data, ``model``/``loss``/
``optim``/``train``/``output`` from modalign.pretrain, ``finetune`` from modalign.finetune).
Every key is checked before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from modalign.core.config_io import apply_override, from_dict, parse_yaml_mapping, to_dict
from modalign.core.errors import ConfigError
from modalign.data.preflight import refuse_pipe
from modalign.finetune.config import FinetuneConfig
from modalign.pretrain.bundle import META as BUNDLE_META
from modalign.pretrain.checkpoint import STATE_FILE
from modalign.pretrain.config import PretrainConfig


@dataclass
class Config(PretrainConfig):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def builtin_configs() -> list[str]:
    """Names of the configs shipped as package data (``demo``, ``avmnist``...)."""
    root = resources.files("modalign.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def read_config_tree(name_or_path: str) -> dict[str, Any]:
    """YAML path, or the name of a built-in config -> raw mapping."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(
                f"config file {name_or_path!r} not found; built-in configs: {', '.join(builtin_configs())}"
            )
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        if name_or_path not in builtin_configs():
            raise ConfigError(
                f"no config file or built-in config named {name_or_path!r}; built-in: {', '.join(builtin_configs())}"
            )
        text = (
            resources.files("modalign.configs")
            .joinpath(f"{name_or_path}.yaml")
            .read_text(encoding="utf-8")
        )
        where = f"built-in config {name_or_path!r}"
    tree = parse_yaml_mapping(text, where)
    if path.is_file() and written_by_a_run(path):
        refuse_pipe(tree, f"{path} (written by a run, not by you)")
    return tree


def written_by_a_run(path: Path) -> bool:
    """True for a config inside a bundle (beside ``modalign.json``) or a checkpoint (beside
    ``state.json``): files that travel between users, so their sources are not trusted to run
    commands (``pipe:``)."""
    return any((path.parent / name).is_file() for name in (BUNDLE_META, STATE_FILE))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- YAML (file or built-in) <- ``key=value`` overrides, validated into a Config."""
    tree = to_dict(Config())
    if name_or_path:
        tree = merge(tree, read_config_tree(name_or_path))
    for assignment in overrides:
        apply_override(tree, assignment)
    return from_dict(Config, tree)
