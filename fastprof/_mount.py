"""Operator pages (profile viewer, dashboard): mount one without revealing that it
exists, and answer with the headers every such page sends (:func:`send_page`).

``app.mount("/_fastprof/profiles", viewer)`` leaves ``GET /_fastprof/profiles``
(no trailing slash) to the router, which answers it with a redirect to the
mounted path: a different answer from any unknown path's, so anyone can tell the
page is there. :func:`mount_hidden` also routes the bare path to the page, and
lets the page answer refusals with the application's own "not found" response
(``scope["fastprof.not_found"]``), so a refused request gets exactly what any
unknown path gets.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["NOT_FOUND_KEY", "mount_hidden", "not_found", "send_page"]

NOT_FOUND_KEY: Final = "fastprof.not_found"


class _Hidden:
    """The page, with the router's not-found handler published in the scope."""

    def __init__(self, app: ASGIApp, not_found: Any, exact_path: str | None) -> None:
        self.app = app
        self.not_found = not_found
        self.exact_path = exact_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        child = dict(scope)
        child[NOT_FOUND_KEY] = self.not_found
        if self.exact_path is not None:
            # The bare mount path: as Mount would call it for "<path>/".
            child["root_path"] = scope.get("root_path", "") + self.exact_path
        await self.app(child, receive, send)


def mount_hidden(app: Any, path: str, page: ASGIApp) -> None:
    """Mount ``page`` at ``path`` (and at ``path`` without a trailing slash).

    ``app`` is a Starlette or FastAPI application (anything with a Starlette
    ``router``).
    """
    if not isinstance(path, str) or not path.startswith("/") or path.rstrip("/") == "":
        raise ValueError(f"path: expected a path like '/_fastprof/profiles', got {path!r}")
    router = getattr(app, "router", None)
    if router is None or not hasattr(router, "routes"):
        raise ValueError("app: expected a Starlette or FastAPI application")
    path = path.rstrip("/")
    not_found = getattr(router, "not_found", None)
    router.routes.append(Route(path, endpoint=_Hidden(page, not_found, path),
                               include_in_schema=False))
    router.routes.append(Mount(path, app=_Hidden(page, not_found, None)))


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer as the application answers an unknown path, else a bare ``404``."""
    handler = scope.get(NOT_FOUND_KEY)
    if handler is not None:
        await handler(scope, receive, send)
        return
    body = b"Not Found"
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode("latin-1")),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_page(
    send: Send,
    status: int,
    body: bytes,
    media: str,
    csp: str | None,
    disposition: str | None = None,
) -> None:
    """Answer with ``body``: never cached, no MIME sniffing, no referrer, and the
    page's content security policy (``csp``) and ``Content-Disposition`` if given."""
    headers = [
        (b"content-type", media.encode("latin-1")),
        (b"content-length", str(len(body)).encode("latin-1")),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]
    if csp is not None:
        headers.append((b"content-security-policy", csp.encode("latin-1")))
    if disposition is not None:
        headers.append((b"content-disposition", disposition.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
