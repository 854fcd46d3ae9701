"""Typed config plumbing: plain dicts (YAML) <-> dataclasses, with errors that name the key.

Each layer declares its own config dataclasses (``DataConfig`` here, ``ModelConfig`` in
``modalign.pretrain`` ...); this module only converts and validates, so it lives in the lowest
layer and every layer can use it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from modalign.core.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    ``where`` is the dotted key prefix used in error messages (``"train"``, ``"model.towers"``).
    """
    return _convert(cls, data, where)


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain YAML/JSON-able structure."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump_yaml(obj: Any) -> str:
    """Serialise a config dataclass as YAML (keys in declaration order)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override to a plain dict tree (value parsed as YAML).

    Validation happens when the tree is converted with :func:`from_dict`, so an unknown key
    in an override gets the same message as one in the file.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.steps=100")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    label = where or "<root>"
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{label}: no type fits {value!r}")
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{label}: {value!r} is not a valid choice; valid: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {
            str(k): _convert(val_tp, v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if tp is Any:
        return value
    return _convert_scalar(tp, value, label)


def _convert_scalar(tp: Any, value: Any, label: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; users mean a number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{label}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where or '<root>'}: expected a section (mapping), got {value!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(fields)}")
    kwargs = {
        name: _convert(hints[name], raw, f"{where}.{name}" if where else name)
        for name, raw in value.items()
    }
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or '<root>'}: {exc}") from None
    return obj


def parse_yaml_mapping(text: str, where: str) -> dict[str, Any]:
    """YAML text whose top level is a mapping (empty -> ``{}``); ConfigError naming ``where``."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: top level must be a mapping of sections")
    return tree
