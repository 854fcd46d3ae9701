"""ASGI middleware run before any route: token check, request body size limit, and the
``nosniff`` header on every answer.

All are plain ASGI (no framework), so they act before a body is parsed: an unauthorised or
oversized request costs the server nothing but its headers (and at most ``max_body_bytes``
when the client sends no ``Content-Length``); none adds a task or stream per request.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from modalign.server.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["BodyLimit", "NoSniff", "TokenGuard"]

OPEN_PATHS = frozenset({"/healthz"})


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list | None = None
) -> None:
    """Send a complete JSON response from ASGI middleware."""
    data = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class TokenGuard:
    """Every HTTP route but ``/healthz`` needs ``Authorization: Bearer TOKEN``.

    GET and HEAD requests may carry the token as ``?access_token=TOKEN`` instead (RFC 6750
    section 2.3), which is how the web page loads media into ``<img>``/``<audio>`` tags.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self._token = app, token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # CORS preflights carry no credentials by design; no route answers OPTIONS itself
        preflight = scope.get("method") == "OPTIONS"
        if (
            scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or preflight
            or self._allowed(scope)
        ):
            await self.app(scope, receive, send)
            return
        given = self._given(scope)
        msg = (
            "missing token: send 'Authorization: Bearer TOKEN'" if given is None else "wrong token"
        )
        await send_json(
            send, 401, error_body("authorization", msg), [(b"www-authenticate", b"Bearer")]
        )

    def _given(self, scope: Scope) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, cred = value.partition(b" ")
                return cred.strip() if scheme.lower() == b"bearer" else b""
        if scope.get("method") in ("GET", "HEAD"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if "access_token" in query:
                return query["access_token"][0].encode("utf-8")
        return None

    def _allowed(self, scope: Scope) -> bool:
        given = self._given(scope)
        return given is not None and hmac.compare_digest(given, self._token)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 naming the field ``body``.

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the body
    is read (at most ``max_bytes`` + one chunk) and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        limit = (
            f"{self.max_bytes / 1048576:.1f} MiB"
            if self.max_bytes >= 1048576
            else f"{self.max_bytes} bytes"
        )
        await send_json(
            send, 413, error_body("body", f"request body is larger than the limit of {limit}")
        )


class NoSniff:
    """Every HTTP answer says ``X-Content-Type-Options: nosniff`` (unless it sets the header
    itself): a browser takes each answer as the type it states, never guesses one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-content-type-options" for name, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_nosniff)
