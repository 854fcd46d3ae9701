"""Server settings: limits on every request, the bind address and the access token.

Bound to a loopback address the server may run without a token; bound to any other address
it refuses to start without one (:func:`check_bind`), and with a token every route but
``/healthz`` needs ``Authorization: Bearer TOKEN`` (GET routes also take ``?access_token=``
so that ``<img src>`` and the page itself can carry it).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from modalign.core.config_io import AT_LEAST_1, POSITIVE, check_ranges
from modalign.core.errors import UserInputError

__all__ = ["ServeLimits", "ServeSettings", "check_bind", "is_loopback", "read_token"]

MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ServeLimits:
    """Bounds that keep one request from exhausting the server.

    Attributes:
        max_body_bytes: largest request body (an upload plus its multipart framing).
        max_k: largest ``k`` / ``num_images`` (results with their records).
        max_result_ids: largest ``num_result_ids`` of ``/knn-service`` (ids and scores only;
            clip-front asks for 3000, its download button for 10000).
        max_query_chars: longest inline (text) query.
        decode_timeout_s: longest time decoding one uploaded file may take.
        max_decode_bytes: most memory decoding one upload may take (estimated from its header:
            pixels x bytes per pixel at each step, audio frames x channels).
        max_decode_total_bytes: most memory all uploads being decoded at once may take; past
            it a new upload gets 429 (retry) before anything is decoded.
        max_batch: most queries encoded in one forward pass.
        max_pending: most queries waiting for the encoder before new ones get 503.
    """

    max_body_bytes: Annotated[int, AT_LEAST_1] = 10 * 1024 * 1024
    max_k: Annotated[int, AT_LEAST_1] = 100
    max_result_ids: Annotated[int, AT_LEAST_1] = 10_000
    max_query_chars: Annotated[int, AT_LEAST_1] = 1000
    decode_timeout_s: Annotated[float, POSITIVE] = 10.0
    max_decode_bytes: Annotated[int, AT_LEAST_1] = 512 * 1024 * 1024
    max_decode_total_bytes: Annotated[int, AT_LEAST_1] = 1024 * 1024 * 1024
    max_batch: Annotated[int, AT_LEAST_1] = 32
    max_pending: Annotated[int, AT_LEAST_1] = 256

    def __post_init__(self) -> None:
        check_ranges(self, "serve limit")  # ranges declared on the fields; NaN/inf refused
        if self.max_decode_total_bytes < self.max_decode_bytes:
            raise UserInputError(
                "serve limit max_decode_total_bytes must be >= max_decode_bytes "
                "(--max-decode-total-mb >= --max-decode-mb)"
            )


@dataclass(frozen=True)
class ServeSettings:
    """Where the server listens, who may call it, and its limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    cors_origins: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); a hostname is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: ServeSettings) -> None:
    """Refuse (exit 2) to listen beyond loopback without a token."""
    if not is_loopback(settings.host) and not settings.token:
        raise UserInputError(
            f"--host {settings.host} is reachable from other machines, so the server needs a "
            "token: pass --token-file FILE (a file holding one secret line of at least "
            f"{MIN_TOKEN_CHARS} characters, e.g. `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))' > token.txt`), or bind to 127.0.0.1"
        )
    if not 0 <= settings.port <= 65535:
        raise UserInputError(f"--port {settings.port}: must be in 0..65535")


def read_token(path: str | os.PathLike[str]) -> str:
    """The token held in ``path`` (first line, stripped); exit 2 when unusable."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--token-file {p}: cannot read it ({exc})") from None
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise UserInputError(
            f"--token-file {p}: the token must be at least {MIN_TOKEN_CHARS} characters on the "
            "first line"
        )
    if not token.isascii() or not token.isprintable():
        raise UserInputError(f"--token-file {p}: the token must be printable ASCII")
    if p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import logging

        logging.getLogger(__name__).warning(
            "%s is readable by other users; `chmod 600 %s` keeps the token private", p, p
        )
    return token
