"""Real uvicorn processes serving tests/ops/_ops_app.py on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "ops-test-secret-" + "x" * 32

sys.path.insert(0, os.path.dirname(HERE))
from _server import free_port  # noqa: E402


def _start(env: Mapping[str, str], args: tuple[str, ...]) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "_ops_app:app", "--app-dir", HERE,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args,
        ],
        env={**os.environ, "OPS_SECRET": SECRET, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}", proc


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "exited")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code in (200, 503):
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, wait, and return what the process printed."""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


@contextmanager
def servers(
    env: Mapping[str, str], count: int = 2, args: tuple[str, ...] = ()
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """``count`` server processes started together, sharing what ``env`` points them at."""
    started = [_start(env, args) for _ in range(count)]
    try:
        for url, proc in started:
            _wait_ready(url, proc)
        yield started
    finally:
        for _, proc in started:
            if proc.returncode is None:
                _stop(proc)
