"""``fastprof run`` as production runs it: a subprocess on 127.0.0.1, several workers,
configured from OTEL_*/FASTPROF_*, exporting to a real OTLP receiver."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._otlp_receiver import otlp_receiver
from tests.deploy._procs import BIN, environment, hit_every_worker, serve, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


def traceparent(trace_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}


def kept(i: int) -> str:
    """A trace id a traceidratio sampler at 0.5 keeps (its low 64 bits are small)."""
    return f"{0xA0000000 + i:016x}{i + 1:016x}"


def dropped(i: int) -> str:
    """A trace id a traceidratio sampler at 0.5 drops (its low 64 bits are large)."""
    return f"{0xB0000000 + i:016x}{0xFFFFFFFFFFFFFF00 + i:016x}"


def run_argv(*extra: str) -> list[str]:
    return [str(BIN / "fastprof"), "run", "--port", "{port}", "--no-access-log", *extra]


def test_two_workers_flush_at_sigterm_with_the_configured_service_name_and_sampler(
    tmp_path: Path,
) -> None:
    """``fastprof run --workers 2``: both workers export, each with its own process.pid,
    the configured service name and sampler; the spans still queued (a 60 s batch delay)
    reach the collector when the server is stopped with SIGTERM, flushed during each
    worker's lifespan shutdown."""
    kept_ids: list[str] = []

    def kept_headers(i: int) -> dict[str, str]:
        kept_ids.append(kept(i))
        return traceparent(kept_ids[-1])

    with otlp_receiver() as (endpoint, received):
        env = environment(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint.removesuffix("/v1/traces"),
                "OTEL_SERVICE_NAME": "deploy-test",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.5",
                "OTEL_BSP_SCHEDULE_DELAY": "60000",
            }
        )
        with serve(run_argv("--workers", "2", "fixture_app:app"), env, tmp_path) as server:
            # traceidratio ignores the parent's sampled flag: the trace id alone decides.
            pids = hit_every_worker(server, "/items/1", 2, headers=kept_headers)
            assert len(pids) == 2, server.output()
            for i in range(10):
                assert server.get("/items/2", traceparent(dropped(i))).status_code == 200
            assert received.spans() == []  # still queued
            elapsed = server.terminate()
            assert server.proc.returncode == 0, server.output()
    spans = received.spans()
    items = [(res, s) for res, s in spans if s.name == "GET /items/{item_id}"]
    assert {res["service.name"] for res, _ in spans} == {"deploy-test"}
    assert {res["process.pid"] for res, _ in items} == pids
    # Every kept trace arrived, no dropped one.
    assert {s.trace_id.hex() for _, s in items} == set(kept_ids)
    assert "dependency settings" in {s.name for _, s in spans}
    assert elapsed < 10


