"""Evicting the oldest entries of an in-memory store kept within its caps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

__all__ = ["evict_oldest"]

K = TypeVar("K")
V = TypeVar("V")


def evict_oldest(
    items: OrderedDict[K, V],
    total_bytes: int,
    *,
    max_count: int,
    max_bytes: int,
    deadline: float,
    measure: Callable[[V], tuple[int, float]],
) -> int:
    """Drop the oldest entries (first inserted first) while ``items`` holds more than
    ``max_count`` of them or ``max_bytes`` in all, or while the oldest was created
    before ``deadline``; return the bytes left. ``measure(entry)`` is
    ``(its size in bytes, when it was created)``. Call it with the store's lock held.
    """
    while items:
        size, created = measure(next(iter(items.values())))
        if len(items) > max_count or total_bytes > max_bytes or created < deadline:
            items.popitem(last=False)
            total_bytes -= size
        else:
            break
    return total_bytes
