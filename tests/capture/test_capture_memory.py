"""The capture's records leave nothing behind: no reference cycles, exported or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import fastprof
from fastprof.testing import SpanRecorder
from tests._transparency import garbage_after_requests

pytestmark = pytest.mark.anyio


async def get_db() -> AsyncIterator[str]:
    yield "db"


def get_settings() -> str:
    return "settings"


@pytest.mark.parametrize("threshold_s", [10.0, 0.0], ids=["under-threshold", "exported"])
async def test_captured_requests_create_no_reference_cycles(threshold_s: float) -> None:
    spans = SpanRecorder(sampler=ALWAYS_OFF)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(
        item_id: int, db: str = Depends(get_db), settings: str = Depends(get_settings)
    ) -> dict[str, Any]:
        return {"item_id": item_id}

    capture = fastprof.SlowRequestCapture(threshold_s=threshold_s, max_per_minute=100_000)
    fastprof.instrument(
        app,
        tracer_provider=spans.provider,
        slow_capture=capture,
        server_timing=fastprof.ServerTiming(allow=lambda scope: True),
    )
    assert await garbage_after_requests(app, "/items/1") == 0
    assert capture.exported == (70 if threshold_s == 0.0 else 0)
    spans.shutdown()
