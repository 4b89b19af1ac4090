"""Per-dependency spans (fastprof.DependencySpans)."""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.security import OAuth2PasswordBearer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

import fastprof
from fastprof import _internal_errors
from fastprof._context import RequestState
from fastprof.dependencies import _fastapi, _tracker
from fastprof.middleware import RequestHooks
from tests._client import get as _get

pytestmark = pytest.mark.anyio


def _instrument(app: FastAPI, spans: Any, **options: Any) -> FastAPI:
    return fastprof.instrument(app, tracer_provider=spans.provider, **options)


def _dep(spans: Any, name: str) -> ReadableSpan:
    found = spans.named(f"dependency {name}")
    assert len(found) == 1, [s.name for s in spans.all()]
    return found[0]


def _parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None
    return span.parent.span_id


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


# ----------------------------------------------------------------------------- a shared app


class Settings:
    def __init__(self) -> None:
        self.value = 1


class Color(enum.Enum):
    red = "red"
    blue = "blue"


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        return self.calls


def _tree_app(log: list[str]) -> FastAPI:
    """async -> (async gen, sync), sync gen, class, callable instance, partial."""

    async def get_db() -> AsyncIterator[str]:
        log.append("db setup")
        await asyncio.sleep(0.001)
        yield "db"
        log.append("db teardown")

    def read_config() -> dict[str, int]:
        log.append(f"config thread {threading.get_ident()}")
        return {"a": 1}

    def sync_resource() -> Iterator[str]:
        log.append("sync setup")
        yield "res"
        log.append("sync teardown")

    async def get_user(
        db: str = Depends(get_db), config: dict[str, int] = Depends(read_config)
    ) -> str:
        return f"user({db})"

    def scaled(factor: int) -> int:
        return factor * 2

    counter = Counter()
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def read_item(
        item_id: int,
        user: str = Depends(get_user),
        db: str = Depends(get_db),
        res: str = Depends(sync_resource),
        settings: Settings = Depends(Settings),
        count: int = Depends(counter),
        two: int = Depends(functools.partial(scaled, 1)),
    ) -> dict[str, Any]:
        log.append(f"loop thread {threading.get_ident()}")
        return {"id": item_id, "user": user, "db": db, "res": res, "count": count, "two": two}

    return app


async def test_each_dependency_gets_a_span_nested_like_the_tree(spans: Any) -> None:
    """Sub-dependencies are children of the dependency that needs them."""
    log: list[str] = []
    app = _instrument(_tree_app(log), spans)
    response = await _get(app, "/items/3")
    assert response.status_code == 200
    assert response.json() == {
        "id": 3,
        "user": "user(db)",
        "db": "db",
        "res": "res",
        "count": 1,
        "two": 2,
    }
    (server,) = spans.server()
    user = _dep(spans, "_tree_app.<locals>.get_user")
    db = _dep(spans, "_tree_app.<locals>.get_db")
    config = _dep(spans, "_tree_app.<locals>.read_config")
    (phase,) = spans.named("fastprof.dependencies")  # no native telemetry: fastprof's phase
    assert _parent_id(phase) == _id(server)
    assert _parent_id(user) == _id(phase)
    assert _parent_id(db) == _id(user)  # first resolved under get_user; cached at top level
    assert _parent_id(config) == _id(user)
    for name in ("sync_resource", "Settings", "Counter", "scaled"):
        found = [s for s in spans.all() if s.name.startswith("dependency") and name in s.name]
        assert len(found) == 1, name
        assert _parent_id(found[0]) == _id(phase)
    kinds = {
        s.name.rsplit(".", 1)[-1]: s.attributes["fastprof.dependency.kind"]
        for s in spans.all()
        if s.name.startswith("dependency")
    }
    assert kinds == {
        "get_user": "async",
        "get_db": "async_generator",
        "read_config": "sync",
        "sync_resource": "generator",
        "dependency Settings": "class",
        "dependency Counter": "async",
        "scaled": "sync",
    }
    assert user.attributes["code.function.name"].endswith("get_user")
    # the parent span encloses its children
    assert user.start_time <= db.start_time and db.end_time <= user.end_time


