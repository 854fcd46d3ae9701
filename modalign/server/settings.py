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

from modalign.core.errors import UserInputError

__all__ = ["ServeLimits", "ServeSettings", "check_bind", "is_loopback", "read_token"]

MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ServeLimits:
    """Bounds that keep one request from exhausting the server.

    Attributes:
        max_body_bytes: largest request body (an upload plus its multipart framing).
        max_k: largest ``k`` / ``num_images``.
        max_query_chars: longest inline (text) query.
        decode_timeout_s: longest time decoding one uploaded file may take.
        max_batch: most queries encoded in one forward pass.
        max_pending: most queries waiting for the encoder before new ones get 503.
    """

    max_body_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    max_query_chars: int = 1000
    decode_timeout_s: float = 10.0
    max_batch: int = 32
    max_pending: int = 256

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_k", "max_query_chars", "max_batch", "max_pending"):
            if int(getattr(self, name)) < 1:
                raise UserInputError(f"serve limit {name} must be >= 1, got {getattr(self, name)}")
        if self.decode_timeout_s <= 0:
            raise UserInputError(
                f"serve limit decode_timeout_s must be > 0, got {self.decode_timeout_s}"
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
