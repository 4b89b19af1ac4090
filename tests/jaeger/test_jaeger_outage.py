"""End to end: Jaeger stopped in the middle of a run, then started again.

Requests keep their latency (compared with the same requests while Jaeger is up), the spans
that could not be delivered are counted by ``fastprof.exporters.export_stats``, and export
resumes when Jaeger is back on the same address.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

import fastprof
from fastprof.exporters import export_stats, otlp_span_processor
from tests._jaeger import Jaeger
from tests._server import serve

pytestmark = [pytest.mark.jaeger, pytest.mark.server]

SERVICE = "fastprof-e2e-outage"
REQUESTS = 30
SPANS_PER_REQUEST = 6  # server, 3 phases, dependency get_db, teardown get_db


async def get_db() -> AsyncIterator[str]:
    yield "session"


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/items/{iid}")
    async def item(iid: int, db: Annotated[str, Depends(get_db)]) -> dict[str, int]:
        await asyncio.sleep(0.002)
        return {"iid": iid}

    return app


def drive(client: httpx.Client) -> tuple[list[float], list[str]]:
    """REQUESTS requests, each in a new trace of known id; their latencies and trace ids."""
    latencies: list[float] = []
    trace_ids: list[str] = []
    for i in range(REQUESTS):
        trace_id = secrets.token_hex(16)
        headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        started = time.perf_counter()
        response = client.get(f"/items/{i}", headers=headers)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
        trace_ids.append(trace_id)
    return latencies, trace_ids


def wait_until(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_outage_keeps_latency_counts_lost_spans_and_export_resumes(jaeger: Jaeger) -> None:
    processor = otlp_span_processor(jaeger.otlp_http_endpoint, timeout_s=1.0, schedule_delay_s=0.1)
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(processor)
    app = fastprof.instrument(make_app(), tracer_provider=provider)
    spans = REQUESTS * SPANS_PER_REQUEST
    try:
        with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=10) as client:
            client.get("/items/0")  # warm up (route resolution, first connection)
            time.sleep(0.05)  # its teardown span ends after the response
            assert processor.force_flush(10_000)
            base = export_stats(processor)
            assert base.failed == 0

            # 1. Jaeger up.
            up_latencies, up_ids = drive(client)
            wait_until(lambda: export_stats(processor).exported >= base.exported + spans, 10, "up")
            for trace_id in up_ids[:3] + up_ids[-3:]:
                assert len(jaeger.wait_for_spans(trace_id, count=SPANS_PER_REQUEST)) == 6
            assert processor.force_flush(10_000)
            before_outage = export_stats(processor)
            assert before_outage.failed == 0

            # 2. Jaeger down: same requests, same latency; the spans are lost and counted.
            jaeger.stop()
            down_latencies, _ = drive(client)
            wait_until(
                lambda: export_stats(processor).failed >= spans, 20, f"{spans} failed spans"
            )
            during = export_stats(processor)
            assert during.failed == spans
            assert during.exported == before_outage.exported

            # 3. Jaeger back on the same ports: export resumes.
            jaeger.start()
            _, again_ids = drive(client)
            for trace_id in again_ids[:3] + again_ids[-3:]:
                assert len(jaeger.wait_for_spans(trace_id, count=SPANS_PER_REQUEST)) == 6
            after = export_stats(processor)
            assert after.exported >= before_outage.exported + spans
            assert after.failed == spans
    finally:
        if not jaeger.running:
            jaeger.start()  # the module's fixture owns it
        provider.shutdown()

    up, down = statistics.median(up_latencies), statistics.median(down_latencies)
    # Export happens on the batch processor's thread: an exporter waiting on a dead Jaeger
    # (1 s timeout, retries) inside a request would cost >= 1 s. The bounds leave room for a
    # busy 2-core machine (measured: median 3.9 ms up, 3.9 ms down).
    assert down < up * 2 + 0.010, (up, down)
    assert max(down_latencies) < 0.9, sorted(down_latencies)[-5:]
