"""Server-Timing: opt-in, only for allowed requests (a profiled one, or an allow-list predicate)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

import fastprof
from fastprof._http import find_header
from fastprof.profiling import mint_token
from fastprof.testing import SpanRecorder
from tests._client import client

SECRET = "s" * 32


def quick_dep() -> int:
    return 1


async def slow_dep() -> int:
    await asyncio.sleep(0.05)
    return 2


def _app(spans: SpanRecorder, **options: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, a: int = Depends(quick_dep), b: int = Depends(slow_dep)
    ) -> dict[str, int]:
        time.sleep(0.01)
        return {"item_id": item_id}

    fastprof.instrument(app, tracer_provider=spans.provider, **options)
    return app


def _debug(scope: Any) -> bool:
    return find_header(scope.get("headers") or [], b"x-debug") == b"1"


def _entries(value: str) -> dict[str, dict[str, str]]:
    entries: dict[str, dict[str, str]] = {}
    for part in value.split(", "):
        name, *params = part.split(";")
        entries[name] = dict(p.split("=", 1) for p in params)
    return entries


@pytest.mark.anyio
@pytest.mark.parametrize("sampler", [ALWAYS_ON, ALWAYS_OFF], ids=["sampled", "unsampled"])
async def test_allowed_request_gets_phases_and_slowest_dependencies(sampler: Any) -> None:
    app = _app(SpanRecorder(sampler=sampler), server_timing=fastprof.ServerTiming(allow=_debug))
    async with client(app) as c:
        response = await c.get("/items/3", headers={"x-debug": "1"})
    assert response.status_code == 200
    entries = _entries(response.headers["server-timing"])
    # threadpool-wait: quick_dep is sync (its wait for a worker thread, when measurable).
    assert [n for n in entries if n != "threadpool-wait"] == [
        "app",
        "endpoint",
        "serialization",
        "dep1",
        "dep2",
    ]
    assert entries["endpoint"]["desc"].endswith('get_item"')
    assert float(entries["endpoint"]["dur"]) >= 9.0
    # Slowest first.
    assert entries["dep1"]["desc"] == '"slow_dep"'
    assert float(entries["dep1"]["dur"]) >= 45.0
    assert entries["dep2"]["desc"] == '"quick_dep"'
    assert float(entries["app"]["dur"]) >= float(entries["dep1"]["dur"])
    for entry in entries.values():
        assert re.fullmatch(r"\d+\.\d", entry["dur"])


@pytest.mark.anyio
async def test_absent_by_default_and_for_requests_not_allowed() -> None:
    plain = _app(SpanRecorder())
    async with client(plain) as c:
        response = await c.get("/items/1", headers={"x-debug": "1"})
    assert "server-timing" not in response.headers
    app = _app(SpanRecorder(), server_timing=fastprof.ServerTiming(allow=_debug))
    async with client(app) as c:
        response = await c.get("/items/1")
        other = await c.get("/items/1", headers={"x-debug": "0"})
    assert "server-timing" not in response.headers
    assert "server-timing" not in other.headers


@pytest.mark.anyio
async def test_profiled_requests_get_it() -> None:
    profiling = fastprof.Profiling(secret=SECRET)
    app = _app(
        SpanRecorder(sampler=ALWAYS_OFF),
        profiling=profiling,
        server_timing=fastprof.ServerTiming(),
    )
    token = mint_token(SECRET, ttl_s=60)
    async with client(app) as c:
        profiled = await c.get("/items/2", headers={"x-fastprof-profile": token})
        plain = await c.get("/items/2")
    assert "x-fastprof-profile-id" in profiled.headers
    assert "dep1" in _entries(profiled.headers["server-timing"])
    assert "server-timing" not in plain.headers


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="allow"):
        fastprof.ServerTiming(allow="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top"):
        fastprof.ServerTiming(top=100)
    with pytest.raises(ValueError, match="server_timing"):
        fastprof.instrument(FastAPI(), server_timing=object())  # type: ignore[arg-type]
