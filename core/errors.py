"""Error types shared by every layer.

Exit-status contract (``docs/design.md``): a :class:`UserInputError` (bad usage, config or
input) exits with 2; anything else exits with 1.
"""

from __future__ import annotations


class ModalignError(Exception):
    """Base class for errors modalign raises on purpose."""

    exit_code = 1


class UserInputError(ModalignError):
    """The user can fix this: a bad config key, a missing file, a malformed manifest."""

    exit_code = 2


class ConfigError(UserInputError):
    """Unknown key, wrong type or invalid value in a config or ``--set`` override."""


class DataError(UserInputError):
    """A data source cannot be used at all (malformed manifest, no usable rows)."""
