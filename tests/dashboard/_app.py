"""The app the dashboard tests serve: dependencies, a teardown, a worker thread, a
blocked loop, an exception, and a path parameter that echoes what it is given."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from opentelemetry.sdk.trace import TracerProvider

import fastprof

SECRET = "dashboard-test-secret-0123456789abcdef"
XSS = "<script>window.__xss=1</script>"


def get_settings() -> dict[str, str]:
    """Sync: FastAPI runs it in a worker thread."""
    time.sleep(0.002)
    return {"region": "eu"}


async def get_db() -> AsyncIterator[str]:
    await asyncio.sleep(0.005)
    yield "db"
    await asyncio.sleep(0.01)  # teardown, after the response


async def current_user(db: Annotated[str, Depends(get_db)]) -> str:
    await asyncio.sleep(0.003)
    return "alice"


def create_app(
    provider: TracerProvider, profiling: fastprof.Profiling, hooks: tuple[Any, ...] = ()
) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def read_item(
        item_id: int,
        user: Annotated[str, Depends(current_user)],
        settings: Annotated[dict[str, str], Depends(get_settings)],
    ) -> dict[str, Any]:
        await asyncio.sleep(0.002)
        return {"id": item_id, "user": user}

    @app.get("/echo/{text}")
    async def echo(text: str) -> dict[str, str]:
        return {"text": text}

    @app.get("/blocking")
    async def blocking() -> dict[str, bool]:
        time.sleep(0.12)  # blocks the event loop
        return {"done": True}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError(f"broken {XSS}")

    fastprof.instrument(
        app,
        tracer_provider=provider,
        profiling=profiling,
        loop_monitor=fastprof.LoopMonitor(threshold_s=0.05),
        hooks=hooks,
    )
    return app
