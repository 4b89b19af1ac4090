"""The application every variant measures: three endpoints stressing different request paths.

* ``/plain``: an async endpoint returning a small JSON object (the fixed cost of a request);
* ``/deps``: an async dependency plus a sync dependency (run in the threadpool) that depends on
  an async ``yield`` dependency with teardown;
* ``/items``: 100 Pydantic models validated and serialised through ``response_model``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

__all__ = ["ENDPOINTS", "Item", "create_app"]

ENDPOINTS: tuple[str, ...] = ("/plain", "/deps", "/items")


class Item(BaseModel):
    id: int
    name: str
    price: float
    in_stock: bool
    tags: list[str]


_ITEMS = [
    Item(id=i, name=f"item-{i}", price=i * 1.25, in_stock=i % 3 != 0, tags=["a", f"t{i % 7}"])
    for i in range(100)
]


async def get_settings() -> dict[str, str]:
    return {"region": "eu-west-1"}


async def get_db() -> AsyncIterator[dict[str, Any]]:
    db: dict[str, Any] = {"open": True}
    try:
        yield db
    finally:
        db["open"] = False


def get_user(db: Annotated[dict[str, Any], Depends(get_db)]) -> dict[str, Any]:
    return {"id": 42, "db_open": db["open"]}


def create_app(**fastapi_kwargs: Any) -> FastAPI:
    """A fresh benchmark app; keyword arguments go to ``FastAPI(...)`` (e.g. ``telemetry=``)."""
    app = FastAPI(**fastapi_kwargs)

    @app.get("/plain")
    async def plain() -> dict[str, str]:
        return {"message": "hello"}

    @app.get("/deps")
    async def deps(
        settings: Annotated[dict[str, str], Depends(get_settings)],
        user: Annotated[dict[str, Any], Depends(get_user)],
    ) -> dict[str, Any]:
        return {"region": settings["region"], "user": user["id"], "db_open": user["db_open"]}

    @app.get("/items", response_model=list[Item])
    async def items() -> Any:
        return _ITEMS

    return app
