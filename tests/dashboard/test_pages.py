"""Every page escapes everything a request can influence: no element, attribute or script
of an attacker's survives into the HTML."""

from __future__ import annotations

import time
from html.parser import HTMLParser

from opentelemetry.sdk.trace import Event
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from fastprof.dashboard import RequestFilter
from fastprof.dashboard._pages import request_page, requests_page, route_page
from fastprof.dashboard._records import build_record
from tests.dashboard.test_bounds import _span

EVIL = "\"'><img src=x onerror=alert(1)><script>alert(2)</script>"
ALLOWED = {
    "html", "head", "meta", "title", "style", "body", "header", "main", "b", "a", "h1", "h2",
    "table", "tr", "th", "td", "span", "div", "code", "details", "summary", "pre", "p", "dl",
    "dt", "dd", "form", "label", "select", "option", "input", "button", "iframe",
}


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def _check(page: bytes) -> str:
    text = page.decode()
    parser = _Elements()
    parser.feed(text)
    assert parser.tags <= ALLOWED, parser.tags - ALLOWED
    assert not {a for a in parser.attrs if a.startswith("on")}, parser.attrs
    assert "<script" not in text and "<img" not in text
    return text


def _evil_record():  # type: ignore[no-untyped-def]
    now = time.time_ns()
    root_ctx = SpanContext(5, 1, is_remote=False, trace_flags=TraceFlags(1))
    dep = _span(f"dependency {EVIL}", 5, 2, root_ctx, now + 1000, now + 5000,
                attributes={"fastprof.dependency.kind": "async", EVIL: EVIL,
                            "fastprof.threadpool.wait_s": EVIL})
    dep._events = (  # type: ignore[attr-defined]
        Event("fastprof.loop.blocked", {"code.file.path": EVIL, "code.line.number": EVIL,
                                        "code.function.name": EVIL, "fastprof.operation": EVIL,
                                        "code.stacktrace": EVIL, "fastprof.loop.blocked_s": EVIL},
              timestamp=now + 2000),
        Event(EVIL, {EVIL: EVIL}, timestamp=now + 3000),
    )
    root = _span(f"GET {EVIL}", 5, 1, None, now, now + 10_000, SpanKind.SERVER,
                 {"http.route": EVIL, "url.path": EVIL, "http.request.method": EVIL,
                  "user_agent.original": EVIL, "error.type": EVIL,
                  "fastprof.request_id": EVIL, "http.response.status_code": 500})
    root._events = (  # type: ignore[attr-defined]
        Event("exception", {"exception.type": EVIL, "exception.message": EVIL,
                            "exception.stacktrace": EVIL}, timestamp=now + 9000),
    )
    record = build_record(root, [dep], slow_s=1.0)
    assert record is not None
    return record


def test_every_page_escapes_what_requests_influence() -> None:
    record = _evil_record()
    listing = _check(requests_page([record], RequestFilter(route=EVIL), [(EVIL, 1)], "/base"))
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in listing
    detail = _check(request_page(record, "/base", "http://j/trace/{trace_id}", True))
    assert detail.count("&lt;script&gt;alert(2)&lt;/script&gt;") >= 8
    route = _check(route_page(EVIL, [0.01], record.deps, [("0" * 32, 0.01)], "/base", True, 20))
    assert "&lt;script&gt;" in route


def test_slowest_five_percent_against_the_rest() -> None:
    from fastprof.dashboard._pages import percentile, profiles_of_part

    durations = [i / 1000 for i in range(1, 101)]
    assert percentile(sorted(durations), 95) == 0.095
    profiled = [("a", 0.099), ("b", 0.01), ("c", 0.095)]
    assert profiles_of_part(profiled, durations, "slow") == ["a", "c"]
    assert profiles_of_part(profiled, durations, "rest") == ["b"]
    assert profiles_of_part(profiled, durations, "all") == ["a", "b", "c"]
