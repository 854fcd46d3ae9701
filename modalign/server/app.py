"""The ASGI application and the uvicorn runner.

``create_app(searcher, settings)`` assembles: ``nosniff`` header -> token guard (when a token is
set) -> body-size limit -> FastAPI routes, a JSON error for every failure (a broken request
never kills the server), the web page and its static files, and the micro-batching worker
started/stopped with the app's lifespan. ``serve(...)`` runs it on uvicorn.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modalign.server.batching import MicroBatcher
from modalign.server.errors import RequestError, error_body
from modalign.server.guards import BodyLimit, NoSniff, TokenGuard
from modalign.server.handling import ServerState
from modalign.server.routes import build_router
from modalign.server.searcher import Searcher
from modalign.server.settings import ServeSettings, check_bind

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)


def create_app(searcher: Searcher, settings: ServeSettings | None = None) -> Any:
    """The ASGI app serving ``searcher`` (FastAPI wrapped in the token and body-size guards,
    every answer ``nosniff``)."""
    settings = settings or ServeSettings()
    limits = settings.limits
    state = ServerState(
        searcher, limits, MicroBatcher(searcher, limits.max_batch, limits.max_pending)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.stop()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="modalign search", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.modalign = state
    app.include_router(build_router(state))
    _add_error_handlers(app)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    guarded: Any = BodyLimit(app, limits.max_body_bytes)
    if settings.token:
        guarded = TokenGuard(guarded, settings.token)
    # plain ASGI, outermost: also the guards' and the 500 handler's answers (a framework
    # "http" middleware would add a task and two memory streams to every request)
    return NoSniff(guarded)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(exc.field, exc.message), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body("path", f"{request.url.path}: {exc.detail}"), status_code=exc.status_code
        )

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(
            error_body("server", f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500,
        )


def serve(
    searcher: Searcher, settings: ServeSettings, log_level: str = "info", torch_threads: int = 1
) -> None:
    """Run the app on uvicorn until interrupted (refuses a non-loopback bind without a token).

    ``torch_threads`` sets PyTorch's intra-op threads for this process (an ONNX Runtime model
    gets the same number for its sessions when it is loaded: ``modalign.serve``). One is the
    default:
    the server's parallelism is the batch, and on a loaded machine a 2-thread OpenMP region
    waits for a second core (measured on the 2-core box: text 0.8 vs 17 ms, image 6 vs 20 ms
    per query). FAISS gets one thread: it is asked one query at a time.
    """
    import faiss
    import torch
    import uvicorn

    check_bind(settings)
    torch.set_num_threads(max(1, torch_threads))
    faiss.omp_set_num_threads(1)
    app = create_app(searcher, settings)
    # The loaded index and the app's lookup tables are millions of long-lived objects; without
    # this every full collection walks them all, a pause of tens of ms in the middle of a query.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
