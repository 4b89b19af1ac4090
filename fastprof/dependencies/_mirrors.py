"""Mirrors of FastAPI dependants whose dependencies call fastprof's wrappers.

fastprof never mutates the application's routes: the solver is handed a
*mirror* of the dependant (a shallow copy) whose sub-dependencies call the
wrappers. Mirrors are built once per dependant and mode and cached (bounded),
so the request path does one dict lookup.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from fastprof.dependencies._calls import CallInfo, Dependant, info_of
from fastprof.dependencies._wrappers import is_marked, wrapper_for

__all__ = ["MAX_MIRRORS", "MirrorEntry", "mirror_entry", "mirror_of", "sub_mirrors"]

MAX_MIRRORS: Final = 4096

MirrorEntry = tuple[Dependant, Dependant, CallInfo | None]
"""``(dependant, its mirror, the CallInfo of the mirror's call or None)``."""

#: (marked_only, root) -> {id(dependant): (dependant, mirror, CallInfo of mirror.call or None)}
_mirrors: dict[tuple[bool, bool], dict[int, MirrorEntry]] = {
    (marked, root): {} for marked in (False, True) for root in (False, True)
}
#: The sub-dependant caches, indexed by ``marked_only`` (the solver's hot path).
sub_mirrors: Final = (_mirrors[(False, False)], _mirrors[(True, False)])


def _wrapper_if_timed(call: Any, marked_only: bool) -> Any:
    if marked_only and not is_marked(call):
        return call
    return wrapper_for(call)


def mirror_of(dependant: Dependant, marked_only: bool, root: bool) -> Dependant:
    """``dependant`` with every dependency below it calling fastprof's wrappers."""
    return mirror_entry(dependant, marked_only, root)[1]


def mirror_entry(dependant: Dependant, marked_only: bool, root: bool) -> MirrorEntry:
    """``(dependant, its mirror, the CallInfo of the mirror's call or None)``.

    Built once per dependant (and mode) and cached: the request path only does a
    dict lookup. Mirrors are fixed points (a mirror's mirror is itself), so the
    sub-dependants FastAPI hands back to the solver are recognised at once.
    """
    cache = _mirrors[(marked_only, root)]
    entry = cache.get(id(dependant))
    if entry is not None and entry[0] is dependant:
        return entry
    mirror = dependant
    changed = False
    subs: list[Dependant] = []
    for sub in dependant.dependencies:
        sub_mirror = mirror_of(sub, marked_only, root=False)
        changed = changed or sub_mirror is not sub
        subs.append(sub_mirror)
    call = dependant.call if root else _wrapper_if_timed(dependant.call, marked_only)
    if changed or call is not dependant.call:
        mirror = copy.copy(dependant)
        mirror.dependencies = subs
        mirror.call = call
    info = None if root else info_of(mirror.call)
    if len(cache) >= MAX_MIRRORS:
        cache.clear()
    entry = cache[id(dependant)] = (dependant, mirror, info)
    if mirror is not dependant:
        subs_cache = sub_mirrors[marked_only]
        if len(subs_cache) >= MAX_MIRRORS:
            subs_cache.clear()
        subs_cache[id(mirror)] = (mirror, mirror, info_of(call))
    return entry

