"""An unmodified FastAPI app served by the deployment tests (no fastprof import)."""

from __future__ import annotations

import asyncio
import os

from fastapi import Depends, FastAPI

app = FastAPI()


def settings() -> dict[str, str]:
    return {"tier": "test"}


@app.get("/items/{item_id}")
async def item(item_id: int, s: dict[str, str] = Depends(settings)) -> dict[str, object]:
    loop = type(asyncio.get_running_loop()).__module__
    return {"item_id": item_id, "pid": os.getpid(), "loop": loop, **s}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"ok": "yes"}


def create_app() -> FastAPI:
    """The same app from a factory (``--factory``)."""
    return app
