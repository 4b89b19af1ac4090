"""The documented recipes for other servers: gunicorn with uvicorn workers, and
``fastapi run``, both serving ``fastprof.run:app``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._otlp_receiver import otlp_receiver
from tests.deploy._procs import BIN, environment, hit_every_worker, serve

pytestmark = [pytest.mark.server, pytest.mark.slow]


def check_two_workers(argv: list[str], tmp_path: Path) -> None:
    with otlp_receiver() as (endpoint, received):
        env = environment(
            {
                "FASTPROF_APP": "fixture_app:app",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
                "OTEL_SERVICE_NAME": "recipe",
                "OTEL_BSP_SCHEDULE_DELAY": "60000",  # only the shutdown flush exports
            }
        )
        with serve(argv, env, tmp_path) as server:
            pids = hit_every_worker(server, "/items/1", 2)
            assert len(pids) == 2, server.output()
            server.terminate()
            assert server.proc.returncode == 0, server.output()
    spans = received.spans()
    items = [(res, s) for res, s in spans if s.name == "GET /items/{item_id}"]
    assert {res["process.pid"] for res, _ in items} == pids
    assert {res["service.name"] for res, _ in spans} == {"recipe"}
    assert "dependency settings" in {s.name for _, s in spans}


def test_gunicorn_with_uvicorn_workers(tmp_path: Path) -> None:
    argv = [
        str(BIN / "gunicorn"),
        "-k",
        "uvicorn_worker.UvicornWorker",
        "-w",
        "2",
        "-b",
        "127.0.0.1:{port}",
        "fastprof.run:app",
    ]
    check_two_workers(argv, tmp_path)


def test_fastapi_run(tmp_path: Path) -> None:
    argv = [
        str(BIN / "fastapi"),
        "run",
        "--entrypoint",
        "fastprof.run:app",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        "2",
    ]
    check_two_workers(argv, tmp_path)