def test_shutdown_is_bounded_when_the_collector_never_answers(tmp_path: Path) -> None:
    """A collector that accepts connections and never answers holds each worker's
    shutdown for FASTPROF_SHUTDOWN_TIMEOUT_S, not the SDK's 30 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        env = environment(
            {
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": (
                    f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"
                ),
                "OTEL_BSP_SCHEDULE_DELAY": "60000",
                "FASTPROF_SHUTDOWN_TIMEOUT_S": "1",
            }
        )
        with serve(run_argv("--workers", "2", "fixture_app:app"), env, tmp_path) as server:
            assert len(hit_every_worker(server, "/items/8", 2)) == 2
            elapsed = server.terminate()
        assert elapsed < 5, server.output()
    finally:
        listener.close()


def test_a_bad_variable_fails_at_start_up_naming_it(tmp_path: Path) -> None:
    env = environment({"OTEL_TRACES_SAMPLER": "sometimes"})
    out = subprocess.run(
        [str(BIN / "fastprof"), "run", "--workers", "2", "fixture_app:app"],
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 2
    assert "OTEL_TRACES_SAMPLER: expected one of" in out.stderr
    assert "'sometimes'" in out.stderr


def test_an_app_module_that_does_not_exist_fails_at_start_up(tmp_path: Path) -> None:
    """Not a worker restart loop: uvicorn restarts workers that die at import."""
    out = subprocess.run(
        [str(BIN / "fastprof"), "run", "--workers", "2", "no_such_module:app"],
        env=environment({}),
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert out.returncode == 2
    assert "cannot find module 'no_such_module'" in out.stderr


def test_factory_reload_and_uvloop(tmp_path: Path) -> None:
    """--factory calls the attribute; --reload serves through uvicorn's reloader process;
    uvloop runs the app when it is installed."""
    env = environment({"OTEL_TRACES_EXPORTER": "console"})
    argv = run_argv(
        "--reload", "--factory", "--timeout-keep-alive", "2", "--limit-concurrency", "50",
        "fixture_app:create_app",
    )
    with serve(argv, env, tmp_path) as server:
        body = server.get("/items/5").json()
        assert body["item_id"] == 5
        assert body["loop"].startswith("uvloop")  # installed, so used
        assert wait_for(lambda: "GET /items/{item_id}" in server.output()), server.output()
        server.terminate()


def test_fastprof_imported_from_a_hook_while_fastapi_is_being_imported(tmp_path: Path) -> None:
    """How auto-instrumentation is usually wired: a hook imports fastprof (and the
    runner's entry point) while FastAPI itself is half-imported."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'fastapi.applications' and 'fastprof' not in sys.modules:\n"
        "            assert not hasattr(sys.modules['fastapi'], 'FastAPI')  # half-imported\n"
        "            import fastprof, fastprof.run\n"
        "            sys.fastprof_hook_ran = True\n"
        "        return None\n"
        "sys.meta_path.insert(0, Hook())\n"
    )
    script = (
        "import sys, httpx, asyncio\n"
        "import fixture_app\n"
        "assert sys.fastprof_hook_ran\n"
        "import fastprof.run\n"
        "app = fastprof.run.load()\n"
        "async def main():\n"
        "    t = httpx.ASGITransport(app=app)\n"
        "    async with httpx.AsyncClient(transport=t, base_url='http://t') as c:\n"
        "        assert (await c.get('/items/4')).status_code == 200\n"
        "asyncio.run(main())\n"
    )
    env = environment(
        {"FASTPROF_APP": "fixture_app:app", "OTEL_TRACES_EXPORTER": "console"}
    )
    env["PYTHONPATH"] = str(hook) + ":" + env["PYTHONPATH"]
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert "GET /items/{item_id}" in out.stdout


def test_a_token_used_on_one_worker_is_refused_on_the_other(tmp_path: Path) -> None:
    """``fastprof run --workers 2`` with FASTPROF_SECRET and a shared
    FASTPROF_PROFILING_STORE_DIR: a profile token is single-use across both workers, and
    either worker's viewer lists the profile the other took."""
    from fastprof.profiling import mint_token, viewer_token

    secret = "deploy-test-secret-" + "x" * 32
    env = environment(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "FASTPROF_SECRET": secret,
            "FASTPROF_PROFILING_STORE_DIR": str(tmp_path / "profiles"),
            "FASTPROF_PROFILING_VIEWER_PATH": "/_fastprof/profiles",
        }
    )
    with serve(run_argv("--workers", "2", "fixture_app:app"), env, tmp_path) as server:
        assert len(hit_every_worker(server, "/items/1", 2)) == 2, server.output()
        token = {"x-fastprof-profile": mint_token(secret)}
        first = server.get("/items/1", token)
        assert first.status_code == 200
        profile_id = first.headers.get("x-fastprof-profile-id")
        assert profile_id, server.output()
        first_pid = first.json()["pid"]
        # The same token, on new connections, until the other worker answers it.
        other = None
        for _ in range(200):
            again = server.get("/items/1", token)
            assert again.status_code == 200  # refused tokens never fail the request
            assert "x-fastprof-profile-id" not in again.headers  # single-use, on any worker
            if again.json()["pid"] != first_pid:
                other = again
                break
        assert other is not None, "the other worker never answered"
        viewer = {"authorization": f"Bearer {viewer_token(secret)}"}
        # Whichever worker answers (new connections), its viewer lists the profile.
        for _ in range(10):
            listed = server.get("/_fastprof/profiles/?format=json", viewer)
            assert listed.status_code == 200, server.output()
            assert profile_id in listed.text
