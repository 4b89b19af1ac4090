"""Dependency spans: every kind of dependency, cache hits, marked mode, phases, transparency."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator
from typing import Any

import fastapi
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from fastapi.security import OAuth2PasswordBearer
from opentelemetry.sdk.trace import ReadableSpan

import fastprof
from fastprof import _internal_errors
from tests._client import get as _get
from tests._transparency import assert_transparent, drive_http, drive_websocket

pytestmark = pytest.mark.anyio

NATIVE = hasattr(fastapi, "telemetry") or "telemetry" in inspect.signature(FastAPI).parameters


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _parent(span: ReadableSpan) -> int:
    assert span.parent is not None
    return span.parent.span_id


def _deps(spans: Any) -> dict[str, ReadableSpan]:
    found = [s for s in spans.all() if s.name.startswith("dependency ")]
    by_code = {str(s.attributes["code.function.name"]): s for s in found}
    assert len(by_code) == len(found), [s.name for s in found]
    return by_code


# ------------------------------------------------------------------ module-level dependencies


class Pagination:
    def __init__(self, page: int = 1) -> None:
        self.page = page


class Gate:
    async def __call__(self) -> str:
        return "open"


def scaled(factor: int, extra: int = 0) -> int:
    return factor * 2 + extra


def app_level() -> None:
    pass


def path_level() -> None:
    pass


def shared() -> str:
    return "shared"


def left(s: str = fastapi.Depends(shared)) -> str:
    return "l" + s


def right(s: str = fastapi.Depends(shared)) -> str:
    return "r" + s


async def ws_dep() -> str:
    return "ws"


M = __name__


async def test_every_kind_of_dependency_gets_a_span_with_its_code_name(spans: Any) -> None:
    """Class, partial, callable instance, Security scheme, app- and path-level lists."""
    scheme = OAuth2PasswordBearer(tokenUrl="token")
    app = FastAPI(dependencies=[fastapi.Depends(app_level)])

    @app.get("/", dependencies=[fastapi.Depends(path_level)])
    async def root(
        page: Pagination = fastapi.Depends(Pagination),
        gate: str = fastapi.Depends(Gate()),
        two: int = fastapi.Depends(functools.partial(scaled, 1)),
        token: str = fastapi.Security(scheme),
    ) -> dict[str, Any]:
        return {"page": page.page, "gate": gate, "two": two, "token": token}

    fastprof.instrument(app, tracer_provider=spans.provider)
    response = await _get(app, "/?page=3", headers={"Authorization": "Bearer t"})
    assert response.json() == {"page": 3, "gate": "open", "two": 2, "token": "t"}
    deps = _deps(spans)
    assert set(deps) == {
        f"{M}.app_level",
        f"{M}.path_level",
        f"{M}.Pagination",
        f"{M}.Gate",
        f"{M}.scaled",
        "fastapi.security.oauth2.OAuth2PasswordBearer",
    }
    assert deps[f"{M}.Pagination"].attributes["fastprof.dependency.kind"] == "class"
    assert deps[f"{M}.Gate"].attributes["fastprof.dependency.kind"] == "async"
    assert deps[f"{M}.scaled"].attributes["fastprof.dependency.kind"] == "sync"
    assert deps[f"{M}.scaled"].name == "dependency scaled"
    parents = {_parent(s) for s in deps.values()}
    assert len(parents) == 1  # all top-level: siblings under one phase/operation span
    # app-level dependencies run first
    ordered = sorted(deps.values(), key=lambda s: s.start_time or 0)
    assert ordered[0].attributes["code.function.name"] == f"{M}.app_level"


async def test_routes_and_routers_added_after_instrument_are_covered(spans: Any) -> None:
    app = FastAPI()
    fastprof.instrument(app, tracer_provider=spans.provider)
    router = APIRouter(dependencies=[fastapi.Depends(app_level)])

    @router.get("/late")
    async def late(x: str = fastapi.Depends(left)) -> str:
        return x

    app.include_router(router)

    @app.get("/later")
    async def later(x: str = fastapi.Depends(right)) -> str:
        return x

    assert (await _get(app, "/late")).json() == "lshared"
    deps = _deps(spans)
    assert set(deps) == {f"{M}.app_level", f"{M}.left", f"{M}.shared"}
    assert _parent(deps[f"{M}.shared"]) == _id(deps[f"{M}.left"])
    spans.clear()
    assert (await _get(app, "/later")).json() == "rshared"
    assert set(_deps(spans)) == {f"{M}.right", f"{M}.shared"}


async def test_cache_hits_are_events_not_second_spans(spans: Any) -> None:
    """The second use of a cached dependency is an event on the span that needed it."""
    calls: list[str] = []

    def counted() -> str:
        calls.append("shared")
        return shared()

    def l2(s: str = fastapi.Depends(counted)) -> str:
        return "l" + s

    def r2(s: str = fastapi.Depends(counted)) -> str:
        return "r" + s

    app = FastAPI()

    @app.get("/")
    async def root(a: str = fastapi.Depends(l2), b: str = fastapi.Depends(r2)) -> str:
        return a + b

    fastprof.instrument(app, tracer_provider=spans.provider)
    assert (await _get(app, "/")).json() == "lsharedrshared"
    assert calls == ["shared"]
    prefix = f"{M}.test_cache_hits_are_events_not_second_spans.<locals>."
    deps = _deps(spans)
    assert set(deps) == {prefix + "counted", prefix + "l2", prefix + "r2"}
    assert _parent(deps[prefix + "counted"]) == _id(deps[prefix + "l2"])
    (event,) = deps[prefix + "r2"].events
    assert event.name == "fastprof.dependency.cache_hit"
    assert event.attributes == {"code.function.name": prefix + "counted"}
    assert not deps[prefix + "l2"].events


async def test_sync_endpoint_threadpool_wait_and_phase_spans(spans: Any) -> None:
    """Without native operation spans fastprof adds dependencies/endpoint/serialization."""
    app = FastAPI(telemetry={"tracing": False}) if NATIVE else FastAPI()

    @app.get("/")
    def sync_endpoint(x: str = fastapi.Depends(left)) -> dict[str, str]:
        return {"x": x}

    fastprof.instrument(app, tracer_provider=spans.provider)
    assert (await _get(app, "/")).json() == {"x": "lshared"}
    (server,) = spans.server()
    (deps_phase,) = spans.named("fastprof.dependencies")
    (endpoint,) = spans.named("fastprof.endpoint")
    (serialization,) = spans.named("fastprof.serialization")
    for phase in (deps_phase, endpoint, serialization):
        assert _parent(phase) == _id(server)
    assert endpoint.attributes["code.function.name"].endswith("sync_endpoint")
    assert endpoint.attributes["fastprof.threadpool.wait_s"] >= 0
    assert _parent(_deps(spans)[f"{M}.left"]) == _id(deps_phase)
    assert deps_phase.end_time <= endpoint.start_time <= endpoint.end_time
    assert endpoint.end_time <= serialization.start_time


@pytest.mark.skipif(not NATIVE, reason="FastAPI native telemetry needs FastAPI >= 0.142")
async def test_with_native_telemetry_dependencies_nest_under_its_span(spans: Any) -> None:
    app = FastAPI(telemetry={"tracer_provider": spans.provider})

    @app.get("/")
    async def root(x: str = fastapi.Depends(left)) -> str:
        return x

    fastprof.instrument(app, tracer_provider=spans.provider)
    assert (await _get(app, "/")).json() == "lshared"
    (native,) = spans.named("fastapi.dependencies")
    assert _parent(_deps(spans)[f"{M}.left"]) == _id(native)
    assert not [s for s in spans.all() if s.name.startswith("fastprof.")]


async def test_marked_mode_times_only_fastprof_depends(spans: Any) -> None:
    def plain() -> str:
        return "p"

    async def marked_db() -> AsyncIterator[str]:
        yield "db"

    def inner(db: str = fastprof.Depends(marked_db), p: str = fastapi.Depends(plain)) -> str:
        return db + p

    app = FastAPI()

    @app.get("/")
    async def root(v: str = fastapi.Depends(inner)) -> str:
        return v

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        dependencies=fastprof.DependencySpans(mode="marked"),
    )
    assert (await _get(app, "/")).json() == "dbp"
    names = sorted(s.name for s in spans.all() if s.name.startswith(("dependency", "teardown")))
    prefix = "test_marked_mode_times_only_fastprof_depends.<locals>."
    assert names == [f"dependency {prefix}marked_db", f"teardown {prefix}marked_db"]


async def test_fastprof_depends_without_instrument_is_fastapi_depends() -> None:
    assert inspect.signature(fastprof.Depends) == inspect.signature(fastapi.Depends)
    assert inspect.signature(fastprof.Security) == inspect.signature(fastapi.Security)
    for ours, theirs in (
        (fastprof.Depends(shared, use_cache=False), fastapi.Depends(shared, use_cache=False)),
        (fastprof.Security(shared, scopes=["a"]), fastapi.Security(shared, scopes=["a"])),
    ):
        assert type(ours) is type(theirs) and repr(ours) == repr(theirs)
        assert (ours.dependency, ours.use_cache) == (theirs.dependency, theirs.use_cache)
    app = FastAPI()

    @app.get("/")
    async def root(x: str = fastprof.Depends(left)) -> str:
        return x

    assert (await _get(app, "/")).json() == "lshared"


def test_instrument_dependency_options_are_validated() -> None:
    with pytest.raises(ValueError, match="dependencies"):
        fastprof.instrument(FastAPI(), dependencies="some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        fastprof.DependencySpans(mode="some")  # type: ignore[arg-type]


async def test_unsampled_requests_get_no_dependency_work(spans: Any) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from fastprof.dependencies import _tracker

    app = FastAPI()
    trackers: list[object] = []

    @app.get("/")
    async def root(x: str = fastapi.Depends(left)) -> str:
        trackers.append(_tracker.active.get())
        return x

    fastprof.instrument(app, tracer_provider=TracerProvider(sampler=ALWAYS_OFF))
    assert (await _get(app, "/")).json() == "lshared"
    assert trackers == [None]  # no per-request tracker: FastAPI ran as without fastprof
    assert _internal_errors.counts() == {}


# ------------------------------------------------------------------ transparency


def _kinds_app(
    instrumented: bool, log: list[str], override_when: str | None, provider: Any = None
) -> FastAPI:
    scheme = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)

    async def db() -> AsyncIterator[str]:
        log.append("db+")
        yield "db"
        log.append("db-")

    def sync_gen() -> Any:
        log.append("g+")
        yield "g"
        log.append("g-")

    def counted() -> str:
        log.append("shared")
        return "s"

    def fake_counted() -> str:
        log.append("fake")
        return "f"

    def a(s: str = fastapi.Depends(counted), d: str = fastapi.Depends(db)) -> str:
        return "a" + s + d

    def b(
        s: str = fastapi.Depends(counted), n: str = fastapi.Depends(counted, use_cache=False)
    ) -> str:
        return "b" + s + n

    app = FastAPI(dependencies=[fastapi.Depends(app_level)])
    if override_when == "before":
        app.dependency_overrides[counted] = fake_counted

    @app.get("/all", dependencies=[fastapi.Depends(path_level)])
    async def all_kinds(
        x: str = fastapi.Depends(a),
        y: str = fastapi.Depends(b),
        g: str = fastapi.Depends(sync_gen),
        page: Pagination = fastapi.Depends(Pagination),
        gate: str = fastapi.Depends(Gate()),
        two: int = fastapi.Depends(functools.partial(scaled, 1, extra=1)),
        token: str | None = fastapi.Security(scheme),
    ) -> dict[str, Any]:
        return {"x": x, "y": y, "g": g, "p": page.page, "gate": gate, "two": two, "t": token}

    @app.get("/sync")
    def sync_endpoint(x: str = fastapi.Depends(a), q: int = 0) -> dict[str, Any]:
        return {"x": x, "q": q}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, v: str = fastapi.Depends(ws_dep)) -> None:
        await websocket.accept()
        await websocket.send_text(v)
        await websocket.close()

    if instrumented:
        fastprof.instrument(app, tracer_provider=provider)
    if override_when == "after":
        app.dependency_overrides[counted] = fake_counted
    return app


@pytest.mark.parametrize("override_when", [None, "before", "after"])
@pytest.mark.parametrize(
    "request_args",
    [
        ("GET", "/all", b"page=2", [(b"authorization", b"Bearer abc")]),
        ("GET", "/sync", b"q=x", []),  # 422
        ("GET", "/sync", b"q=4", []),
    ],
)
async def test_all_kinds_are_transparent(
    spans: Any, override_when: str | None, request_args: Any
) -> None:
    """Same ASGI messages and the same dependency calls with and without fastprof."""
    method, path, query, headers = request_args
    logs: dict[bool, list[str]] = {False: [], True: []}
    await assert_transparent(
        lambda inst: _kinds_app(inst, logs[inst], override_when, spans.provider),
        lambda app: drive_http(app, method, path, query=query, headers=headers),
    )
    assert logs[True] == logs[False]
    assert [s for s in spans.all() if s.name.startswith("dependency ")]  # really traced
    assert _internal_errors.counts() == {}


async def test_websocket_routes_with_dependencies_are_transparent() -> None:
    await assert_transparent(
        lambda inst: _kinds_app(inst, [], None), lambda app: drive_websocket(app, "/ws", [])
    )
