"""HTTP helpers for the SERVER span: header access, propagation, semantic conventions.

Header bytes are decoded as latin-1 (never raises) and values are length-checked
before anything parses them (see docs/reliability.md). Everything here is pure and cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from starlette.types import Scope

__all__ = [
    "KNOWN_METHODS",
    "SPAN_METHODS",
    "MAX_PROPAGATION_HEADER_BYTES",
    "QueryPolicy",
    "RawHeaders",
    "extract_context",
    "find_header",
    "redact_query",
    "request_attributes",
    "server_address",
    "truncate",
    "valid_request_id",
]

RawHeaders = list[tuple[bytes, bytes]]
QueryPolicy = Literal["redact_sensitive", "redact_all", "omit"]

KNOWN_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)

#: Propagation headers longer than this are ignored (W3C tracestate is capped at
#: 512 characters, OTel's baggage propagator at 8192 bytes).
MAX_PROPAGATION_HEADER_BYTES: Final = 8192

#: Query keys whose values are replaced by ``REDACTED`` (OTel URL semantic
#: conventions list the first five; the rest are common credentials).
SENSITIVE_QUERY_KEYS: Final = frozenset(
    k.lower()
    for k in (
        "AWSAccessKeyId",
        "Signature",
        "sig",
        "X-Goog-Signature",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "code",
        "auth",
        "authorization",
        "session",
        "fastprof_profile",  # fastprof's own dev-mode profiling token
    )
)

_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def find_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case bytes), or ``None``.

    ASGI servers lower-case header names, so names are compared as they are.
    """
    for key, value in headers:
        if key == name:
            return value
    return None


class _RawHeadersGetter(Getter[RawHeaders]):
    """Read propagation headers straight from the ASGI header list."""

    def get(self, carrier: RawHeaders, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values: list[str] = []
        for raw_key, raw_value in carrier:
            if raw_key == name:
                if len(raw_value) > MAX_PROPAGATION_HEADER_BYTES:
                    return None  # oversized: ignore the header entirely
                values.append(raw_value.decode("latin-1"))
        if not values:
            return None
        if key.lower() == "baggage" and len(values) > 1:
            return [",".join(values)]
        return values

    def keys(self, carrier: RawHeaders) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER: Final = _RawHeadersGetter()


_fields_cache: tuple[object, frozenset[bytes]] = (None, frozenset())


def _propagation_fields(propagator: TextMapPropagator) -> frozenset[bytes]:
    """Header names ``propagator`` reads, cached per propagator (empty: unknown)."""
    global _fields_cache
    try:
        fields = frozenset(f.lower().encode("latin-1") for f in propagator.fields)
    except Exception:
        return frozenset()  # unknown: always extract (not cached, retried next time)
    _fields_cache = (propagator, fields)
    return fields


_EMPTY: Final = Context()


def extract_context(headers: RawHeaders) -> Context:
    """Extract the remote parent with the global propagator.

    Malformed, oversized or duplicated-and-conflicting values give an empty
    context (a new root); a propagator that raises is treated the same way.
    Requests that carry none of the propagator's headers skip extraction.
    """
    try:
        propagator = propagate.get_global_textmap()
        cached_for, fields = _fields_cache
        if cached_for is not propagator:
            fields = _propagation_fields(propagator)
        if fields:
            for key, _ in headers:
                if key in fields:
                    break
            else:
                return _EMPTY  # a new root: never the ambient context
        return propagator.extract(headers, context=_EMPTY, getter=_GETTER)
    except Exception:
        return _EMPTY


def redact_query(
    query: bytes, policy: QueryPolicy, limit: int, sensitive: frozenset[str] = SENSITIVE_QUERY_KEYS
) -> str | None:
    """Return ``url.query`` under ``policy``, or ``None`` when it must be omitted."""
    if not query or policy == "omit":
        return None
    text = query[: limit * 2].decode("latin-1")
    parts = []
    for key, value in parse_qsl(text, keep_blank_values=True):
        if policy == "redact_all" or key.lower() in sensitive:
            value = "REDACTED"
        parts.append(f"{quote(key, safe='')}={quote(value, safe='')}")
    return truncate("&".join(parts), limit)


_BAD_HOST: Final = re.compile(r"[/?#@ \t]").search


def server_address(
    host: bytes | None, server: tuple[str, int | None] | None, scheme: str
) -> tuple[str | None, int | None]:
    """``server.address``/``server.port`` from the Host header, else the ASGI ``server``."""
    if host:
        text = host.decode("latin-1")
        if len(text) > 255 or _BAD_HOST(text) is not None:
            return None, None
        if text.startswith("["):  # IPv6 literal
            end = text.find("]")
            if end == -1:
                return None, None
            address, rest = text[1:end], text[end + 1 :]
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            address, _, port_text = text.partition(":")
        port: int | None
        if port_text:
            if not port_text.isdigit() or len(port_text) > 5:
                return None, None
            port = int(port_text)
        else:
            port = 443 if scheme in ("https", "wss") else 80
        return (address or None), port
    if server:
        return server[0], server[1]
    return None, None


def valid_request_id(raw: bytes | None) -> str | None:
    """Accept an incoming request id only if it is short and plain."""
    if raw is None or len(raw) > 128:
        return None
    text = raw.decode("latin-1")
    return text if _REQUEST_ID_RE.fullmatch(text) else None


def truncate(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters."""
    return value if len(value) <= limit else value[:limit]


#: The method part of a span name: the method if known, else ``HTTP`` (a dict
#: lookup, on every request).
SPAN_METHODS: Final = {m: m for m in KNOWN_METHODS}


def method_attributes(method: str) -> dict[str, Any]:
    """The semantic-convention attributes of ``method`` (unknown ones as ``_OTHER``)."""
    if method in KNOWN_METHODS:
        return {"http.request.method": method}
    return {
        "http.request.method": "_OTHER",
        "http.request.method_original": truncate(method, 64),
    }


def request_attributes(
    scope: Scope,
    headers: RawHeaders,
    attrs: dict[str, Any],
    limit: int,
    query_policy: QueryPolicy,
    sensitive_keys: frozenset[str],
) -> dict[str, Any]:
    """Add the HTTP server span attributes of ``scope`` to ``attrs`` (strings cut to ``limit``)."""
    scheme = scope.get("scheme", "http")
    attrs["url.scheme"] = scheme
    attrs["url.path"] = truncate(scope.get("path", ""), limit)
    query = redact_query(scope.get("query_string", b""), query_policy, limit, sensitive_keys)
    if query is not None:
        attrs["url.query"] = query
    version = scope.get("http_version")
    if version:
        attrs["network.protocol.version"] = version
    address, port = server_address(find_header(headers, b"host"), scope.get("server"), scheme)
    if address is not None:
        attrs["server.address"] = truncate(address, limit)
        if port is not None:
            attrs["server.port"] = port
    client = scope.get("client")
    if client:
        attrs["client.address"] = client[0]
        if client[1] is not None:
            attrs["client.port"] = client[1]
    user_agent = find_header(headers, b"user-agent")
    if user_agent is not None:
        attrs["user_agent.original"] = truncate(user_agent.decode("latin-1"), limit)
    return attrs
