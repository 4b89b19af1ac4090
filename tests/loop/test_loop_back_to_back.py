"""Two requests blocking the loop one right after the other, with no heartbeat between
them, on a real uvicorn (asyncio and uvloop): each gets its own report."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from _loop_support import blocked_events, blocked_logs, line_of
from fastapi import FastAPI
from structlog.testing import capture_logs

import fastprof
from tests._server import serve


def _app(monitor: fastprof.LoopMonitor, spans: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {}

    @app.get("/c")
    async def c() -> dict[str, str]:
        time.sleep(0.3)  # BACK-C
        return {}

    @app.get("/a")
    async def a() -> dict[str, str]:
        time.sleep(0.3)  # BACK-A
        return {}

    @app.get("/b")
    async def b() -> dict[str, str]:
        time.sleep(0.3)  # BACK-B
        return {}

    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        loop_monitor=monitor,
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.2),
    )
    return app


@pytest.mark.server
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_back_to_back_blocks_get_a_report_each(spans: Any, make_monitor: Any, loop: str) -> None:
    monitor = make_monitor(threshold_s=0.1, max_reports_per_minute=100)
    app = _app(monitor, spans)
    with serve(app, loop=loop) as url, capture_logs() as logs:
        # One kept-alive connection per request: A's and B's arrive together while
        # C blocks, so the loop reads both in one pass and runs A's then B's
        # blocking step in the next one, with no heartbeat between them.
        clients = {name: httpx.Client(base_url=url, timeout=10) for name in "cab"}
        try:
            for http in clients.values():
                assert http.get("/fine").status_code == 200
            time.sleep(0.2)  # the monitor started with the first request
            threads = {
                name: threading.Thread(target=clients[name].get, args=(f"/{name}",))
                for name in "cab"
            }
            threads["c"].start()
            time.sleep(0.12)  # C is blocking the loop now
            threads["a"].start()
            threads["b"].start()
            for thread in threads.values():
                thread.join(10)
        finally:
            for http in clients.values():
                http.close()

    by_route = {s.attributes["http.route"]: s for s in spans.server()}
    reports = {log["route"]: log for log in blocked_logs(logs) if log.get("route") != "/fine"}
    assert set(reports) == {"/a", "/b", "/c"}
    slow = {log["route"]: log for log in logs if log.get("event") == "slow request"}
    for name in "cab":
        route = f"/{name}"
        line = line_of(f"# BACK-{name.upper()}", __file__)
        report = reports[route]
        assert report["location"] == f"{__file__}:{line}"
        assert 0.2 <= report["blocked_s"] <= 0.45, report
        [event] = blocked_events(by_route[route])
        assert event.attributes["code.line.number"] == line
        assert 0.2 <= event.attributes["fastprof.loop.blocked_s"] <= 0.45
        assert 0.2 <= slow[route]["loop_blocked_s"] <= 0.45, slow[route]
