"""Registries: one place to add an entry to a strategy axis (tower, modality, loss, head...).

An entry is a factory plus an options dataclass. Config files name the entry (``kind``) and give
its options as a mapping, which :meth:`Registry.options` checks against the dataclass (unknown
key or wrong type -> :class:`~modalign.core.errors.ConfigError` naming the key), so options
live nested in config and are saved, fully resolved, in the bundle that uses them.

Third-party packages add entries through an entry-point group (e.g. ``modalign.towers``): each
entry point names a hook ``hook(registry)`` that calls ``registry.add(...)`` for its entries.
Entry points are loaded lazily, the first time a name is not found among built-ins, and every
entry remembers the distribution that provided it, so bundles can record which plugins built
them and refuse to load, naming the package, when one is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from modalign.core.config_io import from_dict, to_dict
from modalign.core.errors import ConfigError, UserInputError

log = logging.getLogger(__name__)

F = TypeVar("F")


@dataclass(frozen=True)
class NoOptions:
    """Options of an entry that takes none."""


@dataclass(frozen=True)
class Entry(Generic[F]):
    """One registered strategy: its factory, options type and where it came from."""

    name: str
    factory: F
    options: type = NoOptions
    provider: str = "modalign"  # distribution name ("modalign" for built-ins)
    version: str = ""
    doc: str = ""


class PluginMissing(UserInputError):
    """An artifact needs an entry whose plugin package is not installed."""


class Registry(Generic[F]):
    """Named entries of one kind, with entry-point discovery.

    >>> HEADS: Registry[HeadFactory] = Registry("fusion head", "modalign.heads")
    >>> @HEADS.register("concat", options=ConcatOptions)
    ... def concat(dims, num_classes, opts): ...
    """

    def __init__(self, what: str, group: str | None = None) -> None:
        self.what = what
        self.group = group
        self._entries: dict[str, Entry[F]] = {}
        self._loaded_entry_points = False
        self._provider: tuple[str, str] | None = None  # set while an entry point registers

    # -- adding ---------------------------------------------------------------------------
    def register(
        self, name: str, options: type = NoOptions, *, replace: bool = False
    ) -> Callable[[F], F]:
        """Decorator: register ``factory`` under ``name`` with its options dataclass."""

        def deco(factory: F) -> F:
            self.add(name, factory, options, replace=replace)
            return factory

        return deco

    def add(
        self, name: str, factory: F, options: type = NoOptions, *, replace: bool = False
    ) -> None:
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"{self.what} {name!r}: options must be a dataclass, got {options!r}")
        if name in self._entries and not replace:
            old = self._entries[name]
            if old.factory is factory:
                return
            raise ValueError(
                f"{self.what} {name!r} is already registered (by {old.provider}); "
                "pass replace=True to override it"
            )
        provider, version = self._provider or ("modalign", "")
        doc = (getattr(factory, "__doc__", None) or "").strip().split("\n")[0]
        self._entries[name] = Entry(name, factory, options, provider, version, doc)

    def remove(self, name: str) -> None:
        """Forget an entry (tests and notebooks that register temporary entries)."""
        self._entries.pop(name, None)

    # -- looking up ---------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._loaded_entry_points or not self.group:
            return
        self._loaded_entry_points = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            self._provider = (
                getattr(dist, "name", None) or ep.module.split(".")[0],
                getattr(dist, "version", "") or "",
            )
            try:
                hook = ep.load()
                hook(self)  # a plugin's hook registers its entries: ``def hook(registry): ...``
            except Exception as exc:  # a broken plugin must not break unrelated commands
                log.warning(
                    "%s plugin %r (%s) failed to load: %s", self.what, ep.name, ep.value, exc
                )
            finally:
                self._provider = None

    def __contains__(self, name: object) -> bool:
        if name in self._entries:
            return True
        self._load_entry_points()
        return name in self._entries

    def get(self, name: str, where: str = "") -> Entry[F]:
        """The entry called ``name``; unknown -> ConfigError naming ``where`` and the choices."""
        if name not in self:
            label = f"{where}: " if where else ""
            raise ConfigError(
                f"{label}unknown {self.what} {name!r}; valid: {', '.join(self.names())} "
                f"(plugins add more through the {self.group!r} entry-point group)"
                if self.group
                else f"{label}unknown {self.what} {name!r}; valid: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[F]]:
        self._load_entry_points()
        return iter([self._entries[n] for n in sorted(self._entries)])

    # -- options ------------------------------------------------------------------------
    def options(self, name: str, raw: Mapping[str, Any] | Any | None, where: str) -> Any:
        """Typed options for entry ``name`` from a config mapping (or an options instance)."""
        cls = self.get(name, where).options
        if isinstance(raw, cls):
            return raw
        return from_dict(cls, dict(raw or {}), where)

    def options_dict(self, name: str, opts: Any) -> dict[str, Any]:
        """Plain-data form of ``opts`` (for config.yaml / bundle JSON)."""
        return to_dict(opts) if dataclasses.is_dataclass(opts) else dict(opts or {})

    def provenance(self, name: str) -> dict[str, str]:
        """``{"name", "provider", "version"}`` of an entry, recorded in artifacts."""
        e = self.get(name)
        return {"name": name, "provider": e.provider, "version": e.version}

    def require(self, name: str, provider: str, what_needs_it: str) -> Entry[F]:
        """Like :meth:`get`, but a missing plugin names the package to install."""
        if name in self:
            return self._entries[name]
        hint = (
            f"pip install {provider}" if provider and provider != "modalign" else "upgrade modalign"
        )
        raise PluginMissing(
            f"{what_needs_it} needs the {self.what} {name!r} from package {provider!r}, which is "
            f"not installed; {hint}"
        )
