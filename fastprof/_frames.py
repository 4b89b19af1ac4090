"""Tell application frames from library frames (stdlib, site-packages, fastprof)."""

from __future__ import annotations

import os
import sysconfig
from typing import Final

__all__ = ["is_library"]


def _library_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib", "purelib", "platlib")
    prefixes = {paths[key] for key in keys if key in paths}
    prefixes.add(os.path.dirname(os.path.abspath(__file__)))
    return tuple(sorted(p.rstrip(os.sep) + os.sep for p in prefixes))


_LIBRARY_PREFIXES: Final = _library_prefixes()


def is_library(path: str) -> bool:
    """True for frames of the standard library, installed packages, fastprof or ``<...>``."""
    return path.startswith("<") or path.startswith(_LIBRARY_PREFIXES)
