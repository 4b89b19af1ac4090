"""Validation of configuration options: bad values fail at start-up with a ValueError
that names the option and says what is allowed."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["check_header_name", "check_int", "check_rate", "check_seconds"]

_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9\-]{1,64}")


def check_int(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: expected an int between {low} and {high}, got {value!r}")
    return value


def check_seconds(name: str, value: object, low: float, high: float) -> float:
    """``value`` as seconds in ``[low, high]`` (``bool`` is refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name}: expected seconds between {low:g} and {high:g}, got {value!r}")
    return float(value)


def check_rate(name: str, value: object) -> float:
    """``value`` as a probability in ``[0, 1]`` (NaN and ``bool`` are refused)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= value <= 1.0  # also False for NaN
    ):
        raise ValueError(f"{name}: expected a rate between 0 and 1, got {value!r}")
    return float(value)


def check_header_name(name: str, value: object) -> bytes | None:
    """``value``, an HTTP header name such as ``X-Request-ID`` or ``None``, as the
    lower-case bytes ASGI servers use (``None`` stays ``None``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"{name}: expected a header name like 'X-Request-ID', got {value!r}")
    return value.lower().encode("latin-1")