async def test_kinds_are_kept_sync_code_still_runs_in_the_threadpool(spans: Any) -> None:
    """Sync deps run off the loop thread; yield deps still tear down."""
    log: list[str] = []
    app = _instrument(_tree_app(log), spans)
    await _get(app, "/items/1")
    loop_thread = next(e for e in log if e.startswith("loop thread")).split()[-1]
    config_thread = next(e for e in log if e.startswith("config thread")).split()[-1]
    assert config_thread != loop_thread
    assert "db teardown" in log and "sync teardown" in log
    assert log.count("db setup") == 1  # cached dependency ran once


async def test_yield_dependencies_get_a_teardown_span(spans: Any) -> None:
    """The code after ``yield`` is timed in its own span, linked to the setup span."""
    app = _instrument(_tree_app([]), spans)
    await _get(app, "/items/1")
    (server,) = spans.server()
    setup = _dep(spans, "_tree_app.<locals>.get_db")
    (teardown,) = spans.named("teardown _tree_app.<locals>.get_db")
    assert _parent_id(teardown) == _id(server)
    assert teardown.attributes["fastprof.dependency.phase"] == "teardown"
    assert [link.context.span_id for link in teardown.links] == [_id(setup)]
    assert teardown.start_time >= setup.end_time
    assert spans.named("teardown _tree_app.<locals>.sync_resource")


async def test_timings_are_recorded_with_threadpool_wait(spans: Any) -> None:
    """RequestState.timings gets one entry per run, sync ones with their queue wait."""
    seen: list[RequestState] = []
    trackers: list[Any] = []

    class Grab(RequestHooks):
        order = 150  # after DependencySpans: its tracker is there

        def on_request_end(self, state: RequestState) -> None:
            seen.append(state)
            trackers.append(state._dependencies)

    app = _tree_app([])
    hooks = [fastprof.DependencySpans(tracer_provider=spans.provider), Grab()]
    fastprof.instrument(app, tracer_provider=spans.provider, hooks=hooks)
    await _get(app, "/items/1")
    (state,) = seen
    kinds = sorted((t.name.rsplit(".", 1)[-1], t.kind) for t in state.timings)
    assert ("get_user", "dependency") in kinds and ("read_config", "dependency") in kinds
    assert ("sync_resource", "dependency") in kinds
    config = next(t for t in state.timings if t.name.endswith("read_config"))
    assert config.threadpool_wait_s > 0
    assert trackers[0].spans == len(
        [s for s in spans.all() if s.name.startswith(("dependency ", "teardown "))]
    )
    assert _dep(spans, "_tree_app.<locals>.read_config").attributes[
        "fastprof.threadpool.wait_s"
    ] == pytest.approx(config.threadpool_wait_s)


# ----------------------------------------------------------------------------- FastAPI semantics


async def test_cache_semantics_are_unchanged(spans: Any) -> None:
    """use_cache=True runs once, use_cache=False runs each time."""
    calls = {"cached": 0, "uncached": 0}

    def cached() -> int:
        calls["cached"] += 1
        return 1

    def uncached() -> int:
        calls["uncached"] += 1
        return 1

    def a(x: int = Depends(cached), y: int = Depends(uncached, use_cache=False)) -> int:
        return x + y

    def b(x: int = Depends(cached), y: int = Depends(uncached, use_cache=False)) -> int:
        return x + y

    app = FastAPI()

    @app.get("/")
    def root(p: int = Depends(a), q: int = Depends(b)) -> int:
        return p + q

    _instrument(app, spans)
    assert (await _get(app, "/")).json() == 4
    assert calls == {"cached": 1, "uncached": 2}
    assert len(spans.named("dependency test_cache_semantics_are_unchanged.<locals>.cached")) == 1
    assert len(spans.named("dependency test_cache_semantics_are_unchanged.<locals>.uncached")) == 2


