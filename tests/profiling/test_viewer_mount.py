"""Mounted with ``mount_viewer``, the viewer cannot be told apart from an unknown path."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette

import fastprof
from fastprof.profiling import mount_viewer, viewer_token
from tests.profiling._profiling_support import SECRET

PATH = "/_fastprof/profiles"


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def _answer(response: httpx.Response) -> tuple[int, bytes, str | None, str | None]:
    return (
        response.status_code,
        response.content,
        response.headers.get("content-type"),
        response.headers.get("location"),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("framework", [FastAPI, Starlette])
async def test_bare_mount_path_answers_like_an_unknown_path(framework) -> None:
    profiling = fastprof.Profiling(secret=SECRET)
    app = framework()
    mount_viewer(app, profiling.viewer(), PATH)
    async with _client(app) as client:
        unknown = _answer(await client.get("/no-such-path"))
        assert unknown[0] == 404 and unknown[3] is None
        for path in (PATH, PATH + "/", PATH + "/" + "0" * 32, PATH + "/../x"):
            for headers in ({}, {"authorization": "Bearer wrong"}):
                assert _answer(await client.get(path, headers=headers)) == unknown, path
        # Authorised, the bare path is the list, as the path with a slash is.
        auth = {"authorization": f"Bearer {viewer_token(SECRET)}"}
        bare = await client.get(PATH, headers=auth)
        assert bare.status_code == 200 and "fastprof profiles" in bare.text
        assert (await client.get(PATH + "/", headers=auth)).text == bare.text
    profiling.close()


@pytest.mark.anyio
async def test_app_mount_alone_redirects_the_bare_path() -> None:
    """Why mount_viewer exists: the router redirects what Mount does not match."""
    profiling = fastprof.Profiling(secret=SECRET)
    app = FastAPI()
    app.mount(PATH, profiling.viewer())
    async with _client(app) as client:
        response = await client.get(PATH)
    assert response.status_code == 307 and response.headers["location"].endswith(PATH + "/")
    profiling.close()
