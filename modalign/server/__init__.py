"""``modalign serve``: cross-modal search over HTTP (FastAPI on uvicorn) and a web page.

Modules: :mod:`.searcher` (model + index, batched encode/search, media listing),
:mod:`.batching` (the encoder worker thread and micro-batches), :mod:`.queries` (request
parsing and limits, errors naming the field), :mod:`.guards` (token and body-size ASGI
middleware), :mod:`.routes` and :mod:`.app` (the ASGI app, uvicorn runner), :mod:`.command`
(the CLI entry), ``static/`` (the page: HTML + JS + CSS, no build step).
"""

from __future__ import annotations

from modalign.server.command import add_serve_command, cmd_serve
from modalign.server.settings import ServeLimits, ServeSettings

__all__ = ["ServeLimits", "ServeSettings", "add_serve_command", "cmd_serve", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`modalign.server.app.create_app` (imported lazily: FastAPI is heavy)."""
    from modalign.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)
