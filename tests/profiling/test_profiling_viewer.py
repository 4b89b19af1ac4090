"""The profile viewer, tokens and the CLI."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import fastprof
from fastprof.__main__ import main
from fastprof.profiling import MemoryStore, ProfileMeta, mint_token, viewer_app, viewer_token
from fastprof.profiling._tokens import ReplayCache, TokenClaims, TokenVerifier, normalize_secrets
from tests.profiling._profiling_support import SECRET, asgi_call, make_app

HEADER = b"x-fastprof-profile"


async def stored_profile(spans) -> tuple[fastprof.Profiling, str]:  # type: ignore[no-untyped-def]
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    sent = await asgi_call(app, "/alpha", [(HEADER, mint_token(SECRET).encode())])
    profile_id = dict(sent[0]["headers"])[b"x-fastprof-profile-id"].decode()
    assert profiling.flush(10)
    return profiling, profile_id


def mounted(profiling: fastprof.Profiling) -> Starlette:
    return Starlette(routes=[Mount("/_fastprof/profiles", app=profiling.viewer())])


def auth_header() -> dict[str, str]:
    return {"Authorization": f"Bearer {viewer_token(SECRET)}"}


@pytest.mark.anyio
async def test_viewer_serves_all_formats_to_authorised_clients(spans) -> None:
    profiling, profile_id = await stored_profile(spans)
    transport = httpx.ASGITransport(app=mounted(profiling))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        page = await client.get(f"/_fastprof/profiles/{profile_id}", headers=auth_header())
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "pyinstrument" in page.text
        speedscope = await client.get(
            f"/_fastprof/profiles/{profile_id}?format=speedscope", headers=auth_header()
        )
        assert "speedscope" in speedscope.json()["$schema"]
        session = await client.get(
            f"/_fastprof/profiles/{profile_id}?format=json", headers=auth_header()
        )
        assert session.json()["sample_count"] > 0
        listing = await client.get("/_fastprof/profiles/", headers=auth_header())
        assert f'href="/_fastprof/profiles/{profile_id}"' in listing.text
        listing_json = await client.get("/_fastprof/profiles/?format=json", headers=auth_header())
        assert listing_json.json()[0]["profile_id"] == profile_id


@pytest.mark.anyio
async def test_viewer_refuses_unauthenticated_and_path_tricks(spans) -> None:
    profiling, profile_id = await stored_profile(spans)
    transport = httpx.ASGITransport(app=mounted(profiling))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        base = "/_fastprof/profiles"
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic x"},
            {"Authorization": "Bearer " + "a" * 2000},
            {"Authorization": f"Bearer {mint_token(SECRET)}"},
        ):
            for path in (f"{base}/{profile_id}", f"{base}/"):
                response = await client.get(path, headers=headers)
                assert response.status_code == 404, (headers, path)
                assert response.content == b"Not Found"
        tricks = [
            f"{base}/../{profile_id}",
            f"{base}/%2e%2e/%2e%2e/etc/passwd",
            f"{base}/{profile_id}/../../x",
            f"{base}/{profile_id.upper()}",
            f"{base}/{profile_id}.profile",
            f"{base}/{profile_id}%00",
            f"{base}//{profile_id}",
            f"{base}/{'0' * 32}",
            f"{base}/{profile_id}?format=../../x",
        ]
        for path in tricks:
            response = await client.get(path, headers=auth_header())
            assert response.status_code == 404, path
        post = await client.post(f"{base}/{profile_id}", headers=auth_header())
        assert post.status_code == 404


@pytest.mark.anyio
async def test_viewer_listing_escapes_html() -> None:
    store = MemoryStore()
    store.put(
        ProfileMeta(
            "a" * 32, created=time.time(), method="GET", route="/<script>alert(1)</script>"
        ),
        b"doc",
    )
    app = viewer_app(store, auth=lambda scope: True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        listing = await client.get("/")
    assert "<script>" not in listing.text
    assert "&lt;script&gt;" in listing.text


def test_viewer_requires_auth_or_secret() -> None:
    with pytest.raises(ValueError, match="auth"):
        viewer_app(MemoryStore())
    with pytest.raises(ValueError, match="auth"):
        fastprof.Profiling(sample_rate=0.1).viewer()


def test_token_roundtrip_scope_and_replay() -> None:
    secrets = normalize_secrets(SECRET)
    verifier = TokenVerifier(secrets, max_ttl_s=3600, replay_cache=ReplayCache(10))
    token = mint_token(SECRET, ttl_s=60, route="/items/{item_id}", method="get")
    claims = verifier.verify(token.encode())
    assert isinstance(claims, TokenClaims)
    assert (claims.method, claims.route) == ("GET", "/items/{item_id}")
    assert verifier.verify(token.encode()) == "replayed"
    assert len(token) < 200 and all(c.isalnum() or c in "._-" for c in token)


def test_overlong_token_is_refused_before_any_hmac(monkeypatch) -> None:
    import fastprof.profiling._tokens as tokens

    calls = []
    real_sign = tokens._Signer.sign
    monkeypatch.setattr(
        tokens._Signer,
        "sign",
        lambda self, payload: calls.append(payload) or real_sign(self, payload),
    )
    verifier = TokenVerifier(normalize_secrets(SECRET), max_ttl_s=3600, replay_cache=ReplayCache())
    assert verifier.verify(b"v1." + b"A" * 1000) == "malformed"
    assert verifier.verify(b"v1.1.2.3") == "malformed"
    assert calls == []
    # A well-formed token does reach the HMAC (so the check above can fail).
    forged = tokens.mint_token(b"another-secret-" + b"x" * 32).encode()
    calls.clear()  # minting signs too
    assert verifier.verify(forged) == "forged"
    assert len(calls) == 1


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = ReplayCache(max_entries=2)
    now = 1000.0
    assert cache.add("a", 2000, now) is None
    assert cache.add("b", 2000, now) is None
    assert cache.add("c", 2000, now) == "replay_cache_full"
    assert cache.add("a", 2000, now) == "replayed"
    assert cache.add("d", 3000, 2500.0) is None  # expired entries are dropped first
    assert len(cache) <= 2


def test_viewer_token_differs_from_secret_and_tokens() -> None:
    token = viewer_token(SECRET)
    assert SECRET not in token
    assert token == viewer_token([SECRET, "z" * 32])
    verifier = TokenVerifier(normalize_secrets(SECRET), max_ttl_s=3600, replay_cache=ReplayCache())
    assert not isinstance(verifier.verify(token.encode()), TokenClaims)


def test_cli_token_mints_a_valid_token(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FASTPROF_SECRET", SECRET)
    assert main(["token", "--ttl", "120", "--route", "/alpha", "--method", "GET"]) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier(normalize_secrets(SECRET), max_ttl_s=3600, replay_cache=ReplayCache())
    claims = verifier.verify(token.encode())
    assert isinstance(claims, TokenClaims) and claims.route == "/alpha"
    assert claims.exp <= time.time() + 121


def test_cli_refuses_missing_or_short_secret(monkeypatch, capsys) -> None:
    monkeypatch.delenv("FASTPROF_SECRET", raising=False)
    with pytest.raises(SystemExit):
        main(["token"])
    monkeypatch.setenv("FASTPROF_SECRET", "short")
    assert main(["token"]) == 2
    assert "short" not in capsys.readouterr().err.replace("at least", "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.server
@pytest.mark.anyio
async def test_cli_profile_get_downloads_from_a_real_viewer(spans, tmp_path, monkeypatch) -> None:
    import uvicorn

    profiling, profile_id = await stored_profile(spans)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            mounted(profiling), host="127.0.0.1", port=port, log_level="error", lifespan="off"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.025)
        monkeypatch.setenv("FASTPROF_SECRET", SECRET)
        url = f"http://127.0.0.1:{port}/_fastprof/profiles"
        out = tmp_path / "p.json"
        rc = await _in_thread(
            main, ["profile", "get", profile_id, "--url", url, "--format", "json", "-o", str(out)]
        )
        assert rc == 0
        assert json.loads(out.read_bytes())["sample_count"] > 0
        rc = await _in_thread(
            main, ["profile", "get", "0" * 32, "--url", url, "-o", str(tmp_path / "x")]
        )
        assert rc == 1
        assert main(["profile", "get", "../etc", "--url", url]) == 2
    finally:
        server.should_exit = True
        thread.join(10)


async def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    import anyio.to_thread

    return await anyio.to_thread.run_sync(fn, *args)
