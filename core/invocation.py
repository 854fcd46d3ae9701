"""The command line a process was started with, as artifacts record it (model cards, reports).

The CLI states its own words (``modalign pretrain --set ...``) with :func:`invoked_as`; library
callers without one get ``python <script> ...`` from ``sys.argv``. A context variable, so two
commands run in one process (tests, notebooks) never see each other's words.
"""

from __future__ import annotations

import contextvars
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_COMMAND: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "modalign_command", default=None
)


@contextmanager
def invoked_as(words: Sequence[str]) -> Iterator[None]:
    """Within the block, :func:`current_command` is ``words`` (e.g. ``["modalign", "pretrain",
    "--set", "train.steps=10"]``)."""
    token = _COMMAND.set(tuple(str(w) for w in words))
    try:
        yield
    finally:
        _COMMAND.reset(token)


def current_command() -> str:
    """The exact command line of this run, shell-quoted (``sys.argv`` when no CLI stated it)."""
    words = _COMMAND.get()
    if words is None:
        words = ("python", *sys.argv)
    return shlex.join(words)


__all__ = ["current_command", "invoked_as"]
