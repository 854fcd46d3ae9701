"""HTTP errors with a JSON body naming the request field at fault."""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "error_body"]


class RequestError(Exception):
    """A client error: ``status`` (4xx/503), the ``field`` at fault and how to fix it."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


def error_body(field: str, message: str) -> dict[str, Any]:
    """``{"error": {"field": ..., "message": ...}}``, the body of every error response."""
    return {"error": {"field": field, "message": message}}
