"""``fastprof.Dashboard``: recent requests, waterfalls, flame graphs per request and per route."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from fastprof import _internal_errors
from fastprof._http import find_header
from fastprof._mount import mount_hidden, not_found, send_page
from fastprof._options import check_int, check_seconds
from fastprof.dashboard import _pages
from fastprof.dashboard._recorder import Recorder
from fastprof.dashboard.stores import (
    MemoryRequestStore,
    RequestFilter,
    RequestStore,
    SQLiteStore,
)
from fastprof.profiling import ProfileStore, Profiling, render

__all__ = ["AuthHook", "Dashboard", "dashboard_token"]

AuthHook = Callable[[Scope], bool]

MIN_SECRET_BYTES: Final = 32
_TOKEN_LABEL: Final = b"fastprof dashboard token v1"
_SESSION_LABEL: Final = b"fastprof dashboard session v1\x00"
_LOGIN_LABEL: Final = b"fastprof dashboard login v1\x00"
COOKIE: Final = "fastprof_dashboard"
_MAX_CREDENTIAL: Final = 512
_PAGE_CSP: Final = (
    "default-src 'none'; style-src 'unsafe-inline'; frame-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
# pyinstrument's renderer: one self-contained page with its script and styles inline.
_FLAME_CSP: Final = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; connect-src 'none'; frame-ancestors 'self'; "
    "base-uri 'none'; form-action 'none'"
)
_PROFILE_RE: Final = re.compile(r"[0-9a-f]{32}")


def _secrets(secret: str | bytes | Sequence[str | bytes]) -> tuple[bytes, ...]:
    items = [secret] if isinstance(secret, str | bytes) else list(secret)
    out = []
    for item in items:
        raw = item.encode("utf-8") if isinstance(item, str) else item
        if not isinstance(raw, bytes) or len(raw) < MIN_SECRET_BYTES:
            raise ValueError(f"secret: each secret must be str or bytes of at least "
                             f"{MIN_SECRET_BYTES} bytes")
        out.append(raw)
    if not out:
        raise ValueError("secret: at least one secret is required")
    return tuple(out)


def _mac(key: bytes, label: bytes, payload: str = "") -> str:
    digest = hmac.new(key, label + payload.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def dashboard_token(secret: str | bytes | Sequence[str | bytes]) -> str:
    """The dashboard's bearer token, derived from the (first) secret.

    An HMAC of a fixed label: it is neither a profile token nor the viewer's, and
    does not reveal the secret.
    """
    return _mac(_secrets(secret)[0], _TOKEN_LABEL)


class Dashboard:
    """A page of fastprof's own: recent requests, their waterfalls, profiles, routes.

    Off by default: nothing is recorded until :attr:`span_processor` is added to
    the tracer provider, and nothing is served until :meth:`app` is mounted. Every
    page needs credentials: ``Authorization: Bearer <dashboard_token(secret)>``, or
    the cookie a one-time :meth:`login_url` sets (for a browser), or your own
    ``auth`` hook. Anything else gets the application's own "not found".

    ::

        dashboard = fastprof.Dashboard(secret=os.environ["FASTPROF_SECRET"], profiling=profiling)
        provider.add_span_processor(dashboard.span_processor)
        dashboard.mount(app, "/_fastprof/dashboard")

    Args:
        secret: Secret(s) (at least 32 bytes each; the first signs) for the default auth.
        auth: ``auth(scope) -> bool`` instead of the token (an SSO proxy's header, ...).
        store: Where requests are kept: a :class:`MemoryRequestStore` (default, this
            process) or a :class:`SQLiteStore` (every process of the host).
        profiling: The :class:`fastprof.Profiling` whose profiles the pages link to
            (or ``profiles=``: a profile store).
        profiles: A profile store to read profiles from (default: ``profiling.store``).
        jaeger_url: Template of a trace's URL in Jaeger (or any trace viewer), with
            ``{trace_id}``, e.g. ``"http://127.0.0.1:16686/trace/{trace_id}"``.
        slow_s: Requests at least this long are flagged slow.
        exclude: Requests whose path matches this regular expression are not recorded
            (by default, fastprof's own pages).
        max_queue: Requests waiting for the writer thread; beyond, they are dropped.
        flush_interval_s: How often the writer thread stores what is queued.
        aggregate_profiles: Profiles combined into a route's flame graph (newest).
        session_ttl_s: Lifetime of the cookie a login link sets.
    """

    def __init__(
        self,
        *,
        secret: str | bytes | Sequence[str | bytes] | None = None,
        auth: AuthHook | None = None,
        store: RequestStore | None = None,
        profiling: Profiling | None = None,
        profiles: ProfileStore | SQLiteStore | None = None,
        jaeger_url: str | None = None,
        slow_s: float = 1.0,
        exclude: str | None = r"^/_fastprof(/|$)",
        max_queue: int = 10_000,
        flush_interval_s: float = 0.25,
        aggregate_profiles: int = 20,
        session_ttl_s: float = 12 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = _secrets(secret) if secret is not None else ()
        if auth is None and not self._secrets:
            raise ValueError("Dashboard: pass secret=<secret> or auth=<callable>")
        if auth is not None and not callable(auth):
            raise ValueError("auth: expected a callable taking the ASGI scope and returning bool")
        if store is None:
            store = MemoryRequestStore()
        elif not isinstance(store, RequestStore):
            raise ValueError(
                "store: expected a MemoryRequestStore, a SQLiteStore or a RequestStore"
            )
        if profiling is not None and not isinstance(profiling, Profiling):
            raise ValueError(f"profiling: expected a fastprof.Profiling, got {profiling!r}")
        if isinstance(profiles, SQLiteStore):
            profiles = profiles.profiles()
        if profiles is not None and not isinstance(profiles, ProfileStore):
            raise ValueError("profiles: expected a ProfileStore (put/get/list)")
        if profiles is None and profiling is not None:
            profiles = profiling.store
        if jaeger_url is not None and (
            not isinstance(jaeger_url, str)
            or "{trace_id}" not in jaeger_url
            or not re.match(r"https?://|/", jaeger_url)
        ):
            raise ValueError(
                "jaeger_url: expected an http(s) URL or an absolute path containing "
                "{trace_id}, e.g. 'http://127.0.0.1:16686/trace/{trace_id}'"
            )
        check_seconds("slow_s", slow_s, 0.0, 3600.0)
        try:
            exclude_re = re.compile(exclude) if exclude is not None else None
        except (re.error, TypeError) as exc:
            raise ValueError(f"exclude: invalid regular expression {exclude!r}: {exc}") from exc
        check_int("max_queue", max_queue, 1, 1_000_000)
        check_seconds("flush_interval_s", flush_interval_s, 0.001, 60.0)
        check_int("aggregate_profiles", aggregate_profiles, 1, 200)
        check_seconds("session_ttl_s", session_ttl_s, 60.0, 30 * 86400.0)
        self._auth = auth
        self.store: RequestStore = store
        self.profiles: ProfileStore | None = profiles
        self.jaeger_url = jaeger_url
        self.aggregate_profiles = aggregate_profiles
        self.session_ttl_s = float(session_ttl_s)
        self._clock = clock
        self._expected_bearer = (
            ("bearer " + _mac(self._secrets[0], _TOKEN_LABEL)).encode("ascii")
            if self._secrets
            else None
        )
        #: Add to the SDK tracer provider: ``provider.add_span_processor(...)``.
        self.span_processor = Recorder(
            store,
            slow_s=float(slow_s),
            exclude=exclude_re,
            max_queue=max_queue,
            flush_interval_s=float(flush_interval_s),
        )
        self._aggregates: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
        self._aggregates_lock = threading.Lock()
        self._limiter: Any = None

    # -- lifecycle -------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until the queued requests are stored (not from the event loop)."""
        return self.span_processor.flush(timeout)

    def close(self) -> None:
        """Store what is queued and stop the writer thread."""
        self.span_processor.close()

    def stats(self) -> dict[str, int]:
        """``recorded``, ``dropped`` (queue full), ``spans_dropped``, ``failed``, ..."""
        return self.span_processor.stats()

    # -- auth ---------------------------------------------------------------------

    def login_url(self, base_url: str, *, ttl_s: float = 300.0) -> str:
        """A link that signs a browser in: it sets the dashboard's cookie.

        ``base_url`` is where the dashboard is mounted. The link expires after
        ``ttl_s`` (at most 1 hour); it is a credential while valid: don't share it.
        """
        if not self._secrets:
            raise ValueError("login_url: needs the dashboard's secret")
        check_seconds("ttl_s", ttl_s, 1.0, 3600.0)
        exp = str(int(self._clock() + ttl_s))
        token = f"{exp}.{_mac(self._secrets[0], _LOGIN_LABEL, exp)}"
        return f"{base_url.rstrip('/')}/login?token={token}"

    def _signed_ok(self, value: str, label: bytes) -> bool:
        exp, _, sig = value.partition(".")
        if not exp.isdigit() or len(exp) > 12 or int(exp) < self._clock():
            return False
        return any(
            hmac.compare_digest(sig.encode("ascii", "replace"), _mac(key, label, exp).encode())
            for key in self._secrets
        )

    def _allowed(self, scope: Scope) -> bool:
        if self._auth is not None:
            return bool(self._auth(scope))
        headers = scope.get("headers") or ()
        value = find_header(headers, b"authorization")
        if (
            value is not None
            and len(value) <= _MAX_CREDENTIAL
            and self._expected_bearer
            and hmac.compare_digest(value[:7].lower() + value[7:], self._expected_bearer)
        ):
            return True
        cookie = find_header(headers, b"cookie")
        if cookie is not None and len(cookie) <= 8192:
            for part in cookie.decode("latin-1").split(";"):
                name, _, session = part.strip().partition("=")
                if name == COOKIE and len(session) <= _MAX_CREDENTIAL:
                    return self._signed_ok(session, _SESSION_LABEL)
        return False

    # -- the ASGI app -------------------------------------------------------------

    def mount(self, app: Any, path: str = "/_fastprof/dashboard") -> None:
        """Mount :meth:`app` on a Starlette/FastAPI ``app`` at ``path`` (also without the
        trailing slash), refusing as the application refuses an unknown path."""
        mount_hidden(app, path, self.app())

    def app(self) -> Callable[[Scope, Receive, Send], Any]:
        """The dashboard as an ASGI app (prefer :meth:`mount`, which hides it better)."""

        async def dashboard_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            try:
                await self._handle(scope, receive, send)
            except _Refused:
                await not_found(scope, receive, send)

        return dashboard_app

    async def _run(self, fn: Callable[[], Any]) -> Any:
        import anyio
        import anyio.to_thread

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(2)
        return await anyio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        params = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if scope.get("method") not in ("GET", "HEAD"):
            raise _Refused
        if path == "/login" and self._auth is None:
            token = params.get("token", "")
            if len(token) > _MAX_CREDENTIAL or not self._signed_ok(token, _LOGIN_LABEL):
                raise _Refused
            await self._login(scope, send, root_path)
            return
        try:
            allowed = self._allowed(scope)
        except Exception as exc:
            _internal_errors.report("dashboard.auth", exc)
            allowed = False
        if not allowed:
            raise _Refused
        base = root_path
        try:
            # Reading the store and rendering run in a worker thread, never on the loop.
            if path in ("", "/"):
                query = _filter(params)
                store = self.store
                body = await self._run(
                    lambda: _pages.requests_page(store.recent(query), query, store.routes(), base)
                )
                await send_page(send, 200, body, "text/html; charset=utf-8", _PAGE_CSP)
                return
            if path.startswith("/requests/"):
                key = path[len("/requests/") :]
                page = await self._run(lambda: self._request_page(key, base))
                if page is None:
                    raise _Refused
                await send_page(send, 200, page, "text/html; charset=utf-8", _PAGE_CSP)
                return
            if path.startswith("/profiles/") and self.profiles is not None:
                profile_id = path[len("/profiles/") :]
                if not _PROFILE_RE.fullmatch(profile_id):
                    raise _Refused
                profiles = self.profiles
                body_or_none = await self._run(lambda: _render_profile(profiles, profile_id))
                if body_or_none is None:
                    raise _Refused
                await send_page(send, 200, body_or_none, "text/html; charset=utf-8", _FLAME_CSP)
                return
            if path == "/route" and "route" in params:
                route = params["route"]
                body = await self._run(lambda: self._route_page(route, base))
                await send_page(send, 200, body, "text/html; charset=utf-8", _PAGE_CSP)
                return
            if path == "/route/flame" and "route" in params and self.profiles is not None:
                route = params["route"]
                part = params.get("part", "all")
                if part not in _pages.PARTS:
                    raise _Refused
                flame = await self._run(lambda: self._aggregate(route, part))
                if flame is None:
                    raise _Refused
                await send_page(send, 200, flame, "text/html; charset=utf-8", _FLAME_CSP)
                return
        except _Refused:
            raise
        except Exception as exc:
            _internal_errors.report("dashboard.page", exc)
            await send_page(send, 500, b"Internal Server Error", "text/plain; charset=utf-8", None)
            return
        raise _Refused

    async def _login(self, scope: Scope, send: Send, root_path: str) -> None:
        exp = str(int(self._clock() + self.session_ttl_s))
        session = f"{exp}.{_mac(self._secrets[0], _SESSION_LABEL, exp)}"
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie_path = root_path or "/"
        cookie = (
            f"{COOKIE}={session}; Path={cookie_path}; Max-Age={int(self.session_ttl_s)}; "
            f"HttpOnly; SameSite=Strict{secure}"
        )
        location = (root_path or "") + "/"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    def _request_page(self, key: str, base: str) -> bytes | None:
        record = self.store.get(key)
        if record is None:
            return None
        return _pages.request_page(record, base, self.jaeger_url, self.profiles is not None)

    def _route_page(self, route: str, base: str) -> bytes:
        durations, deps, profiled = self.store.route_sample(route)
        return _pages.route_page(
            route, durations, deps, profiled, base, self.profiles is not None,
            self.aggregate_profiles,
        )

    def _aggregate(self, route: str, part: str = "all") -> bytes | None:
        """One flame graph of the route's newest profiles, combined (in a worker thread).

        ``part``: ``"all"``, ``"slow"`` (requests in the route's slowest 5 %) or ``"rest"``.
        """
        from pyinstrument.renderers import HTMLRenderer
        from pyinstrument.session import Session

        profiles = self.profiles
        if profiles is None:
            return None
        durations, _, profiled = self.store.route_sample(route)
        profile_ids = _pages.profiles_of_part(profiled, durations, part)
        key = tuple(profile_ids[: self.aggregate_profiles])
        if not key:
            return None
        with self._aggregates_lock:
            cached = self._aggregates.get((route, *key))
        if cached is not None:
            return cached
        combined: Session | None = None
        for profile_id in key:
            document = profiles.get(profile_id)
            if document is None:
                continue
            session = Session.from_json(json.loads(render(document, "json")))
            combined = session if combined is None else Session.combine(combined, session)
        if combined is None:
            return None
        page: bytes = HTMLRenderer().render(combined).encode("utf-8")
        with self._aggregates_lock:
            self._aggregates[(route, *key)] = page
            while len(self._aggregates) > 8:
                self._aggregates.popitem(last=False)
        return page


class _Refused(Exception):
    """Answer as for an unknown path."""


def _render_profile(profiles: ProfileStore, profile_id: str) -> bytes | None:
    document = profiles.get(profile_id)
    if document is None:
        return None
    return render(document, "html")


def _filter(params: dict[str, str]) -> RequestFilter:
    route = params.get("route") or None
    min_duration = 0.0
    try:
        min_ms = float(params.get("min_ms") or 0)
        if 0 <= min_ms < 1e9:
            min_duration = min_ms / 1000
    except ValueError:
        pass
    status: int | None = None
    raw = params.get("status", "")
    if raw.isdigit() and len(raw) <= 3:
        status = int(raw)
    flags = 0
    for name, bit in _pages.FLAG_PARAMS.items():
        if params.get(name):
            flags |= bit
    return RequestFilter(route=route, min_duration_s=min_duration, status=status, flags=flags)


