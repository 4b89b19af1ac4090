"""Start a server command as a subprocess on 127.0.0.1, wait until it answers, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests._server import free_port

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment without OTEL_*/FASTPROF_* settings, plus ``extra``;
    the fixture app's directory on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FASTPROF_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent.parent)])
    env.update(extra)
    return env


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def get(self, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
        # A new connection each time, so the kernel can hand it to any worker.
        with httpx.Client(base_url=self.url, timeout=5) as client:
            return client.get(path, headers={"connection": "close", **(headers or {})})

    def terminate(self, timeout: float = 15.0) -> float:
        """SIGTERM, wait for exit; returns the seconds it took."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started


@contextmanager
def serve(
    argv: list[str], env: Mapping[str, str], tmp_path: Path, *, port: int | None = None
) -> Iterator[Server]:
    """Run ``argv`` (with ``{port}`` substituted) until it answers on /healthz."""
    port = port or free_port()
    log = tmp_path / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [a.replace("{port}", str(port)) for a in argv],
            env=dict(env),
            cwd=HERE,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30  # a loaded CI machine starts workers slowly
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{server.output()}")
            try:
                if server.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def hit_every_worker(
    server: Server,
    path: str,
    workers: int,
    tries: int = 200,
    headers: Callable[[int], dict[str, str]] | None = None,
) -> set[int]:
    """Request ``path`` on new connections until ``workers`` distinct pids answered
    (``headers(i)`` gives the i-th request's headers)."""
    pids: set[int] = set()
    for i in range(tries):
        pids.add(server.get(path, headers(i) if headers else None).json()["pid"])
        if len(pids) == workers:
            break
    return pids


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False
