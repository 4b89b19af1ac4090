"""fastprof demo: serve an instrumented FastAPI app on 127.0.0.1, send it a few
requests, and print each request's trace as a tree.

    python examples/demo.py                      # console only, no Jaeger needed
    python examples/demo.py --otlp http://127.0.0.1:4318/v1/traces   # also to Jaeger
    python examples/demo.py --serve              # then keep serving the dashboard until Ctrl-C
    python examples/demo.py --jaeger             # start a local Jaeger (needs Go), send there
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import SpanKind

import fastprof
from fastprof.exporters import setup_tracing
from fastprof.profiling import mint_token, mount_viewer, viewer_token


class _ServerTraces(SpanProcessor):
    """Remembers the trace id of each request (SERVER span), to print its Jaeger links."""

    def __init__(self) -> None:
        self.traces: list[tuple[str, str]] = []

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind != SpanKind.SERVER or span.context is None:
            return
        if "/_fastprof/" not in span.name:  # the viewer's own requests (FastAPI's telemetry)
            self.traces.append((span.name, format(span.context.trace_id, "032x")))


def local_jaeger() -> Any:
    """The local Jaeger helper of scripts/jaeger (tests/_jaeger.py: standard library only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tests._jaeger

    return tests._jaeger


def print_jaeger_links(jaeger: Any, traces: list[tuple[str, str]]) -> None:
    print(f"--- the traces in Jaeger (query API and UI on {jaeger.query_url}):")
    for name, trace_id in traces:
        try:
            spans = len(jaeger.wait_for_spans(trace_id, timeout_s=10))
        except AssertionError:
            spans = 0
        print(f"    {name:<22} trace {trace_id}  ({spans} spans in Jaeger)")
        print(f"        API {jaeger.trace_api_url(trace_id)}")
        print(f"        UI  {jaeger.trace_ui_url(trace_id)}")
    print(
        "    (the UI page is a placeholder when Jaeger was built from the Go module, which has no"
        " UI assets;\n     the API returns the same trace as OTLP JSON. See docs/jaeger.md.)\n"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--otlp", help="also export to this OTLP/HTTP traces URL (e.g. Jaeger)")
    parser.add_argument(
        "--serve", action="store_true", help="keep serving (and the dashboard) until Ctrl-C"
    )
    parser.add_argument(
        "--jaeger",
        action="store_true",
        help="start a local Jaeger (scripts/jaeger, needs Go), send the traces there and print"
        " each trace's query-API and UI URLs",
    )
    args = parser.parse_args(argv)
    if args.jaeger and args.otlp:
        parser.error("--jaeger and --otlp: choose one")

    if not args.jaeger:
        return run_demo(args.otlp, None, serve=args.serve)
    helper = local_jaeger()
    print("--- starting the local Jaeger (scripts/jaeger; its first run builds it with Go)")
    jaeger = helper.Jaeger(ports=helper.Ports.preferred())
    try:
        jaeger.start()
    except helper.JaegerUnavailable as exc:  # no Go, build failed, did not start
        print(f"--jaeger: {exc}", file=sys.stderr)
        return 1
    print(f"    OTLP/HTTP {jaeger.otlp_http_endpoint}, query API and UI {jaeger.query_url}\n")
    try:
        return run_demo(jaeger.otlp_http_endpoint, jaeger, serve=args.serve)
    finally:
        jaeger.stop()


def run_demo(otlp: str | None, jaeger: Any, *, serve: bool = False) -> int:
    provider = setup_tracing("fastprof-demo", console=True, otlp_endpoint=otlp)
    server_traces = _ServerTraces()
    if jaeger is not None:
        provider.add_span_processor(server_traces)

    from demo_app import create_app, iter_demo_requests

    port = free_port()
    secret = secrets.token_hex(32)  # in production: from your secret store
    profiling = fastprof.Profiling(
        secret=secret, base_url=f"http://127.0.0.1:{port}/_fastprof/profiles"
    )
    app = create_app()
    mount_viewer(app, profiling.viewer(), "/_fastprof/profiles")
    # fastprof's own page: recent requests, waterfalls, flame graphs (docs/dashboard.md).
    dashboard = fastprof.Dashboard(secret=secret, profiling=profiling, slow_s=0.2)
    provider.add_span_processor(dashboard.span_processor)
    dashboard.mount(app, "/_fastprof/dashboard")
    fastprof.instrument(
        app,
        exclude=r"^/_fastprof/",
        profiling=profiling,
        loop_monitor=fastprof.LoopMonitor(threshold_s=0.1),
        slow_requests=fastprof.SlowRequestLog(threshold_s=0.2),
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            print("uvicorn did not start", file=sys.stderr)
            return 1
        time.sleep(0.02)

    print(f"fastprof demo: app served on http://127.0.0.1:{port}\n")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for label, path, headers in iter_demo_requests():
            print(f"--- {label}: GET {path}")
            response = client.get(path, headers=headers)
            time.sleep(0.1)  # let the trace print before the next request
            print(f"    -> HTTP {response.status_code}\n")

        print("--- a profiled request: a signed, single-use token in X-Fastprof-Profile")
        token = mint_token(secret, ttl_s=60, route="/items/{item_id}")
        response = client.get("/items/42", headers={"X-Fastprof-Profile": token})
        profile_id = response.headers.get("x-fastprof-profile-id")
        time.sleep(0.1)
        print(f"    -> HTTP {response.status_code}, profile id {profile_id}")
        if profile_id:
            profiling.flush()
            viewer = {"authorization": f"Bearer {viewer_token(secret)}"}
            page = client.get(f"/_fastprof/profiles/{profile_id}", headers=viewer)
            out = Path(tempfile.gettempdir()) / f"fastprof-{profile_id}.html"
            out.write_bytes(page.content)
            print(f"    profile HTML ({len(page.content)} bytes) from the viewer -> {out}")
            denied = client.get(f"/_fastprof/profiles/{profile_id}")
            print(f"    the viewer without its token answers HTTP {denied.status_code}\n")
    if jaeger is not None:
        time.sleep(0.1)  # the last teardown spans
        provider.force_flush()
        print_jaeger_links(jaeger, server_traces.traces)
    dashboard.flush()
    base = f"http://127.0.0.1:{port}/_fastprof/dashboard"
    keep_serving = serve or (jaeger is not None and sys.stdin.isatty())
    ttl = 3600 if keep_serving else 300
    print("--- fastprof's dashboard: recent requests, waterfalls, flame graphs per request/route")
    login = dashboard.login_url(base, ttl_s=ttl)
    print(f"    open (signs your browser in, valid {ttl // 60} min): {login}")
    if not keep_serving:
        print("    (./scripts/demo --serve keeps it open until Ctrl-C)")
    else:
        what = "the app and Jaeger" if jaeger is not None else "the app"
        print(f"    serving {what} until Ctrl-C")
        try:
            while thread.is_alive():
                thread.join(timeout=0.5)
        except KeyboardInterrupt:
            print("\n    stopping")
    server.should_exit = True
    thread.join(timeout=10)
    provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
