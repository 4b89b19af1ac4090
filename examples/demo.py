"""fastprof demo: serve an instrumented FastAPI app on 127.0.0.1, send it a few
requests, and print each request's trace as a tree.

    python examples/demo.py                      # console only, no Jaeger needed
    python examples/demo.py --otlp http://127.0.0.1:4318/v1/traces   # also to Jaeger
    python examples/demo.py --serve              # then keep serving the dashboard until Ctrl-C
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

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastprof
from fastprof.exporters import setup_tracing
from fastprof.profiling import mint_token, mount_viewer, viewer_token


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
    args = parser.parse_args(argv)

    provider = setup_tracing("fastprof-demo", console=True, otlp_endpoint=args.otlp)

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
    dashboard.flush()
    base = f"http://127.0.0.1:{port}/_fastprof/dashboard"
    ttl = 3600 if args.serve else 300
    print("--- fastprof's dashboard: recent requests, waterfalls, flame graphs per request/route")
    login = dashboard.login_url(base, ttl_s=ttl)
    print(f"    open (signs your browser in, valid {ttl // 60} min): {login}")
    if not args.serve:
        print("    (./scripts/demo --serve keeps it open until Ctrl-C)")
    if args.serve:
        print("    serving until Ctrl-C")
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
