"""A small ASGI app that lists and serves stored profiles, behind an auth hook.

Mount it where only operators reach it::

    app.mount("/_fastprof/profiles", profiling.viewer())

Routes (relative to the mount point)::

    GET /                       list of profiles (HTML; ``?format=json`` for JSON)
    GET /<id>                   pyinstrument HTML
    GET /<id>?format=speedscope speedscope JSON (open in https://www.speedscope.app)
    GET /<id>?format=json       pyinstrument session JSON (``pyinstrument --load``)

Anything unauthorised, malformed or unknown gets the same bare ``404``, so the
viewer does not reveal that it exists. Mount it with :func:`mount_viewer`: the
bare mount path (no trailing slash) then does not redirect, and the ``404`` is
the application's own "not found" response. Rendering runs in a worker thread of the
viewer's own (one at a time), never on the event loop.
"""

from __future__ import annotations

import hmac
import html
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from fastprof import _internal_errors
from fastprof._http import find_header
from fastprof._mount import mount_hidden, not_found, send_page
from fastprof.profiling import _documents
from fastprof.profiling._tokens import viewer_token
from fastprof.profiling.stores import ProfileStore, valid_profile_id

__all__ = ["AuthHook", "bearer_auth", "mount_viewer", "viewer_app"]

AuthHook = Callable[[Scope], bool]

_HTML_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; connect-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
_LIST_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"
)
_MAX_AUTH_HEADER: Final = 512


def bearer_auth(token: str) -> AuthHook:
    """An auth hook accepting ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected = ("bearer " + token).encode("latin-1")

    def check(scope: Scope) -> bool:
        value = find_header(scope.get("headers") or (), b"authorization")
        if value is None or len(value) > _MAX_AUTH_HEADER:
            return False
        return hmac.compare_digest(value[:7].lower() + value[7:], expected)

    return check


def viewer_app(
    store: ProfileStore,
    *,
    auth: AuthHook | None = None,
    secret: str | bytes | Sequence[str | bytes] | None = None,
    list_limit: int = 100,
) -> Callable[[Scope, Receive, Send], Any]:
    """Build the viewer ASGI app.

    Args:
        store: The store profiles are read from.
        auth: ``auth(scope) -> bool``; when omitted, requests must carry
            ``Authorization: Bearer <fastprof.profiling.viewer_token(secret)>``.
        secret: The profiling secret(s), used for the default auth hook.
        list_limit: Profiles shown in the list.
    """
    if auth is None:
        if secret is None:
            raise ValueError("viewer_app: pass auth=<callable> or secret=<profiling secret>")
        auth = bearer_auth(viewer_token(secret))
    if not callable(auth):
        raise ValueError("auth: expected a callable taking the ASGI scope and returning bool")
    if not isinstance(list_limit, int) or not 1 <= list_limit <= 10_000:
        raise ValueError("list_limit: expected an int between 1 and 10000")
    checked_auth: AuthHook = auth
    limiter: list[Any] = []

    async def run(fn: Callable[[], Any]) -> Any:
        import anyio
        import anyio.to_thread

        if not limiter:
            limiter.append(anyio.CapacityLimiter(1))
        return await anyio.to_thread.run_sync(fn, limiter=limiter[0])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            allowed = scope["method"] in ("GET", "HEAD") and bool(checked_auth(scope))
        except Exception as exc:
            _internal_errors.report("viewer.auth", exc)
            allowed = False
        if not allowed:
            await not_found(scope, receive, send)
            return
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        fmt = params.get("format", "html")
        try:
            if path in ("", "/"):
                metas = await run(lambda: store.list(list_limit))
                if fmt == "json":
                    body = json.dumps([m.to_dict() for m in metas]).encode("utf-8")
                    await send_page(send, 200, body, "application/json", None)
                else:
                    await send_page(
                        send, 200, _listing(metas, root_path), "text/html; charset=utf-8", _LIST_CSP
                    )
                return
            profile_id = path[1:]
            if not valid_profile_id(profile_id) or fmt not in _documents.FORMATS:
                await not_found(scope, receive, send)
                return
            document = await run(lambda: store.get(profile_id))
            if document is None:
                await not_found(scope, receive, send)
                return
            body = await run(lambda: _documents.render(document, fmt))
        except Exception as exc:
            _internal_errors.report("viewer", exc)
            await send_page(send, 500, b"Internal Server Error", "text/plain; charset=utf-8", None)
            return
        media, ext = _documents.MEDIA[fmt]
        disposition = None if fmt == "html" else f'attachment; filename="{profile_id}.{ext}"'
        await send_page(send, 200, body, media, _HTML_CSP if fmt == "html" else None, disposition)

    return app


def mount_viewer(app: Any, viewer: Any, path: str = "/_fastprof/profiles") -> None:
    """Mount ``viewer`` on a Starlette/FastAPI ``app`` at ``path`` without revealing it.

    ``app.mount(path, viewer)`` leaves ``GET <path>`` (no trailing slash) to the
    router, which redirects it to ``<path>/``: proof that something is mounted
    there. This also routes ``<path>`` to the viewer, and makes the viewer's
    refusals the application's own "not found" response.
    """
    mount_hidden(app, path, viewer)


def _listing(metas: list[Any], base: str) -> bytes:
    rows = []
    base = html.escape(base, quote=True)
    for meta in metas:
        pid = base + "/" + html.escape(meta.profile_id)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(meta.created))
        rows.append(
            "<tr>"
            f"<td>{html.escape(created)}Z</td>"
            f"<td>{html.escape(meta.method)}</td>"
            f"<td>{html.escape(meta.route)}</td>"
            f"<td>{meta.duration_s:.3f}</td>"
            f"<td>{html.escape(meta.trigger)}</td>"
            f"<td><code>{html.escape(meta.trace_id)}</code></td>"
            f'<td><a href="{pid}">html</a> · <a href="{pid}?format=speedscope">speedscope</a>'
            f' · <a href="{pid}?format=json">json</a></td>'
            "</tr>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fastprof profiles</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}</style>"
        "</head><body><h1>fastprof profiles</h1><table><tr><th>created (UTC)</th><th>method</th>"
        "<th>route</th><th>seconds</th><th>trigger</th><th>trace id</th><th>open</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    return page.encode("utf-8")
