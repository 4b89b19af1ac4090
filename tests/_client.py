"""An in-process HTTP client for an ASGI app (httpx over ASGITransport)."""

from __future__ import annotations

from typing import Any

import httpx


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """A client sending requests to ``app`` in-process (close it, or use ``async with``)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def get(
    app: Any, path: str, *, raise_app_exceptions: bool = False, **kwargs: Any
) -> httpx.Response:
    """One GET to ``app``; an exception the app raises becomes the server's 500 by default."""
    async with client(app, raise_app_exceptions=raise_app_exceptions) as http:
        return await http.get(path, **kwargs)