@pytest.mark.parametrize("order", ["before", "after"])
async def test_dependency_overrides_still_apply(spans: Any, order: str) -> None:
    """Overrides keyed by the original callable are used, set before or after instrument()."""

    def real_db() -> str:
        return "real"

    def fake_db() -> str:
        return "fake"

    def repo(color: Color = Color.red, db: str = Depends(real_db)) -> str:
        return f"repo({db},{color.value})"

    app = FastAPI()

    @app.get("/")
    def root(r: str = Depends(repo), db: str = Depends(real_db)) -> str:
        return f"{r},{db}"

    if order == "before":
        app.dependency_overrides[real_db] = fake_db
    _instrument(app, spans)
    if order == "after":
        app.dependency_overrides[real_db] = fake_db
    # a string annotation naming a module-level type still resolves (FastAPI < 0.116
    # evaluates it in the dependency's globals)
    assert (await _get(app, "/?color=blue")).json() == "repo(fake,blue),fake"
    repo_span = _dep(spans, "test_dependency_overrides_still_apply.<locals>.repo")
    fake = _dep(spans, "test_dependency_overrides_still_apply.<locals>.fake_db")
    assert _parent_id(fake) == _id(repo_span)


async def test_openapi_schema_is_identical(spans: Any) -> None:
    """Instrumenting changes nothing FastAPI derives from the routes."""

    def build() -> FastAPI:
        app = _tree_app([])
        scheme = OAuth2PasswordBearer(tokenUrl="token")

        @app.get("/secure", dependencies=[Depends(Settings)])
        async def secure(token: str = Depends(scheme), q: int = 0) -> str:
            return token

        return app

    plain = build().openapi()
    app = _instrument(build(), spans)
    await _get(app, "/items/1")
    assert app.openapi() == plain


async def test_security_and_router_level_dependencies_get_spans(spans: Any) -> None:
    """OAuth2 schemes and ``dependencies=[...]`` on routers are traced too."""
    from fastapi import APIRouter

    scheme = OAuth2PasswordBearer(tokenUrl="token")
    seen: list[str] = []

    def audit() -> None:
        seen.append("audit")

    router = APIRouter(dependencies=[Depends(audit)])

    @router.get("/me")
    async def me(token: str = Depends(scheme)) -> str:
        return token

    app = FastAPI()
    app.include_router(router)
    _instrument(app, spans)
    ok = await _get(app, "/me", headers={"Authorization": "Bearer abc"})
    assert ok.json() == "abc" and seen == ["audit"]
    assert spans.named("dependency OAuth2PasswordBearer")
    assert _dep(spans, "test_security_and_router_level_dependencies_get_spans.<locals>.audit")
    spans.clear()
    denied = await _get(app, "/me")
    assert denied.status_code == 401
    (span,) = spans.named("dependency OAuth2PasswordBearer")
    assert span.attributes["http.response.status_code"] == 401
    assert span.status.status_code is StatusCode.UNSET


# ----------------------------------------------------------------------------- errors


def _error_app(log: list[str]) -> FastAPI:
    async def broken() -> None:
        raise ValueError("boom")

    async def session() -> AsyncIterator[str]:
        try:
            yield "s"
        except KeyError:
            log.append("saw KeyError")
            raise

    async def bad_teardown() -> AsyncIterator[str]:
        yield "t"
        raise RuntimeError("teardown failed")

    app = FastAPI()

    @app.get("/broken")
    async def use_broken(x: None = Depends(broken)) -> str:
        return "never"

    @app.get("/endpoint-raises")
    async def endpoint_raises(s: str = Depends(session)) -> str:
        raise KeyError("in endpoint")

    @app.get("/bad-teardown")
    async def teardown_raises(t: str = Depends(bad_teardown)) -> str:
        return t

    @app.get("/invalid")
    async def invalid(n: int, s: str = Depends(session)) -> str:
        return s

    return app


@pytest.mark.parametrize("path", ["/broken", "/endpoint-raises", "/bad-teardown", "/invalid?n=x"])
async def test_errors_are_identical_with_and_without_fastprof(spans: Any, path: str) -> None:
    """Status, body and what the yield dependency saw do not change (C-11..C-13)."""
    base_log: list[str] = []
    base = await _get(_error_app(base_log), path)
    log: list[str] = []
    traced = await _get(_instrument(_error_app(log), spans), path)
    assert (traced.status_code, traced.content) == (base.status_code, base.content)
    assert log == base_log
    assert _internal_errors.counts() == {}


async def test_a_failing_dependency_span_records_the_error(spans: Any) -> None:
    app = _instrument(_error_app([]), spans)
    await _get(app, "/broken")
    span = _dep(spans, "_error_app.<locals>.broken")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    assert [e.name for e in span.events] == ["exception"]


