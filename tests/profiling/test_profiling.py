"""On-demand profiles: triggers, what a profile covers, where it goes."""

from __future__ import annotations

import functools
import logging
import random
import re
import sys
import time
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import fastprof
from fastprof import _internal_errors
from fastprof.hooks import run_in_worker
from fastprof.profiling import MemoryStore, _documents, mint_token
from tests.profiling._profiling_support import (
    OTHER_SECRET,
    SECRET,
    asgi_call,
    client_for,
    frames_of,
    make_app,
)

HEADER = b"x-fastprof-profile"


def profile_attrs(span: object) -> dict[str, object]:
    attrs = dict(span.attributes or {})  # type: ignore[attr-defined]
    return {k: v for k, v in attrs.items() if k.startswith("fastprof.profile")}


@pytest.mark.anyio
async def test_valid_token_profiles_request(spans) -> None:
    """A valid token yields a stored profile linked from the span and the response."""
    profiling = fastprof.Profiling(
        secret=SECRET, base_url="https://ops.example/_fastprof/profiles/"
    )
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.status_code == 200
    profile_id = response.headers["x-fastprof-profile-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", profile_id)
    (server,) = spans.server()
    attrs = profile_attrs(server)
    assert attrs["fastprof.profile.id"] == profile_id
    assert attrs["fastprof.profile.url"] == f"https://ops.example/_fastprof/profiles/{profile_id}"
    assert attrs["fastprof.profile.trigger"] == "header"
    (event,) = [e for e in server.events if e.name == "fastprof.profile"]
    assert event.attributes is not None
    functions = list(event.attributes["fastprof.profile.top.function"])  # type: ignore[arg-type]
    assert any("spin" in f or "async_hot_alpha" in f for f in functions[:3]), functions
    # Time suspended while other work ran is waiting, apart from the functions.
    assert "[out-of-context]" not in functions
    waiting = event.attributes["fastprof.profile.waiting_seconds"]
    assert isinstance(waiting, float) and waiting >= 0.0
    assert "async_hot_alpha" in frames_of(profiling, profile_id)
    assert profiling.stats()["stored"] == 1


