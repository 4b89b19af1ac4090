"""Resolve the route template (``http.route``) of a request.

Works after the application has routed the request:

* FastAPI stores the matched ``APIRoute`` in ``scope["route"]``; every
  ``Mount`` on the way appended its prefix to ``scope["root_path"]``, so the
  template is that prefix plus the route's ``path_format``.
* Anything else (plain Starlette ``Route``/``Mount``/``Host``, a Starlette
  route inside a FastAPI app) is resolved by matching a minimal copy of the
  original scope against the application's routes, as Starlette's router
  does: first full match, else first partial match, recursing into mounts.

Never raises: returns ``None`` when no route matched.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

__all__ = ["resolve_route"]

_MAX_DEPTH = 16


def resolve_route(
    scope: MutableMapping[str, Any], entry_app: Any, entry_root_path: str, entry_path: str
) -> str | None:
    """Return the template of the route that handled ``scope``, or ``None``.

    ``entry_app``, ``entry_root_path`` and ``entry_path`` are the values of
    ``scope["app"]``, ``scope["root_path"]`` and ``scope["path"]`` when the
    request reached fastprof (routing mutates the scope in place).
    """
    route = scope.get("route")
    if route is not None:
        path_format = getattr(route, "path_format", None)
        if isinstance(path_format, str):
            root_path = scope.get("root_path", "")
            prefix = (
                root_path[len(entry_root_path) :] if root_path.startswith(entry_root_path) else ""
            )
            return prefix + path_format
    routes = _routes_of(entry_app)
    if routes is None:
        return None
    probe: dict[str, Any] = {
        "type": scope["type"],
        "path": entry_path,
        "root_path": entry_root_path,
        "method": scope.get("method", "GET"),
        "headers": scope.get("headers", []),
        "path_params": {},
    }
    try:
        return _match(routes, probe, "", 0)
    except Exception:
        return None


def _routes_of(app: Any) -> list[Any] | None:
    seen = 0
    while app is not None and seen < _MAX_DEPTH:
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):
            return routes
        router = getattr(app, "router", None)
        if router is not None and router is not app:
            app = router
        else:
            app = getattr(app, "app", None)
        seen += 1
    return None


def _match(routes: list[Any], scope: dict[str, Any], prefix: str, depth: int) -> str | None:
    from starlette.routing import Match

    if depth > _MAX_DEPTH:
        return None
    partial: tuple[Any, dict[str, Any]] | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            return _describe(route, {**scope, **child}, prefix, depth)
        if match == Match.PARTIAL and partial is None:
            partial = (route, child)
    if partial is not None:
        route, child = partial
        return _describe(route, {**scope, **child}, prefix, depth)
    return None


def _describe(route: Any, scope: dict[str, Any], prefix: str, depth: int) -> str | None:
    from starlette.routing import Host, Mount

    if isinstance(route, Host):
        return _match(route.routes, scope, prefix, depth + 1)
    if isinstance(route, Mount):
        mount_prefix = prefix + route.path
        inner = _match(route.routes, scope, mount_prefix, depth + 1)
        return inner if inner is not None else mount_prefix + "/{path}"
    path_format = getattr(route, "path_format", None)
    if isinstance(path_format, str):
        return prefix + path_format
    return None