async def test_teardown_errors_are_recorded_and_passed_through_exceptions_are_not(
    spans: Any,
) -> None:
    app = _instrument(_error_app([]), spans)
    await _get(app, "/bad-teardown")
    (bad,) = spans.named("teardown _error_app.<locals>.bad_teardown")
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.attributes["error.type"] == "RuntimeError"
    spans.clear()
    await _get(app, "/endpoint-raises")
    (passed,) = spans.named("teardown _error_app.<locals>.session")
    assert passed.status.status_code is StatusCode.UNSET  # the endpoint's error, not the dep's


async def test_invalid_input_leaves_no_open_span(spans: Any) -> None:
    """A 422 before the endpoint runs still ends every span it started."""
    app = _instrument(_error_app([]), spans)
    assert (await _get(app, "/invalid?n=x")).status_code == 422
    assert spans.open() == []  # every span started was ended (and exported)
    assert spans.server()
    assert any(s.name.startswith("dependency ") for s in spans.all())


# ------------------------------------------------------------------ limits, context, hooks


async def test_span_count_is_capped_and_drops_are_counted(spans: Any) -> None:
    """max_spans bounds spans per request; the rest are counted on the server span (D-14)."""

    def make(i: int) -> Any:
        def dep() -> int:
            return i

        dep.__qualname__ = f"dep{i}"
        return dep

    deps = [Depends(make(i)) for i in range(6)]
    app = FastAPI()

    @app.get("/", dependencies=deps)
    def root() -> str:
        return "ok"

    _instrument(app, spans, dependencies=fastprof.DependencySpans(max_spans=2))
    assert (await _get(app, "/")).json() == "ok"
    (server,) = spans.server()
    assert len([s for s in spans.all() if s.name.startswith("dependency")]) == 2
    assert server.attributes["fastprof.dependency_spans_dropped"] == 4


async def test_spans_opened_inside_a_dependency_are_its_children(spans: Any) -> None:
    tracer = spans.provider.get_tracer("user")
    seen_operation: list[str | None] = []

    async def query() -> str:
        seen_operation.append(fastprof.current_request.get().current_operation)  # type: ignore[union-attr]
        with tracer.start_as_current_span("db query"):
            return "rows"

    def sync_query() -> str:
        with tracer.start_as_current_span("sync query"):
            return "rows"

    app = FastAPI()

    @app.get("/")
    async def root(a: str = Depends(query), b: str = Depends(sync_query)) -> str:
        return a + b

    _instrument(app, spans)
    await _get(app, "/")
    prefix = "test_spans_opened_inside_a_dependency_are_its_children.<locals>."
    (db_query,) = spans.named("db query")
    (sync,) = spans.named("sync query")
    assert _parent_id(db_query) == _id(_dep(spans, prefix + "query"))
    assert _parent_id(sync) == _id(_dep(spans, prefix + "sync_query"))
    assert seen_operation == [prefix + "query"]
    # nothing stays attached in the caller's context
    assert not trace.get_current_span().is_recording()


async def test_worker_hook_wraps_sync_dependency_code(spans: Any) -> None:
    """A hook's run_in_worker is used for sync code run in the threadpool."""
    wrapped: list[str] = []

    class Profile(RequestHooks):
        def run_in_worker(self, state: RequestState, call: Any) -> Any:
            wrapped.append(threading.current_thread().name)
            return call()

    def sync_dep() -> Iterator[int]:
        yield 1

    def plain() -> int:
        return 2

    app = FastAPI()

    @app.get("/")
    async def root(a: int = Depends(sync_dep), b: int = Depends(plain)) -> int:
        return a + b

    hooks = [fastprof.DependencySpans(tracer_provider=spans.provider), Profile()]
    fastprof.instrument(app, tracer_provider=spans.provider, hooks=hooks)
    assert (await _get(app, "/")).json() == 3
    assert len(wrapped) == 3  # generator setup, generator teardown, plain
    assert threading.main_thread().name not in wrapped


