"""Typed config plumbing: plain dicts (YAML) <-> dataclasses, with errors that name the key.

Each layer declares its own config dataclasses (``DataConfig`` here, ``ModelConfig`` in
``modalign.pretrain`` ...); this module only converts and validates, so it lives in the lowest
layer and every layer can use it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from modalign.core.errors import ConfigError

T = TypeVar("T")


class _TypeMismatch(ConfigError):
    """A value of the wrong shape for its declared type (vs. a right shape with a bad part)."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The declared range of a numeric config key, attached with ``typing.Annotated``::

        embed_dim: Annotated[int, Range(ge=1)] = 256
        hflip: Annotated[float, Range(ge=0, le=1)] = 0.5
        betas: list[Annotated[float, Range(ge=0, lt=1)]] = ...

    :func:`from_dict` checks it when the config is built (ConfigError naming the key). Floats
    must also be finite (NaN/inf are refused for every key, with or without a range).
    ``note`` says what special values mean (``"0 = off"``).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def describe(self) -> str:
        """E.g. ``"a number >= 0 and < 1 (0 = off)"``."""
        parts = [
            f"{op} {_num(bound)}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        text = "a number " + " and ".join(parts) if parts else "a finite number"
        return f"{text} ({self.note})" if self.note else text

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def check(self, value: float, key: str) -> None:
        """Raise ConfigError naming ``key`` unless ``value`` lies in the range."""
        if not self.contains(value):
            flag = key.split("[", 1)[0]
            raise ConfigError(
                f"{key}={value!r} is out of range: must be {self.describe()} (--set {flag}=...)"
            )


def arg_type(tp: type, rng: Range | None = None) -> Any:
    """An ``argparse`` ``type=`` for a numeric flag: parses ``tp`` (int or float), refuses
    NaN/inf and values outside ``rng`` (argparse then exits 2 naming the flag)::

        p.add_argument("--max-upload-mb", type=arg_type(float, POSITIVE), default=10.0)
    """
    import argparse

    def parse(text: str) -> Any:
        try:
            value = tp(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {tp.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if rng is not None and not rng.contains(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be {rng.describe()}")
        return value

    parse.__name__ = tp.__name__  # argparse names the type in its messages
    return parse


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# The ranges most keys need.
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
AT_LEAST_1 = Range(ge=1)
FRACTION = Range(ge=0, le=1)
SEED = Range(ge=0, lt=2**32, note="numpy and torch accept seeds below 2**32")


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
    if origin is Annotated:
        inner, *extras = get_args(tp)
        out = _convert(inner, value, where)
        for extra in extras:
            if isinstance(extra, Range) and isinstance(out, (int, float)):
                extra.check(out, label)
        return out
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors, mismatches = [], []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except _TypeMismatch as exc:
                mismatches.append(str(exc))
            except ConfigError as exc:  # the value had this shape but a bad part: say which
                errors.append(str(exc))
        if errors:
            raise ConfigError(errors[0])
        raise _TypeMismatch(
            mismatches[0] if len(mismatches) == 1 else f"{label}: no type fits {value!r}"
        )
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{label}: {value!r} is not a valid choice; valid: {', '.join(map(str, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch(f"{label}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch(f"{label}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {
            str(k): _convert(val_tp, v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
        }
    if tp is Any:
        return value
    return _convert_scalar(tp, value, label)


def _convert_scalar(tp: Any, value: Any, label: str) -> Any:
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        # YAML 1.1 reads "5e-4" (no dot) as a string; users mean a number.
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{label}={value!r} is not valid: must be a finite number")
            return number
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise _TypeMismatch(
        f"{label}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if value is None:
        value = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    if not isinstance(value, dict):
        raise _TypeMismatch(f"{where or '<root>'}: expected a section (mapping), got {value!r}")
    hints = get_type_hints(cls, include_extras=True)
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


def check_ranges(obj: Any, where: str) -> None:
    """Check the declared :class:`Range` of every field of dataclass instance ``obj`` (and that
    its floats are finite), for configs built in Python rather than by :func:`from_dict`.
    Nested dataclasses are left to their own ``__post_init__``. ConfigError names the key."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        if f.init:
            _check_value(hints[f.name], getattr(obj, f.name), f"{where}.{f.name}")


def _check_value(tp: Any, value: Any, key: str) -> None:
    origin = get_origin(tp)
    if origin is Annotated:
        inner, *extras = get_args(tp)
        _check_value(inner, value, key)
        for extra in extras:
            if isinstance(extra, Range) and _is_number(value):
                extra.check(value, key)
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is not type(None) and _fits(arg, value):
                _check_value(arg, value, key)
                return
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        (item_tp, *_) = get_args(tp) or (Any,)
        for i, v in enumerate(value):
            _check_value(item_tp, v, f"{key}[{i}]")
    elif origin is dict and isinstance(value, dict):
        _, val_tp = get_args(tp) or (str, Any)
        for k, v in value.items():
            _check_value(val_tp, v, f"{key}.{k}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not valid: must be a finite number")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` is of the (possibly generic / annotated) type ``tp``, roughly."""
    base = get_origin(tp) or tp
    if base is Annotated:
        return _fits(get_args(tp)[0], value)
    if base is float:
        return _is_number(value)
    return isinstance(base, type) and isinstance(value, base)


def unranged_numeric_keys(cls: type, where: str = "") -> list[str]:
    """Dotted keys of ``cls`` (nested dataclasses, list/dict/optional values followed) whose
    int or float values carry no :class:`Range`: every numeric key should declare one."""
    out: list[str] = []
    hints = get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        if f.init:
            _collect_unranged(hints[f.name], f"{where}.{f.name}" if where else f.name, out, False)
    return out


def _collect_unranged(tp: Any, key: str, out: list[str], ranged: bool) -> None:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        out.extend(unranged_numeric_keys(tp, key))
    elif origin is Annotated:
        inner, *extras = get_args(tp)
        has = ranged or any(isinstance(e, Range) for e in extras)
        _collect_unranged(inner, key, out, has)
    elif origin in (Union, types.UnionType, list, tuple):
        for arg in get_args(tp):
            if arg is not type(None) and arg is not Ellipsis:
                _collect_unranged(arg, f"{key}[]" if origin in (list, tuple) else key, out, ranged)
    elif origin is dict:
        _collect_unranged(get_args(tp)[1], f"{key}.*", out, ranged)
    elif tp in (int, float) and not ranged:
        out.append(key)
