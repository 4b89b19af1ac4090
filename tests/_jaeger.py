"""A local Jaeger v2 for tests and the demo: build once, start on free ports, query, stop.

Standard library only, so ``scripts/jaeger run`` and the demo can use it without the test
dependencies. The binary is built by ``scripts/jaeger build`` (Go module proxy, Jaeger
v1.75.0, cached under ``${XDG_CACHE_HOME:-~/.cache}/fastprof/jaeger-v1.75.0/``); Jaeger is
started with the configuration users copy, ``examples/jaeger/config.yaml``, whose addresses
are taken from environment variables (see the file's header).

    with Jaeger() as jaeger:                    # free ports on 127.0.0.1, waits until ready
        setup_tracing("svc", otlp_endpoint=jaeger.otlp_http_endpoint, set_global=False)
        ...
        spans = jaeger.wait_for_spans(trace_id, count=5)

Query results are Jaeger's API v3 (OTLP JSON); :func:`flatten` turns a trace into a list of
:class:`JaegerSpan` with decoded attributes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG",
    "JAEGER_VERSION",
    "GoMissing",
    "UI_CONFIG",
    "Jaeger",
    "JaegerSpan",
    "JaegerUnavailable",
    "binary_path",
    "ensure_binary",
    "flatten",
]

JAEGER_VERSION = "v1.75.0"
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "jaeger" / "config.yaml"
UI_CONFIG = ROOT / "examples" / "jaeger" / "ui-config.json"
SCRIPT = ROOT / "scripts" / "jaeger"
BUILD_TIMEOUT_S = 125 * 60  # the first build compiles ~2,300 Go packages; later runs reuse it

#: OTLP span kinds as Jaeger's API v3 returns them (OTLP JSON enum numbers).
SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
STATUS_OK = 1
STATUS_ERROR = 2


class JaegerUnavailable(RuntimeError):
    """Jaeger cannot be built or started here (Go missing, build failed, start timed out)."""


class GoMissing(JaegerUnavailable):
    """No Jaeger binary and no ``go`` to build one."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastprof" / f"jaeger-{JAEGER_VERSION}"


def binary_path() -> Path:
    """Where ``scripts/jaeger build`` puts the binary (it may not exist yet)."""
    return cache_dir() / "jaeger"


