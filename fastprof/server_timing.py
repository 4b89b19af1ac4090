"""``Server-Timing`` response headers for the requests you allow (opt-in).

Usage::

    fastprof.instrument(
        app,
        server_timing=fastprof.ServerTiming(allow=lambda scope: is_internal(scope)),
    )

For an allowed request (a request being profiled, or one your ``allow``
predicate accepts), the response carries a ``Server-Timing`` header that the
browser's developer tools show in their network panel::

    Server-Timing: app;dur=212.4, endpoint;desc="get_item";dur=150.2,
        serialization;dur=0.4, dep1;desc="get_db";dur=40.1, ...

The header leaves with ``http.response.start``, so it holds what is known then:
the time to the response's start (``app``), the endpoint, the serialization
and the slowest dependencies (all done before a normal response starts; a
streaming body and ``yield``-dependency teardowns come after, and are not in
it). Other requests never get it: timings reveal how the server works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from starlette.types import Message, Scope

from fastprof._context import RequestState
from fastprof._options import check_int
from fastprof.hooks import RequestHooks

__all__ = ["ServerTiming"]

_MAX_DESC: Final = 64
HEADER: Final = b"server-timing"


def _desc(name: str) -> str:
    """``name`` as a quoted-string description: printable Latin-1, bounded."""
    text = name[:_MAX_DESC].encode("latin-1", "replace").decode("latin-1")
    text = "".join(c if c.isprintable() else "?" for c in text)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ServerTiming(RequestHooks):
    """Add a ``Server-Timing`` header to the responses of allowed requests.

    Args:
        allow: ``allow(scope) -> bool``, called once per request at its start:
            whether this request gets the header (e.g. a trusted client, a
            debug cookie checked by your code).
        profiled: Also give it to every request being profiled (the profile
            token already authorises it).
        top: How many of the slowest dependencies to list (0-32).
    """

    # After profiling (which decides the profile) and before dependency spans
    # (which record the timings it asks for).
    order = 60

    def __init__(
        self,
        allow: Callable[[Scope], bool] | None = None,
        *,
        profiled: bool = True,
        top: int = 5,
    ) -> None:
        if allow is not None and not callable(allow):
            raise ValueError(f"allow: expected a callable taking the ASGI scope, got {allow!r}")
        if not isinstance(profiled, bool):
            raise ValueError(f"profiled: expected a bool, got {profiled!r}")
        self.top = check_int("top", top, 0, 32)
        self.allow = allow
        self.profiled = profiled
        self.enabled = allow is not None or profiled

    def on_request_start(self, state: RequestState, scope: Scope) -> None:
        allow = self.allow
        if (self.profiled and state.profile_id is not None) or (
            allow is not None and allow(scope) is True
        ):
            state._server_timing = True
            state._wants_timings = True

    def on_response_start(self, state: RequestState, message: Message) -> None:
        if not state._server_timing:
            return
        headers = list(message.get("headers", []))
        headers.append((HEADER, self.header_value(state).encode("latin-1")))
        message["headers"] = headers

    def header_value(self, state: RequestState) -> str:
        """The header for ``state`` now: phases, then the slowest dependencies."""
        parts = [f"app;dur={state.elapsed_s() * 1000:.1f}"]
        endpoint = serialization = 0.0
        endpoint_name: str | None = None
        dependencies = []
        for timing in state.timings:
            if timing.kind == "endpoint":
                endpoint += timing.duration_s
                endpoint_name = timing.name
            elif timing.kind == "serialization":
                serialization += timing.duration_s
            elif timing.kind == "dependency":
                dependencies.append(timing)
        if endpoint_name is not None:
            parts.append(f"endpoint;desc={_desc(endpoint_name)};dur={endpoint * 1000:.1f}")
        if serialization:
            parts.append(f"serialization;dur={serialization * 1000:.1f}")
        if state.threadpool_wait_s > 0.0:
            parts.append(f"threadpool-wait;dur={state.threadpool_wait_s * 1000:.1f}")
        dependencies.sort(key=lambda t: t.duration_s, reverse=True)
        for index, timing in enumerate(dependencies[: self.top], 1):
            parts.append(f"dep{index};desc={_desc(timing.name)};dur={timing.duration_s * 1000:.1f}")
        return ", ".join(parts)
