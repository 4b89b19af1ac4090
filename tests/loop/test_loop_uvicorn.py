"""End to end on a real uvicorn server with uvloop: lifespan start, attribution, clean stop."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from _loop_support import blocked_events, blocked_logs, line_of
from fastapi import BackgroundTasks, FastAPI
from structlog.testing import capture_logs

import fastprof
from tests._server import serve


@pytest.mark.server
def test_uvloop_server_reports_startup_and_request_blocks(spans: Any, make_monitor: Any) -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        time.sleep(0.25)  # BLOCK-UVICORN-STARTUP
        yield

    monitor = make_monitor(threshold_s=0.1)
    app = FastAPI(lifespan=lifespan)

    @app.get("/block/{n}")
    async def block(n: int) -> dict[str, int]:
        time.sleep(0.3)  # BLOCK-UVICORN-REQUEST
        return {"n": n}

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {}

    fastprof.instrument(app, tracer_provider=spans.provider, loop_monitor=monitor)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, loop="uvloop", lifespan="on", log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    with capture_logs() as logs:
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        assert monitor.running
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            assert http.get("/fine").status_code == 200
            assert http.get("/block/7").status_code == 200
        server.should_exit = True
        thread.join(10)
    assert not thread.is_alive()
    assert not monitor.running

    startup, request = blocked_logs(logs)
    assert startup["in_request"] is False
    assert startup["location"] == f"{__file__}:{line_of('# BLOCK-UVICORN-STARTUP', __file__)}"
    assert request["in_request"] is True
    assert request["route"] == "/block/{n}"
    assert request["location"] == f"{__file__}:{line_of('# BLOCK-UVICORN-REQUEST', __file__)}"
    by_route = {s.attributes["http.route"]: s for s in spans.server()}
    assert blocked_events(by_route["/fine"]) == []
    [event] = blocked_events(by_route["/block/{n}"])
    assert event.attributes["code.function.name"] == "block"


@pytest.mark.server
def test_unsampled_request_blocks_are_attributed_from_the_stack(make_monitor: Any) -> None:
    """Nothing head-sampled (production): unsampled requests take the lean path with the
    monitor on, yet a request that blocks the loop is named in the log, by route and
    request id, and its background task after the response is not."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    monitor = make_monitor(threshold_s=0.1)
    app = FastAPI()

    async def after_response() -> None:
        time.sleep(0.25)  # BLOCK-UNSAMPLED-BACKGROUND

    @app.get("/block/{n}")
    async def block(n: int, tasks: BackgroundTasks) -> dict[str, int]:
        time.sleep(0.3)  # BLOCK-UNSAMPLED-REQUEST
        tasks.add_task(after_response)
        return {"n": n}

    fastprof.instrument(
        app,
        tracer_provider=TracerProvider(sampler=ParentBased(ALWAYS_OFF)),
        loop_monitor=monitor,
    )
    with capture_logs() as logs:
        with serve(app, loop="uvloop", lifespan="on") as base, httpx.Client(
            base_url=base, timeout=5
        ) as http:
            response = http.get("/block/3", headers={"x-request-id": "unsampled-3"})
            assert response.status_code == 200
            time.sleep(0.4)  # the background task's block and the heartbeat after it

    request, background = blocked_logs(logs)
    assert request["in_request"] is True
    assert request["route"] == "/block/{n}"
    assert request["request_id"] == "unsampled-3"
    assert request["location"] == f"{__file__}:{line_of('# BLOCK-UNSAMPLED-REQUEST', __file__)}"
    assert background["in_request"] is False
    assert "request_id" not in background
    assert background["location"] == (
        f"{__file__}:{line_of('# BLOCK-UNSAMPLED-BACKGROUND', __file__)}"
    )
