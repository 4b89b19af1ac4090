"""A small FastAPI app with the shapes fastprof is built to explain.

Run it under the demo driver (``python examples/demo.py``) or on its own:
``uvicorn examples.demo_app:app`` after ``fastprof.instrument(app)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel


class Settings:
    def __init__(self) -> None:
        self.region = "eu-west-1"


def get_settings() -> Settings:
    """A sync dependency: FastAPI runs it in a worker thread."""
    time.sleep(0.002)
    return Settings()


async def get_db() -> AsyncIterator[dict[str, str]]:
    """A yield dependency: a session opened per request, committed on the way out."""
    await asyncio.sleep(0.010)  # connect
    yield {"session": "open"}
    await asyncio.sleep(0.015)  # commit: the teardown nobody else shows


async def current_user(
    db: Annotated[dict[str, str], Depends(get_db)],
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """An auth check that needs the database."""
    await asyncio.sleep(0.005)
    if authorization == "Bearer nope":
        raise HTTPException(status_code=401, detail="bad token")
    return "alice"


class Item(BaseModel):
    id: int
    name: str
    price: float


def create_app() -> FastAPI:
    app = FastAPI(title="fastprof demo")

    @app.get("/items/{item_id}", response_model=Item)
    async def read_item(
        item_id: int,
        user: Annotated[str, Depends(current_user)],
        settings: Annotated[Settings, Depends(get_settings)],
    ) -> Item:
        await asyncio.sleep(0.003)
        return Item(id=item_id, name=f"item {item_id} for {user}", price=9.5)

    @app.get("/items", response_model=list[Item])
    def list_items(settings: Annotated[Settings, Depends(get_settings)]) -> list[Item]:
        return [Item(id=i, name=f"item {i}", price=i * 1.5) for i in range(100)]

    @app.get("/blocking")
    async def blocking() -> dict[str, str]:
        time.sleep(0.25)  # a sync call inside async def: blocks the event loop
        return {"done": "yes"}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("something broke")

    return app


app = create_app()


def iter_demo_requests() -> Iterator[tuple[str, str, dict[str, str]]]:
    """The requests the demo driver sends: (label, path, headers)."""
    yield "a request with dependencies", "/items/42", {}
    yield "a refused login (401)", "/items/7", {"authorization": "Bearer nope"}
    yield "100 models through response_model", "/items", {}
    yield "an unhandled exception (500)", "/fail", {}