def ensure_binary(timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """The Jaeger binary, built through ``scripts/jaeger build`` on first use.

    Raises:
        JaegerUnavailable: ``go`` is not on PATH, or the build failed or took too long.
    """
    binary = binary_path()
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if shutil.which("go") is None:
        raise GoMissing(
            f"Jaeger {JAEGER_VERSION} is not built ({binary} is missing) and `go` is not on PATH:"
            " install Go >= 1.24 (https://go.dev/dl/) and run scripts/jaeger build"
        )
    print(
        f"building Jaeger {JAEGER_VERSION} with Go (first time only; a few minutes)...",
        file=sys.stderr,
        flush=True,
    )
    try:
        done = subprocess.run(
            [str(SCRIPT), "build"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise JaegerUnavailable(f"scripts/jaeger build took more than {timeout_s:.0f} s") from exc
    if done.returncode != 0 or not binary.is_file():
        raise JaegerUnavailable(
            f"scripts/jaeger build failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return binary


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Ports:
    otlp_grpc: int
    otlp_http: int
    query_http: int
    query_grpc: int
    health: int

    @classmethod
    def free(cls) -> Ports:
        ports: list[int] = []
        while len(ports) < 5:
            port = _free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)

    @classmethod
    def default(cls) -> Ports:
        return cls(otlp_grpc=4317, otlp_http=4318, query_http=16686, query_grpc=16685, health=13133)

    @classmethod
    def preferred(cls) -> Ports:
        """Jaeger's usual ports when all are free on 127.0.0.1, else free ones."""
        default = cls.default()
        for port in (default.otlp_grpc, default.otlp_http, default.query_http,
                     default.query_grpc, default.health):  # fmt: skip
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    return cls.free()
        return default


class Jaeger:
    """One Jaeger process on 127.0.0.1 with in-memory storage.

    ``stop()`` then ``start()`` restarts it on the same ports (an exporter pointed at it
    reconnects); its stored traces are lost, as with any in-memory Jaeger.
    """

    def __init__(
        self,
        *,
        ports: Ports | None = None,
        log_path: Path | None = None,
        binary: Path | None = None,
    ) -> None:
        self.ports = ports or Ports.free()
        self.host = "127.0.0.1"
        self.binary = binary
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- addresses -------------------------------------------------------------------

    @property
    def otlp_http_endpoint(self) -> str:
        """The OTLP/HTTP traces URL to export to."""
        return f"http://{self.host}:{self.ports.otlp_http}/v1/traces"

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"{self.host}:{self.ports.otlp_grpc}"

    @property
    def query_url(self) -> str:
        """Base URL of the UI and the query API."""
        return f"http://{self.host}:{self.ports.query_http}"

    def trace_api_url(self, trace_id: str) -> str:
        return f"{self.query_url}/api/v3/traces/{trace_id}"

    def trace_ui_url(self, trace_id: str) -> str:
        return f"{self.query_url}/trace/{trace_id}"

    # -- lifecycle -------------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The variables ``examples/jaeger/config.yaml`` reads."""
        return {
            "JAEGER_LISTEN_HOST": self.host,
            "JAEGER_OTLP_GRPC_PORT": str(self.ports.otlp_grpc),
            "JAEGER_OTLP_HTTP_PORT": str(self.ports.otlp_http),
            "JAEGER_QUERY_HTTP_PORT": str(self.ports.query_http),
            "JAEGER_QUERY_GRPC_PORT": str(self.ports.query_grpc),
            "JAEGER_HEALTH_PORT": str(self.ports.health),
            "JAEGER_UI_CONFIG": str(UI_CONFIG),
        }

    def command(self) -> list[str]:
        binary = self.binary or ensure_binary()
        return [str(binary), "--config", f"file:{CONFIG}"]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 30.0) -> Jaeger:
        """Start Jaeger and wait until it is healthy and its ports answer (at most ``timeout_s``).

        Raises:
            JaegerUnavailable: no binary and no Go, or Jaeger exited or was not ready in time
                (the message ends with its log).
        """
        if self.running:
            return self
        command = self.command()
        if self.log_path is not None:
            self._log_file = open(self.log_path, "a+b")
        else:
            self._log_file = tempfile.TemporaryFile()
        env = {**os.environ, **self.environment()}
        self._process = subprocess.Popen(
            command,
            env=env,
            cwd=str(CONFIG.parent),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                log = self.log_tail()
                self._close()
                raise JaegerUnavailable(f"Jaeger exited at start-up:\n{log}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                raise JaegerUnavailable(f"Jaeger was not ready after {timeout_s:.0f} s:\n{log}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{self.host}:{self.ports.health}/status", timeout=1
            ) as response:
                if response.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.query_url}/api/v3/services", timeout=1) as r:
                if r.status != 200:
                    return False
        except (OSError, urllib.error.URLError):
            return False
        for port in (self.ports.otlp_http, self.ports.otlp_grpc):
            try:
                socket.create_connection((self.host, port), timeout=1).close()
            except OSError:
                return False
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop Jaeger (SIGTERM, then SIGKILL after ``timeout_s``); a no-op when not running."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        self._close()

    def _close(self) -> None:
        self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of Jaeger's log (stdout and stderr)."""
        if self._log_file is None:
            return ""
        self._log_file.flush()
        self._log_file.seek(0, os.SEEK_END)
        size = self._log_file.tell()
        self._log_file.seek(max(0, size - max_chars))
        text = self._log_file.read().decode("utf-8", "replace")
        self._log_file.seek(0, os.SEEK_END)
        return str(text)

    def __enter__(self) -> Jaeger:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- query API (what the UI renders) ---------------------------------------------

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET a query-API path; ``None`` for 404 (Jaeger's "not found" / "no traces")."""
        url = f"{self.query_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.query_url}{path}", timeout=5) as response:
            return str(response.read().decode("utf-8"))

    def services(self) -> list[str]:
        """``GET /api/v3/services``."""
        return list((self._get("/api/v3/services") or {}).get("services", []))

    def operations(self, service: str) -> list[dict[str, str]]:
        """``GET /api/v3/operations?service=...``: ``[{"name": ..., "spanKind": ...}]``."""
        return list((self._get("/api/v3/operations", {"service": service}) or {}).get(
            "operations", []
        ))

    def trace(self, trace_id: str) -> list[JaegerSpan]:
        """``GET /api/v3/traces/{trace_id}``, flattened (empty when Jaeger has no such trace)."""
        return flatten(self._get(f"/api/v3/traces/{trace_id}"))

    def find_traces(
        self, service: str, *, operation: str | None = None, lookback_s: float = 3600
    ) -> dict[str, list[JaegerSpan]]:
        """``GET /api/v3/traces?query.service_name=...``: the spans of each trace found, by id."""
        now = datetime.now(UTC)
        params = {
            "query.service_name": service,
            "query.start_time_min": _rfc3339(now - timedelta(seconds=lookback_s)),
            "query.start_time_max": _rfc3339(now + timedelta(seconds=60)),
            "query.num_traces": "1000",
        }
        if operation:
            params["query.operation_name"] = operation
        by_trace: dict[str, list[JaegerSpan]] = {}
        for span in flatten(self._get("/api/v3/traces", params)):
            by_trace.setdefault(span.trace_id, []).append(span)
        return by_trace

    def wait_for_spans(
        self,
        trace_id: str,
        *,
        count: int | None = None,
        until: Callable[[list[JaegerSpan]], bool] | None = None,
        timeout_s: float = 15.0,
    ) -> list[JaegerSpan]:
        """Poll the trace until it has ``count`` spans (or ``until(spans)``); return its spans.

        Raises:
            AssertionError: not there after ``timeout_s`` (the message lists what was there).
        """
        deadline = time.monotonic() + timeout_s
        spans: list[JaegerSpan] = []
        while True:
            spans = self.trace(trace_id)
            if spans and (count is None or len(spans) >= count) and (until is None or until(spans)):
                return spans
            if time.monotonic() > deadline:
                names = sorted(s.name for s in spans)
                raise AssertionError(
                    f"trace {trace_id} in Jaeger after {timeout_s:.0f} s: {len(spans)} spans "
                    f"{names} (wanted count={count}, until={until})"
                )
            time.sleep(0.1)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- OTLP JSON, as the query API returns it ----------------------------------------------


@dataclass
class JaegerSpan:
    """One span of a trace returned by Jaeger, with attributes decoded to Python values."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status_code: int
    status_message: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    links: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def event(self, name: str) -> dict[str, Any]:
        """The attributes of the one event called ``name``."""
        found = [attrs for event_name, attrs in self.events if event_name == name]
        assert len(found) == 1, f"{self.name}: {len(found)} events {name!r} in {self.events}"
        return found[0]


def _value(value: dict[str, Any]) -> Any:
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])  # OTLP JSON sends 64-bit ints as strings
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "arrayValue" in value:
        return [_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return value["bytesValue"]
    return None


def _attributes(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items or []}


def flatten(response: Any) -> list[JaegerSpan]:
    """Every span in an API v3 response (``{"result": {"resourceSpans": [...]}}``)."""
    if not response:
        return []
    spans: list[JaegerSpan] = []
    for resource_spans in response.get("result", {}).get("resourceSpans", []):
        resource = _attributes(resource_spans.get("resource", {}).get("attributes"))
        for scope_spans in resource_spans.get("scopeSpans", []):
            scope = scope_spans.get("scope", {}).get("name", "")
            spans.extend(
                JaegerSpan(
                    trace_id=raw["traceId"],
                    span_id=raw["spanId"],
                    parent_span_id=raw.get("parentSpanId", ""),
                    name=raw["name"],
                    kind=int(raw.get("kind", 0)),
                    start_ns=int(raw["startTimeUnixNano"]),
                    end_ns=int(raw["endTimeUnixNano"]),
                    attributes=_attributes(raw.get("attributes")),
                    resource=resource,
                    scope=scope,
                    status_code=int(raw.get("status", {}).get("code", 0)),
                    status_message=raw.get("status", {}).get("message", ""),
                    events=[
                        (event["name"], _attributes(event.get("attributes")))
                        for event in raw.get("events", [])
                    ],
                    links=[
                        (link["traceId"], link["spanId"], _attributes(link.get("attributes")))
                        for link in raw.get("links", [])
                    ],
                    raw=raw,
                )
                for raw in scope_spans.get("spans", [])
            )
    return spans


def main(argv: list[str] | None = None) -> int:
    """``python tests/_jaeger.py run [--free-ports]``: Jaeger in the foreground (Ctrl-C stops)."""
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/jaeger", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start Jaeger on 127.0.0.1 and wait for Ctrl-C")
    run.add_argument(
        "--free-ports", action="store_true", help="pick free ports instead of 4317/4318/16686"
    )
    args = parser.parse_args(argv)
    jaeger = Jaeger(ports=None if args.free_ports else Ports.default())
    try:
        jaeger.start()
    except JaegerUnavailable as exc:
        print(f"scripts/jaeger: {exc}", file=sys.stderr)
        return 1
    print(f"Jaeger {JAEGER_VERSION} is running (config {CONFIG.relative_to(ROOT)})")
    print(f"  OTLP/HTTP  {jaeger.otlp_http_endpoint}")
    print(f"  OTLP/gRPC  {jaeger.otlp_grpc_endpoint}")
    print(f"  query API  {jaeger.query_url}/api/v3/services")
    print(f"  UI         {jaeger.query_url}/  (a placeholder page: the Go module has no UI assets)")
    print("Ctrl-C stops it.", flush=True)
    try:
        while jaeger.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        jaeger.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
