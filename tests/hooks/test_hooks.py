"""The hook contract: phases in declared order, and a guarded worker-thread seam."""

from __future__ import annotations

import threading
from typing import Any

import anyio.to_thread
import pytest
from fastapi import Depends, FastAPI

import fastprof
from fastprof import _internal_errors
from fastprof.hooks import RequestHooks, run_in_worker
from fastprof.testing import SpanRecorder
from tests._client import get

pytestmark = pytest.mark.anyio


class _Recorder(RequestHooks):
    def __init__(self, name: str, log: list[str], order: int = 0) -> None:
        self.name = name
        self.log = log
        self.order = order  # type: ignore[misc]

    def on_request_start(self, state: Any, scope: Any) -> None:
        self.log.append(f"start:{self.name}")

    def run_in_worker(self, state: Any, call: Any) -> Any:
        self.log.append(f"worker-in:{self.name}")
        try:
            return call()
        finally:
            self.log.append(f"worker-out:{self.name}")

    def on_response_start(self, state: Any, message: Any) -> None:
        self.log.append(f"response:{self.name}")

    def on_response_complete(self, state: Any) -> None:
        self.log.append(f"complete:{self.name}")

    def on_request_end(self, state: Any) -> None:
        self.log.append(f"end:{self.name}")

    def on_app_exit(self, state: Any) -> None:
        self.log.append(f"exit:{self.name}")


def _app(log: list[str]) -> FastAPI:
    app = FastAPI()

    def sync_dep() -> int:
        log.append("dependency")
        return 1

    @app.get("/")
    async def root(value: int = Depends(sync_dep)) -> int:
        return value

    return app


async def test_phases_run_in_order_and_hooks_in_declared_order(spans: Any) -> None:
    log: list[str] = []
    hooks = [_Recorder("late", log, order=50), _Recorder("early", log, order=-50)]
    app = fastprof.instrument(_app(log), tracer_provider=spans.provider, hooks=hooks)
    assert (await get(app, "/")).json() == 1
    assert log == [
        "start:early",
        "start:late",
        "worker-in:early",  # the first hook is outermost
        "worker-in:late",
        "dependency",
        "worker-out:late",
        "worker-out:early",
        "response:early",
        "response:late",
        "complete:early",
        "complete:late",
        "end:early",
        "end:late",
        "exit:early",
        "exit:late",
    ]


def test_fastprof_components_declare_their_order() -> None:
    profiling = fastprof.Profiling(sample_rate=0.5)
    deps = fastprof.DependencySpans()
    monitor = fastprof.LoopMonitor()
    log = fastprof.SlowRequestLog()
    assert profiling.order < RequestHooks.order < deps.order < monitor.order < log.order


class _Broken(RequestHooks):
    def __init__(self, when: str) -> None:
        self.when = when

    def run_in_worker(self, state: Any, call: Any) -> Any:
        if self.when == "before":
            raise RuntimeError("hook failed before the call")
        result = call()
        if self.when == "after":
            raise RuntimeError("hook failed after the call")
        return result


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_failing_worker_hook_still_runs_the_call_once(spans: Any, when: str) -> None:
    ran: list[str] = []

    def work() -> int:
        ran.append(threading.current_thread().name)
        return 7

    captured: dict[str, Any] = {}

    class Grab(RequestHooks):
        def on_request_start(self, state: Any, scope: Any) -> None:
            captured["state"] = state

    app = FastAPI()

    @app.get("/")
    async def root() -> int:
        state = fastprof.current_request.get()
        assert state is not None
        return await anyio.to_thread.run_sync(state.run_in_worker, work)

    fastprof.instrument(app, tracer_provider=spans.provider, hooks=[_Broken(when), Grab()])
    assert (await get(app, "/")).json() == 7
    assert len(ran) == 1
    assert _internal_errors.counts() == {"hook.run_in_worker": 1}


async def test_the_applications_exception_passes_through_untouched(spans: Any) -> None:
    class Boom(Exception):
        pass

    error = Boom("app")

    def work() -> None:
        raise error

    class Swallow(RequestHooks):
        def run_in_worker(self, state: Any, call: Any) -> Any:
            try:
                return call()
            except Boom:
                raise RuntimeError("a hook that replaces the error") from None

    span = SpanRecorder().provider.get_tracer("t").start_span("s")
    state = fastprof.RequestState(span, "GET", "/")
    state._worker_hooks = (Swallow(),)
    with pytest.raises(Boom) as raised:
        run_in_worker(state, work)
    assert raised.value is error
    assert error.__context__ is None  # fastprof adds no context to it
    assert _internal_errors.counts() == {"hook.run_in_worker": 1}