@pytest.mark.anyio
async def test_profile_without_samples_is_stored_without_a_hot_frames_event(spans) -> None:
    """No sample (a request shorter than the interval): nothing is hot, so no event."""
    profiling = fastprof.Profiling(secret=SECRET, interval_s=1.0)
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get("/items/1", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    profile_id = response.headers["x-fastprof-profile-id"]
    (server,) = spans.server()
    attrs = profile_attrs(server)
    assert attrs["fastprof.profile.id"] == profile_id
    assert attrs["fastprof.profile.samples"] == 0
    assert not [e for e in server.events if e.name == "fastprof.profile"]
    assert profiling.store.get(profile_id) is not None


class _SamplerProbe(fastprof.RequestHooks):
    """Records whether a profile was still sampling when fastprof's end-of-request work ran."""

    def __init__(self) -> None:
        self.sampling_at_end: list[bool] = []

    def on_request_end(self, state: fastprof.RequestState) -> None:
        self.sampling_at_end.append(sys.getprofile() is not None)


@pytest.mark.anyio
async def test_profile_stops_before_fastprofs_end_of_request_work(spans, monkeypatch) -> None:
    """The profile covers the request, not fastprof's own bookkeeping when it completes:
    neither the route resolution nor any component's ``on_request_end`` is sampled."""
    probe = _SamplerProbe()
    at_finalize: list[bool] = []
    finalize_route = fastprof.RequestState.finalize_route

    def finalize(self: fastprof.RequestState) -> None:  # fastprof's own end-of-request work
        at_finalize.append(sys.getprofile() is not None)
        finalize_route(self)

    monkeypatch.setattr(fastprof.RequestState, "finalize_route", finalize)
    profiling = fastprof.Profiling(secret=SECRET)
    app = FastAPI()

    @app.get("/x")
    async def endpoint() -> dict[str, bool]:
        return {"sampling": sys.getprofile() is not None}

    fastprof.instrument(app, tracer_provider=spans.provider, profiling=profiling, hooks=[probe])
    async with client_for(app) as client:
        response = await client.get("/x", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.json() == {"sampling": True}
    assert "x-fastprof-profile-id" in response.headers
    assert at_finalize == [False]
    assert probe.sampling_at_end == [False]
    assert profile_attrs(spans.server()[0])["fastprof.profile.id"]


@pytest.mark.anyio
async def test_profile_stop_failure_never_fails_the_request(spans, monkeypatch) -> None:
    """pyinstrument failing to stop: the request is served, the slot is released, no profile."""
    from fastprof.profiling import _capture

    unsubscribe = _capture._unsubscribe

    def broken(target: Any) -> None:
        unsubscribe(target)  # sampling stops, then the stop fails
        raise RuntimeError("sampler gone")

    profiling = fastprof.Profiling(secret=SECRET, max_concurrent=1)
    app = make_app(profiling, spans)
    monkeypatch.setattr(_capture, "_unsubscribe", broken)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    monkeypatch.undo()
    assert response.status_code == 200 and response.json() == {"endpoint": "alpha"}
    assert _internal_errors.counts()["profile.stop"] == 1
    assert "fastprof.profile.id" not in profile_attrs(spans.server()[0])
    # The response header left before the profile ended; its id resolves to nothing.
    assert profiling.store.get(response.headers["x-fastprof-profile-id"]) is None
    stats = profiling.stats()
    assert stats["started"] == 1 and stats["stored"] == 0 and stats["active"] == 0
    # The concurrency slot was released: the next token profiles.
    spans.clear()
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert "x-fastprof-profile-id" in response.headers
    assert profile_attrs(spans.server()[0])["fastprof.profile.id"]


def _tokens_that_must_not_profile(clock_now: float) -> dict[str, list[tuple[bytes, bytes]]]:
    return {
        "missing": [],
        "empty": [(HEADER, b"")],
        "garbage": [(HEADER, b"not-a-token")],
        "non_ascii": [(HEADER, "v1.é".encode("latin-1"))],
        "huge": [(HEADER, b"v1." + b"A" * 5000)],
        "forged": [(HEADER, mint_token(OTHER_SECRET).encode())],
        "tampered_scope": [
            (HEADER, mint_token(SECRET, route="/alpha").replace(".", ".x", 1).encode())
        ],
        "expired": [(HEADER, mint_token(SECRET, ttl_s=10, now=clock_now - 100).encode())],
        "too_long_lived": [(HEADER, mint_token(SECRET, ttl_s=10 * 86400).encode())],
        "wrong_route": [(HEADER, mint_token(SECRET, route="/alpha").encode())],
        "wrong_method": [(HEADER, mint_token(SECRET, method="POST").encode())],
    }


@pytest.mark.anyio
async def test_refused_tokens_are_served_byte_identically(spans, caplog) -> None:
    """Missing/malformed/forged/expired/replayed/wrong-scope tokens change nothing."""
    caplog.set_level(logging.DEBUG, logger="fastprof")
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    baseline = await asgi_call(app, "/items/7")
    assert baseline[0]["status"] == 200
    cases = _tokens_that_must_not_profile(time.time())
    replayed = mint_token(SECRET)
    first = await asgi_call(app, "/items/7", [(HEADER, replayed.encode())])
    assert any(k == b"x-fastprof-profile-id" for k, _ in first[0]["headers"])
    cases["replayed"] = [(HEADER, replayed.encode())]
    spans.clear()
    for name, headers in cases.items():
        sent = await asgi_call(app, "/items/7", headers)
        assert sent == baseline, name
    for server in spans.server():
        assert profile_attrs(server) == {}
        assert not [e for e in server.events if e.name == "fastprof.profile"]
    stats = profiling.stats()
    assert stats["started"] == 1
    for reason in (
        "malformed",
        "forged",
        "expired",
        "lifetime_too_long",
        "wrong_route",
        "wrong_method",
        "replayed",
    ):
        assert stats[f"refused.{reason}"] >= 1, reason
    assert "profile token refused" in caplog.text
    # Neither the secret nor any token is ever logged.
    assert SECRET not in caplog.text
    assert replayed not in caplog.text
    assert _internal_errors.counts() == {}


@pytest.mark.anyio
async def test_route_and_method_scoped_token(spans) -> None:
    """A token scoped to a route template and method profiles only that route and method."""
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    token = mint_token(SECRET, route="/items/{item_id}", method="POST")
    sent = await asgi_call(app, "/items/42", [(HEADER, token.encode())], method="POST")
    assert any(k == b"x-fastprof-profile-id" for k, _ in sent[0]["headers"])
    assert profiling.stats()["started"] == 1


@pytest.mark.anyio
async def test_key_rotation(spans) -> None:
    """With a list of secrets, tokens signed by any of them are accepted."""
    new = "n" * 32
    profiling = fastprof.Profiling(secret=[new, SECRET])
    app = make_app(profiling, spans)
    for secret in (new, SECRET):
        sent = await asgi_call(app, "/items/1", [(HEADER, mint_token(secret).encode())])
        assert any(k == b"x-fastprof-profile-id" for k, _ in sent[0]["headers"])
    assert profiling.stats()["started"] == 2


@pytest.mark.anyio
async def test_sampling_rate_is_honoured_statistically(spans) -> None:
    """About sample_rate of requests are profiled (binomial bounds, seeded RNG)."""
    rng = random.Random(20240611)
    profiling = fastprof.Profiling(
        sample_rate=0.2, max_per_minute=10_000, writer_queue_size=1024, rng=rng.random
    )
    app = make_app(profiling, spans)
    n = 400
    for _ in range(n):
        sent = await asgi_call(app, "/items/3")
        # Sampled requests never change the response.
        assert not any(k == b"x-fastprof-profile-id" for k, _ in sent[0]["headers"])
    profiled = [s for s in spans.server() if "fastprof.profile.id" in (s.attributes or {})]
    # mean 80, sd 8: accept +-5 sd.
    assert 40 <= len(profiled) <= 120, len(profiled)
    assert profiling.stats()["started"] == len(profiled)
    assert all(s.attributes["fastprof.profile.trigger"] == "sampling" for s in profiled)  # type: ignore[index]


@pytest.mark.anyio
async def test_sampling_per_route_rules(spans) -> None:
    """Route template rules override the global rate."""
    rng = random.Random(7)
    profiling = fastprof.Profiling(
        sample_rate=0.0,
        sample_routes={"/items/{item_id}": 1.0, "/alpha": 0.0},
        max_per_minute=10_000,
        rng=rng.random,
    )
    app = make_app(profiling, spans)
    for i in range(10):
        await asgi_call(app, f"/items/{i}")
    assert profiling.stats()["started"] == 10
    spans.clear()
    await asgi_call(app, "/beta")
    assert profiling.stats()["started"] == 10
    # A rule can also lower the global rate to nothing for a route.
    lowered = fastprof.Profiling(
        sample_rate=1.0, sample_routes={"/alpha": 0.0}, max_per_minute=10_000, rng=rng.random
    )
    app = make_app(lowered, spans)
    for _ in range(5):
        await asgi_call(app, "/alpha")
    assert lowered.stats().get("started", 0) == 0
    await asgi_call(app, "/beta")
    assert lowered.stats()["started"] == 1


@pytest.mark.anyio
async def test_concurrency_budget_under_concurrent_requests(spans) -> None:
    """With max_concurrent=1, overlapping token requests get one profile; others are skipped."""
    profiling = fastprof.Profiling(secret=SECRET, max_concurrent=1, max_per_minute=100)
    app = make_app(profiling, spans)
    results: list[list[dict[str, object]]] = []

    async def one() -> None:
        results.append(await asgi_call(app, "/alpha", [(HEADER, mint_token(SECRET).encode())]))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one)
    with_header = [
        r for r in results if any(k == b"x-fastprof-profile-id" for k, _ in r[0]["headers"])
    ]  # type: ignore[union-attr]
    assert len(with_header) == 1
    skipped = [s for s in spans.server() if (s.attributes or {}).get("fastprof.profile.skipped")]
    assert len(skipped) == 3
    assert {s.attributes["fastprof.profile.skipped"] for s in skipped} == {"concurrency_limit"}  # type: ignore[index]
    assert profiling.stats()["skipped.concurrency_limit"] == 3
    assert profiling.stats()["active"] == 0


@pytest.mark.anyio
async def test_per_minute_budget(spans) -> None:
    """With max_per_minute=2, the third and fourth profiles in a minute are skipped."""
    profiling = fastprof.Profiling(secret=SECRET, max_per_minute=2)
    app = make_app(profiling, spans)
    for _ in range(4):
        await asgi_call(app, "/items/1", [(HEADER, mint_token(SECRET).encode())])
    stats = profiling.stats()
    assert stats["started"] == 2
    assert stats["skipped.rate_limit"] == 2


@pytest.mark.anyio
async def test_concurrent_profiles_do_not_mix(spans) -> None:
    """An async request and a request with sync work in a thread each hold only their own frames."""
    profiling = fastprof.Profiling(secret=SECRET, max_concurrent=2)
    app = make_app(profiling, spans)
    ids: dict[str, str] = {}

    async def one(path: str) -> None:
        sent = await asgi_call(app, path, [(HEADER, mint_token(SECRET).encode())])
        ids[path] = dict(sent[0]["headers"])[b"x-fastprof-profile-id"].decode()

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "/alpha")
        tg.start_soon(one, "/beta")
    alpha = frames_of(profiling, ids["/alpha"])
    beta = frames_of(profiling, ids["/beta"])
    assert "async_hot_alpha" in alpha
    assert "sync_hot_beta" not in alpha
    assert "sync_hot_beta" in beta
    assert "async_hot_alpha" not in beta
    beta_span = next(
        s for s in spans.server() if s.attributes["fastprof.profile.id"] == ids["/beta"]
    )  # type: ignore[index]
    assert beta_span.attributes["fastprof.profile.worker_calls"] == 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "body", "hot", "worker_frame"),
    [
        ("/gamma", {"value": 2}, "sync_hot_gamma", "gamma_dependency [worker thread]"),
        ("/delta", {"value": 4}, "sync_hot_delta", "make_app.<locals>.delta [worker thread]"),
    ],
    ids=["sync_dependency", "sync_endpoint"],
)
@pytest.mark.anyio
async def test_sync_work_in_the_thread_pool_appears_under_a_worker_frame(
    spans, path: str, body: dict[str, int], hot: str, worker_frame: str
) -> None:
    """A sync dependency or a sync endpoint runs in the thread pool; its hot function is
    in the profile, under a worker-thread frame grafted below the request's start frame."""
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get(path, headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.json() == body
    frames = frames_of(profiling, response.headers["x-fastprof-profile-id"])
    assert hot in frames
    assert worker_frame in frames
    # Grafted under the request's start frame, without the worker thread's own
    # stack down to the hook (thread bootstrap, executor loop, the hook itself).
    document = profiling.store.get(response.headers["x-fastprof-profile-id"])
    assert document is not None
    _, session = _documents.decode(document)
    grafted = [
        [f.split("\x00", 1)[0] for f in stack]
        for stack, _ in session.frame_records
        if any("[worker thread]" in f for f in stack)
    ]
    assert grafted
    for names in grafted:
        at = names.index(worker_frame)
        assert names[:at] == [f.split("\x00", 1)[0] for f in session.start_call_stack]
        assert not {"_bootstrap", "_bootstrap_inner", "worker_hook"} & set(names[at + 1 :]), names


@pytest.mark.anyio
async def test_worker_calls_over_budget_run_unsampled_and_are_counted(spans, monkeypatch) -> None:
    from fastprof.profiling import _capture

    monkeypatch.setattr(_capture, "MAX_WORKER_CALLS", 0)
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get("/gamma", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.json() == {"value": 2}
    attrs = profile_attrs(spans.server()[0])
    # The sync dependency and the sync endpoint: both ran, neither was sampled.
    assert attrs["fastprof.profile.worker_calls_incomplete"] == 2
    assert "fastprof.profile.worker_calls" not in attrs
    frames = frames_of(profiling, response.headers["x-fastprof-profile-id"])
    assert "gamma_dependency [worker thread]" not in frames


class _TrackerProbe(fastprof.RequestHooks):
    """Records whether dependency instrumentation followed each request."""

    def __init__(self) -> None:
        self.tracked: list[bool] = []

    def on_request_end(self, state: fastprof.RequestState) -> None:
        self.tracked.append(state._dependencies is not None)


@pytest.mark.parametrize("own_hook", [False, True], ids=["instrument", "user_supplied"])
@pytest.mark.anyio
async def test_unsampled_profiled_request_still_profiles_its_worker_threads(own_hook) -> None:
    """Trace sampling off: a token still profiles sync dependencies and endpoints in the
    thread pool; unprofiled unsampled requests get no dependency work. Also with a
    ``DependencySpans(profiled_requests=True)`` passed in ``hooks=``: ``instrument()``
    runs profiling before the user's hooks, so it sees the profile."""
    provider = TracerProvider(sampler=ALWAYS_OFF)
    probe = _TrackerProbe()
    hooks: tuple[fastprof.RequestHooks, ...] = (probe,)
    if own_hook:
        hooks = (fastprof.DependencySpans(tracer_provider=provider, profiled_requests=True), probe)
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, SimpleNamespace(provider=provider), hooks=hooks)
    async with client_for(app) as client:
        gamma = await client.get("/gamma", headers={"X-Fastprof-Profile": mint_token(SECRET)})
        delta = await client.get("/delta", headers={"X-Fastprof-Profile": mint_token(SECRET)})
        plain = await client.get("/gamma")
    assert gamma.json() == plain.json() == {"value": 2} and delta.json() == {"value": 4}
    assert "sync_hot_gamma" in frames_of(profiling, gamma.headers["x-fastprof-profile-id"])
    assert "sync_hot_delta" in frames_of(profiling, delta.headers["x-fastprof-profile-id"])
    assert probe.tracked == [True, True, False]


@pytest.mark.anyio
async def test_worker_hook_is_transparent_for_results_and_errors(spans) -> None:
    """Profiling's run_in_worker returns what fn returns and raises what fn raises."""
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    captured: dict[str, object] = {}

    async def probe_app(scope, receive, send):  # type: ignore[no-untyped-def]
        state = fastprof.current_request.get()
        assert state is not None and state._worker_hooks == (profiling,)
        assert state._profile is not None
        run = functools.partial(run_in_worker, state)
        captured["value"] = await anyio.to_thread.run_sync(run, lambda: 41 + 1)

        def boom() -> None:
            raise KeyError("x")

        with pytest.raises(KeyError):
            await anyio.to_thread.run_sync(run, boom)
        await app(scope, receive, send)

    wrapped = fastprof.FastprofMiddleware(
        probe_app, tracer_provider=spans.provider, hooks=[profiling]
    )
    await asgi_call(wrapped, "/items/1", [(HEADER, mint_token(SECRET).encode())])
    assert captured["value"] == 42


@pytest.mark.anyio
async def test_duration_cap_truncates_and_next_profile_works(spans) -> None:
    """Past max_duration_s sampling stops; the task can be profiled again afterwards."""
    profiling = fastprof.Profiling(secret=SECRET, max_duration_s=0.05)
    app = make_app(profiling, spans)
    await asgi_call(app, "/slow", [(HEADER, mint_token(SECRET).encode())])
    (server,) = spans.server()
    assert server.attributes["fastprof.profile.truncated"] is True  # type: ignore[index]
    assert profiling.stats()["active"] == 0
    sent = await asgi_call(app, "/items/1", [(HEADER, mint_token(SECRET).encode())])
    assert any(k == b"x-fastprof-profile-id" for k, _ in sent[0]["headers"])
    assert profiling.stats()["started"] == 2
    assert _internal_errors.counts() == {}


@pytest.mark.anyio
async def test_streaming_response_profiled_and_task_reusable(spans) -> None:
    """A streamed response ends its profile; later profiles in the same task still start."""
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    for _ in range(2):
        sent = await asgi_call(app, "/stream", [(HEADER, mint_token(SECRET).encode())])
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert body == b"chunk0\nchunk1\nchunk2\n"
    assert profiling.stats()["started"] == 2
    assert profiling.flush(10)
    assert profiling.stats()["stored"] == 2
    assert _internal_errors.counts() == {}


@pytest.mark.anyio
async def test_store_failure_never_fails_the_request(spans, monkeypatch, tmp_path) -> None:
    """Disk full (ENOSPC) or read-only (EROFS): the request succeeds; the failure is counted."""
    import errno
    import os

    from fastprof.profiling import FileStore

    profiling = fastprof.Profiling(secret=SECRET, store=FileStore(tmp_path / "profiles"))
    app = make_app(profiling, spans)
    baseline_body = b'{"endpoint":"alpha"}'

    def enospc(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def erofs(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", enospc)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.status_code == 200 and response.content == baseline_body
    assert profiling.flush(10)
    monkeypatch.setattr(os, "makedirs", erofs)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert response.status_code == 200 and response.content == baseline_body
    assert profiling.flush(10)
    assert profiling.stats()["store_failed"] == 2
    assert _internal_errors.counts()["profile.store"] == 2
    # No temp file left behind (.nonces holds the used tokens' nonces).
    assert [p.name for p in (tmp_path / "profiles").iterdir()] == [".nonces"]


@pytest.mark.anyio
async def test_writer_queue_full_drops_and_counts(spans) -> None:
    """A saturated writer drops and counts profiles; the request is unaffected."""
    import threading

    gate = threading.Event()

    class SlowStore(MemoryStore):
        def put(self, meta, document):  # type: ignore[no-untyped-def]
            gate.wait(10)
            super().put(meta, document)

    profiling = fastprof.Profiling(
        secret=SECRET, store=SlowStore(), writer_queue_size=1, max_per_minute=100
    )
    app = make_app(profiling, spans)
    for _ in range(4):
        sent = await asgi_call(app, "/items/1", [(HEADER, mint_token(SECRET).encode())])
        assert sent[0]["status"] == 200
    gate.set()
    assert profiling.flush(10)
    stats = profiling.stats()
    assert stats["skipped.writer_queue_full"] >= 1
    assert stats["stored"] + stats["skipped.writer_queue_full"] == 4
    dropped = [
        s
        for s in spans.server()
        if s.attributes.get("fastprof.profile.skipped") == "writer_queue_full"
    ]  # type: ignore[union-attr]
    assert dropped and all("fastprof.profile.id" not in s.attributes for s in dropped)  # type: ignore[operator]


@pytest.mark.anyio
async def test_embedded_profile_in_span(spans) -> None:
    """embed_max_bytes puts the compressed profile on the span when small enough."""
    import base64

    from fastprof.profiling import _documents

    profiling = fastprof.Profiling(secret=SECRET, embed_max_bytes=1024 * 1024)
    app = make_app(profiling, spans)
    await asgi_call(app, "/alpha", [(HEADER, mint_token(SECRET).encode())])
    (server,) = spans.server()
    data = server.attributes["fastprof.profile.data"]  # type: ignore[index]
    meta, session = _documents.decode(base64.b64decode(data))  # type: ignore[arg-type]
    assert meta["profile_id"] == server.attributes["fastprof.profile.id"]  # type: ignore[index]
    assert session.sample_count > 0
    spans.clear()
    tiny = fastprof.Profiling(secret=SECRET, embed_max_bytes=16)
    await asgi_call(make_app(tiny, spans), "/alpha", [(HEADER, mint_token(SECRET).encode())])
    (server,) = spans.server()
    assert server.attributes["fastprof.profile.data_dropped"] == "too_large"  # type: ignore[index]


@pytest.mark.anyio
async def test_dev_mode_query_parameter_is_token_gated(spans) -> None:
    """The query trigger exists only in dev_mode and still needs a valid token."""
    token = mint_token(SECRET)
    off = fastprof.Profiling(secret=SECRET)
    await asgi_call(make_app(off, spans), f"/items/1?fastprof_profile={token}")
    assert off.stats().get("started", 0) == 0
    on = fastprof.Profiling(secret=SECRET, dev_mode=True)
    app = make_app(on, spans)
    await asgi_call(app, "/items/1?fastprof_profile=forged")
    assert on.stats().get("started", 0) == 0
    sent = await asgi_call(app, f"/items/1?fastprof_profile={token}")
    assert any(k == b"x-fastprof-profile-id" for k, _ in sent[0]["headers"])


@pytest.mark.anyio
async def test_unconfigured_profiling_profiles_nothing(spans) -> None:
    """Safe default: no secret and no sampling means nothing is profiled, even with a token."""
    profiling = fastprof.Profiling()
    assert not profiling.enabled
    app = make_app(profiling, spans)
    await asgi_call(app, "/items/1", [(HEADER, mint_token(SECRET).encode())])
    assert profiling.stats().get("started", 0) == 0


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"secret": "short"}, "secret"),
        ({"secret": []}, "secret"),
        ({"secret": ["x" * 32, "short"]}, "secret"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({"sample_routes": {"/a": 2.0}}, "sample_routes"),
        ({"sample_routes": {"a": 0.5}}, "sample_routes"),
        ({"dev_mode": True}, "dev_mode"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_per_minute": 0}, "max_per_minute"),
        ({"interval_s": 0}, "interval_s"),
        ({"max_duration_s": 1000}, "max_duration_s"),
        ({"header": "bad header"}, "header"),
        ({"store": object()}, "store"),
        ({"base_url": "ftp://x"}, "base_url"),
        ({"top_frames": -1}, "top_frames"),
    ],
)
def test_configuration_is_validated(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        fastprof.Profiling(**kwargs)  # type: ignore[arg-type]


def test_instrument_rejects_non_profiling() -> None:
    from fastapi import FastAPI

    with pytest.raises(ValueError, match="profiling"):
        fastprof.instrument(FastAPI(), profiling=object())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_default_store_keeps_short_profiles_unencoded_until_fetched(
    spans, monkeypatch
) -> None:
    """Short profiles skip the writer: stored at once, encoded only when fetched."""
    from fastprof.profiling import _documents

    encoded: list[str] = []
    real_encode = _documents.encode

    def counting_encode(session, meta, **kwargs):  # type: ignore[no-untyped-def]
        encoded.append(meta["profile_id"])
        return real_encode(session, meta, **kwargs)

    monkeypatch.setattr(_documents, "encode", counting_encode)
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    profile_id = response.headers["x-fastprof-profile-id"]
    assert profiling.stats()["stored"] == 1  # no flush needed: nothing went to the writer
    assert encoded == []
    assert "async_hot_alpha" in frames_of(profiling, profile_id)
    assert encoded == [profile_id]


@pytest.mark.anyio
async def test_long_profiles_are_encoded_by_the_writer(spans, monkeypatch) -> None:
    from fastprof.profiling import _profiling

    monkeypatch.setattr(_profiling, "LAZY_MAX_SAMPLES", -1)  # every profile counts as long
    profiling = fastprof.Profiling(secret=SECRET)
    app = make_app(profiling, spans)
    async with client_for(app) as client:
        response = await client.get("/alpha", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    profile_id = response.headers["x-fastprof-profile-id"]
    assert profiling.flush(10)
    assert profiling.stats()["stored"] == 1
    assert isinstance(profiling.store, MemoryStore)
    assert profiling.store._items[profile_id][1].__class__ is bytes  # stored encoded
    assert "async_hot_alpha" in frames_of(profiling, profile_id)
