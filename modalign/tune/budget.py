"""``--budget 20`` (trials) or ``--budget 30m`` / ``90s`` / ``2h`` (wall time)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from modalign.core.errors import UserInputError

__all__ = ["Budget", "parse_budget"]

_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Budget:
    trials: int | None = None  # total trials in the study (resumed trials count)
    seconds: float | None = None  # wall time of this invocation


def parse_budget(text: str) -> Budget:
    """A trial count (``20``) or a duration (``45s``, ``30m``, ``1.5h``)."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+", t):
        if int(t) < 1:
            raise UserInputError("--budget: at least 1 trial")
        return Budget(trials=int(t))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh])", t)
    if not m or float(m.group(1)) <= 0:
        raise UserInputError(
            f"--budget {text!r}: expected a trial count (20) or a duration (90s, 30m, 2h)"
        )
    return Budget(seconds=float(m.group(1)) * _UNITS[m.group(2)])