async def test_concurrent_requests_keep_their_own_trees(spans: Any) -> None:
    """Interleaved requests: every dependency span is in its own request's trace (B-08)."""

    async def slow(i: int) -> int:
        await asyncio.sleep(random.random() / 100)
        return i

    def sync_slow(i: int) -> int:
        time.sleep(random.random() / 200)
        return i

    async def outer(a: int = Depends(slow), b: int = Depends(sync_slow)) -> int:
        await asyncio.sleep(random.random() / 100)
        return a + b

    app = FastAPI()

    @app.get("/{i}")
    async def root(i: int, v: int = Depends(outer)) -> int:
        return v

    _instrument(app, spans)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(client.get(f"/{i}", params={"i": i}) for i in range(20)))
    assert [r.json() for r in responses] == [2 * i for i in range(20)]
    servers = {s.context.trace_id: s for s in spans.server()}
    assert len(servers) == 20
    deps = [s for s in spans.all() if s.name.startswith("dependency")]
    assert len(deps) == 60
    by_id = {_id(s): s for s in spans.all()}
    for dep in deps:
        parent = by_id[_parent_id(dep)]
        assert parent.context.trace_id == dep.context.trace_id
        assert dep.context.trace_id in servers


async def test_internal_failures_are_contained(spans: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """If span creation breaks, the request behaves exactly as without fastprof (C-15)."""
    base = await _get(_tree_app([]), "/items/5")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("fastprof bug")

    monkeypatch.setattr(_tracker, "start_span", broken)
    monkeypatch.setattr(_fastapi, "start_span", broken)
    traced = await _get(_instrument(_tree_app([]), spans), "/items/5")
    assert (traced.status_code, traced.content) == (base.status_code, base.content)
    assert _internal_errors.counts()
    assert spans.server()


async def test_requests_without_the_hook_are_untouched(spans: Any) -> None:
    """The solver hook is process-wide, but only traced requests get dependency spans."""
    fastprof.DependencySpans(tracer_provider=spans.provider)  # installs the hook
    app = fastprof.instrument(_tree_app([]), tracer_provider=spans.provider, dependencies=False)
    assert (await _get(app, "/items/2")).status_code == 200
    assert (await _get(_tree_app([]), "/items/2")).status_code == 200
    assert [s.name for s in spans.all()] == ["GET /items/{item_id}"]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_spans"):
        fastprof.DependencySpans(max_spans=-1)
    with pytest.raises(ValueError, match="max_spans"):
        fastprof.DependencySpans(max_spans=True)
    with pytest.raises(ValueError, match="tracer_provider"):
        fastprof.DependencySpans(tracer_provider=object())  # type: ignore[arg-type]
    assert fastprof.DependencySpans().enabled


def test_installed_fastapi_gets_keyword_pass_throughs() -> None:
    """On the installed FastAPI the solver and serialization hooks are generated with
    FastAPI's own keyword-only signatures (no ``**kwargs`` round trip per request)."""
    import fastapi.dependencies.utils as utils
    import fastapi.routing as routing

    assert _fastapi.install()
    for hook in (utils.solve_dependencies, routing.serialize_response):
        assert hook.__code__.co_filename.startswith("<fastprof pass-through")
        assert inspect.signature(hook) == inspect.signature(hook.__wrapped__)


async def test_keyword_pass_through_forwards_or_traces() -> None:
    seen: list[Any] = []

    async def original(*, a: int, b: object = _tracker, c: str = "c") -> tuple[int, object, str]:
        return a, b, c

    def traced(tracker: Any, kwargs: dict[str, Any]) -> Any:
        seen.append((tracker, kwargs))
        return original(**kwargs)

    wrapper = _fastapi._keyword_passthrough(original, traced)
    assert wrapper is not None and wrapper.__wrapped__ is original  # type: ignore[attr-defined]
    assert await wrapper(a=1) == (1, _tracker, "c")  # defaults are the original's objects
    assert seen == []
    token = _tracker.active.set("tracker")  # type: ignore[arg-type]
    try:
        assert await wrapper(a=2, c="x") == (2, _tracker, "x")
    finally:
        _tracker.active.reset(token)
    assert seen == [("tracker", {"a": 2, "b": _tracker, "c": "x"})]
    with pytest.raises(TypeError):
        wrapper(1)  # keyword-only, as the original

    async def positional(a: int, *, b: int) -> None: ...

    async def named_like_ours(*, tracker: int) -> None: ...

    for unsupported in (positional, named_like_ours):
        assert _fastapi._keyword_passthrough(unsupported, traced) is None
