"""fastprof demo: serve an instrumented FastAPI app on 127.0.0.1, send it a few
requests, and print each request's trace as a tree.

    python examples/demo.py                      # console only, no Jaeger needed
    python examples/demo.py --otlp http://127.0.0.1:4318/v1/traces   # also to Jaeger
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastprof
from fastprof.exporters import setup_tracing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--otlp", help="also export to this OTLP/HTTP traces URL (e.g. Jaeger)")
    args = parser.parse_args(argv)

    provider = setup_tracing("fastprof-demo", console=True, otlp_endpoint=args.otlp)

    from demo_app import create_app, iter_demo_requests

    app = fastprof.instrument(create_app())
    port = free_port()
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
    server.should_exit = True
    thread.join(timeout=10)
    provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
