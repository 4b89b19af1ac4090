"""The dashboard's HTML pages: plain server-rendered HTML and CSS, no script.

Everything taken from a request (path, route, headers recorded as attributes,
exception messages, dependency names) is attacker-influenced and goes through
:func:`_e` (``html.escape`` with quotes) before it reaches the page; URLs are
built with ``urllib.parse.urlencode`` and escaped again. The flame graphs are
pyinstrument's own HTML renderer, served as separate documents.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final
from urllib.parse import urlencode

from fastprof.dashboard._records import (
    BLOCKED_EVENT,
    FLAG_BLOCKED,
    FLAG_ERROR,
    FLAG_PROFILED,
    FLAG_SLOW,
    RequestRecord,
)
from fastprof.dashboard.stores import RequestFilter

__all__ = ["percentile", "request_page", "requests_page", "route_page"]

FLAG_NAMES: Final = (
    (FLAG_SLOW, "slow"),
    (FLAG_BLOCKED, "loop blocked"),
    (FLAG_PROFILED, "profiled"),
    (FLAG_ERROR, "error"),
)
FLAG_PARAMS: Final = {
    "slow": FLAG_SLOW,
    "blocked": FLAG_BLOCKED,
    "profiled": FLAG_PROFILED,
    "error": FLAG_ERROR,
}

_CSS: Final = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:8px 16px;display:flex;gap:16px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header b{font-size:16px}
main{padding:12px 16px}h1{font-size:18px;margin:4px 0 12px}h2{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{padding:4px 8px;text-align:left;border-bottom:1px solid #e3e6eb;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.flag{display:inline-block;border-radius:3px;padding:0 5px;margin-right:3px;font-size:12px;
color:#fff}
.f-slow{background:#b7791f}.f-loop{background:#c53030}.f-profiled{background:#2b6cb0}
.f-error{background:#9b2c2c}
form.filters{display:flex;gap:12px;flex-wrap:wrap;align-items:end;margin-bottom:12px}
form.filters label{display:flex;flex-direction:column;font-size:12px}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin-bottom:12px}
.facts dt{font-weight:600}.facts dd{margin:0}
.wf td.name{width:34%}.wf td.bar{width:50%;position:relative}
.track{position:relative;height:14px;background:#f0f2f5}
.seg{position:absolute;top:0;height:14px;min-width:2px;background:#4a7bd0}
.seg.phase{background:#8aa4c8}.seg.dependency{background:#3c8d5a}.seg.teardown{background:#8e5bb5}
.seg.root{background:#2d3748}.seg.err{background:#c53030}
.wait{position:absolute;top:0;left:0;height:14px;background:repeating-linear-gradient(
45deg,#f6ad55,#f6ad55 3px,#fbd38d 3px,#fbd38d 6px)}
.mark{position:absolute;top:-2px;height:18px;width:3px;background:#e53e3e}
tr.event td{background:#fff5f5;font-size:13px}tr.exc td{background:#fff5f5}
details summary{cursor:pointer}pre{white-space:pre-wrap;margin:4px 0;font-size:12px}
.muted{color:#6b7280}.legend span{margin-right:12px}
iframe.flame{width:100%;height:640px;border:1px solid #d4d8de;background:#fff}
"""


def _e(value: object) -> str:
    """Escape for HTML text and quoted attribute values (both quote characters)."""
    return html.escape(str(value), quote=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _num(value: object) -> float:
    """An attribute's value as a number (0.0 if it is not one)."""
    return float(value) if isinstance(value, int | float) else 0.0


def _when(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch * 1000) % 1000:03d}"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


#: Which of a route's profiles a combined flame graph covers.
PARTS: Final = ("all", "slow", "rest")


def profiles_of_part(
    profiled: Sequence[tuple[str, float]], durations: Sequence[float], part: str
) -> list[str]:
    """The profile ids of ``part``: every one, those of the slowest 5 % of the route's
    requests (at least its p95), or the rest."""
    if part == "all":
        return [pid for pid, _ in profiled]
    p95 = percentile(sorted(durations), 95)
    slow = part == "slow"
    return [pid for pid, duration in profiled if (duration >= p95) is slow]


def route_href(base: str, route: str) -> str:
    return f"{base}/route?{urlencode({'route': route})}"


def _page(title: str, base: str, body: str) -> bytes:
    text = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)} · fastprof</title><style>{_CSS}</style></head><body>"
        f"<header><b>fastprof</b><a href='{_e(base)}/'>Requests</a></header>"
        f"<main>{body}</main></body></html>"
    )
    return text.encode("utf-8")


def _flags(flags: int) -> str:
    classes = {FLAG_SLOW: "f-slow", FLAG_BLOCKED: "f-loop", FLAG_PROFILED: "f-profiled",
               FLAG_ERROR: "f-error"}
    return "".join(
        f"<span class='flag {classes[bit]}'>{name}</span>" for bit, name in FLAG_NAMES
        if flags & bit
    )


def requests_page(
    records: Iterable[RequestRecord],
    query: RequestFilter,
    routes: Sequence[tuple[str, int]],
    base: str,
) -> bytes:
    options = ["<option value=''>all routes</option>"]
    for route, count in routes:
        selected = " selected" if route == query.route else ""
        label = route if route else "(no route)"
        options.append(f"<option value='{_e(route)}'{selected}>{_e(label)} ({count})</option>")
    checks = [
        f"<label><span>{_e(name)}</span><input type='checkbox' name='{name}' value='1'"
        f"{' checked' if query.flags & bit else ''}></label>"
        for name, bit in FLAG_PARAMS.items()
    ]
    min_ms = f"{query.min_duration_s * 1000:g}" if query.min_duration_s else ""
    status = str(query.status) if query.status is not None else ""
    form = (
        f"<form class='filters' method='get' action='{_e(base)}/'>"
        f"<label>route<select name='route'>{''.join(options)}</select></label>"
        f"<label>min duration (ms)<input name='min_ms' size='6' value='{_e(min_ms)}'></label>"
        f"<label>status (e.g. 500 or 5)<input name='status' size='4' value='{_e(status)}'>"
        f"</label>{''.join(checks)}<button type='submit'>Filter</button></form>"
    )
    rows = []
    for r in records:
        href = f"{_e(base)}/requests/{_e(r.key)}"
        route_cell = (
            f"<a href='{_e(route_href(base, r.route))}'>{_e(r.route)}</a>" if r.route else
            "<span class='muted'>(no route)</span>"
        )
        rows.append(
            f"<tr class='req' data-key='{_e(r.key)}'><td class='mono'>{_e(_when(r.start))}</td>"
            f"<td>{_e(r.method)}</td><td>{route_cell}</td>"
            f"<td class='mono'><a class='open' href='{href}'>{_e(r.path or '/')}</a></td>"
            f"<td class='num'>{_e(r.status or '')}</td>"
            f"<td class='num'>{_ms(r.duration_s)}</td><td>{_flags(r.flags)}</td></tr>"
        )
    table = (
        "<table id='requests'><tr><th>time (UTC)</th><th>method</th><th>route</th><th>path</th>"
        "<th class='num'>status</th><th class='num'>ms</th><th>flags</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    if not rows:
        table += "<p class='muted'>No request matches.</p>"
    return _page("Requests", base, f"<h1>Recent requests</h1>{form}{table}")


class _Node:
    __slots__ = ("children", "entry")

    def __init__(self, entry: list[Any]) -> None:
        self.entry = entry
        self.children: list[_Node] = []


def _tree_order(spans: list[list[Any]]) -> list[tuple[int, list[Any]]]:
    """The spans depth-first (children by start time), with their depth."""
    nodes = {entry[1]: _Node(entry) for entry in spans}
    roots: list[_Node] = []
    for entry in spans:
        node = nodes[entry[1]]
        parent = nodes.get(entry[2]) if entry[2] else None
        if parent is not None and parent is not node:
            parent.children.append(node)
        else:
            roots.append(node)
    out: list[tuple[int, list[Any]]] = []
    seen: set[int] = set()
    stack = [(0, n) for n in sorted(roots, key=lambda n: n.entry[3], reverse=True)]
    while stack:
        depth, node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append((depth, node.entry))
        children = sorted(node.children, key=lambda n: n.entry[3], reverse=True)
        stack.extend((depth + 1, child) for child in children)
    return out


def _kind(entry: list[Any], depth: int) -> str:
    attrs = entry[6]
    if depth == 0:
        return "root"
    if "fastprof.dependency.kind" in attrs:
        return "teardown" if "fastprof.dependency.phase" in attrs else "dependency"
    if "fastprof.phase" in attrs or str(entry[0]).startswith(("fastapi.", "fastprof.")):
        return "phase"
    return "other"


def _attr_table(attrs: dict[str, Any]) -> str:
    if not attrs:
        return ""
    rows = "".join(
        f"<tr><td class='mono'>{_e(k)}</td><td class='mono'>{_e(v)}</td></tr>"
        for k, v in sorted(attrs.items())
    )
    return f"<table class='attrs'>{rows}</table>"


def _short(path: object) -> str:
    parts = str(path).replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])


def request_page(
    record: RequestRecord,
    base: str,
    jaeger_url: str | None,
    has_profiles: bool,
) -> bytes:
    total = max(record.duration_s * 1e6, 1.0)  # µs, like the span offsets
    for entry in record.spans:
        total = max(total, entry[3] + entry[4])
    links = []
    if jaeger_url is not None:
        url = jaeger_url.replace("{trace_id}", record.trace_id)
        links.append(f"<a id='jaeger' href='{_e(url)}' rel='noreferrer'>Trace in Jaeger</a>")
    if record.profile_id and has_profiles:
        links.append(
            f"<a id='profile' href='{_e(base)}/profiles/{_e(record.profile_id)}'>"
            "Profile (flame graph)</a>"
        )
    if record.route:
        links.append(f"<a href='{_e(route_href(base, record.route))}'>Route statistics</a>")
    facts = [
        ("method", _e(record.method)),
        ("path", f"<code>{_e(record.path)}</code>"),
        ("route", f"<code>{_e(record.route or '(no route)')}</code>"),
        ("status", _e(record.status or "")),
        ("duration", f"{_ms(record.duration_s)} ms"),
        ("started (UTC)", _e(time.strftime("%Y-%m-%d ", time.gmtime(record.start))
                              + _when(record.start))),
        ("flags", _flags(record.flags) or "<span class='muted'>none</span>"),
        ("trace id", f"<code>{_e(record.trace_id)}</code>"),
        ("request id", f"<code>{_e(record.request_id)}</code>"),
        ("process", _e(record.pid)),
    ]
    if record.error_type:
        facts.append(("error", f"<code>{_e(record.error_type)}</code>"))
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    rows = []
    for depth, entry in _tree_order(record.spans):
        name, _, _, offset, duration, error, attrs, events = entry
        kind = _kind(entry, depth)
        left = 100.0 * offset / total
        width = 100.0 * duration / total
        seg_class = f"seg {kind}" + (" err" if error else "")
        inner = ""
        wait = attrs.get("fastprof.threadpool.wait_s")
        if isinstance(wait, int | float) and wait > 0 and duration > 0:
            share = min(100.0, 100.0 * wait * 1e6 / duration)
            inner = f"<div class='wait' title='thread-pool wait' style='width:{share:.3f}%'></div>"
        late = " <span class='muted'>(after the response)</span>" if (
            depth > 0 and offset >= record.duration_s * 1e6
        ) else ""
        wait_text = (
            f" <span class='muted'>(waited {_ms(float(wait))} ms for a worker thread)</span>"
            if isinstance(wait, int | float) and wait > 0 else ""
        )
        rows.append(
            f"<tr class='span {kind}' data-kind='{kind}'>"
            f"<td class='name' style='padding-left:{8 + 16 * depth}px'><details><summary>"
            f"<span class='span-name'>{_e(name)}</span>{late}{wait_text}</summary>"
            f"{_attr_table(attrs)}</details></td>"
            f"<td class='num'>{_ms(duration / 1e6)}</td>"
            f"<td class='bar'><div class='track'><div class='{seg_class}' "
            f"style='left:{left:.3f}%;width:{width:.3f}%'>{inner}</div></div></td></tr>"
        )
        rows.extend(_event_row(event, depth, total) for event in events)
    waterfall = (
        "<table class='wf' id='waterfall'><tr><th>span</th><th class='num'>ms</th>"
        "<th>timeline</th></tr>" + "".join(rows) + "</table>"
        "<p class='legend muted'><span style='color:#8aa4c8'>▇ phase</span>"
        "<span style='color:#3c8d5a'>▇ dependency</span>"
        "<span style='color:#8e5bb5'>▇ teardown</span>"
        "<span style='color:#dd6b20'>▨ waiting for a worker thread</span>"
        "<span style='color:#c53030'>▇ event loop blocked</span></p>"
    )
    if record.spans_dropped:
        waterfall += f"<p class='muted'>{record.spans_dropped} more spans not kept.</p>"
    body = (
        f"<h1>{_e(record.method)} {_e(record.route or record.path)}</h1>"
        f"<dl class='facts'>{dl}</dl><p>{' · '.join(links)}</p>{waterfall}"
    )
    return _page("Request", base, body)


def _event_row(event: list[Any], depth: int, total: float) -> str:
    name, offset, attrs = event
    left = 100.0 * max(_num(offset), 0.0) / total
    pad = 24 + 16 * depth
    if name == BLOCKED_EVENT:
        blocked = _num(attrs.get("fastprof.loop.blocked_s"))
        where = f"{_short(attrs.get('code.file.path', '?'))}:{attrs.get('code.line.number', '?')}"
        func = attrs.get("code.function.name", "")
        operation = attrs.get("fastprof.operation")
        text = (
            f"⚠ event loop blocked {_ms(blocked)} ms at "
            f"<code class='where'>{_e(where)}</code> in <code>{_e(func)}</code>"
            + (f" (during <code>{_e(operation)}</code>)" if operation else "")
        )
        stack = attrs.get("code.stacktrace")
        if stack:
            text += f"<details><summary>stack</summary><pre>{_e(stack)}</pre></details>"
        width = 100.0 * blocked * 1e6 / total
        return (
            f"<tr class='event blocked'><td style='padding-left:{pad}px'>{text}</td><td></td>"
            f"<td class='bar'><div class='track'><div class='seg err' "
            f"style='left:{left:.3f}%;width:{width:.3f}%'></div></div></td></tr>"
        )
    if name == "exception":
        etype = attrs.get("exception.type", "")
        message = attrs.get("exception.message", "")
        stack = attrs.get("exception.stacktrace")
        text = (
            f"✖ exception <code>{_e(etype)}</code>: "
            f"<span class='exc-message'>{_e(message)}</span>"
        )
        if stack:
            text += f"<details><summary>traceback</summary><pre>{_e(stack)}</pre></details>"
        return (
            f"<tr class='event exc'><td style='padding-left:{pad}px'>{text}</td><td></td>"
            f"<td class='bar'><div class='track'><div class='mark' style='left:{left:.3f}%'>"
            "</div></div></td></tr>"
        )
    return (
        f"<tr class='event other'><td style='padding-left:{pad}px'>"
        f"<details><summary>• {_e(name)}</summary>{_attr_table(attrs)}</details></td><td></td>"
        f"<td class='bar'><div class='track'><div class='mark' style='left:{left:.3f}%;"
        "background:#718096'></div></div></td></tr>"
    )


def route_page(
    route: str,
    durations: list[float],
    deps: list[list[Any]],
    profiled: list[tuple[str, float]],
    base: str,
    has_profiles: bool,
    aggregate_limit: int,
) -> bytes:
    ordered = sorted(durations)
    stats = (
        f"<table id='route-stats' style='width:auto'><tr><th class='num'>requests</th>"
        f"<th class='num'>p50 ms</th><th class='num'>p95 ms</th><th class='num'>p99 ms</th></tr>"
        f"<tr><td class='num'>{len(ordered)}</td><td class='num'>{_ms(percentile(ordered, 50))}"
        f"</td><td class='num'>{_ms(percentile(ordered, 95))}</td>"
        f"<td class='num'>{_ms(percentile(ordered, 99))}</td></tr></table>"
    )
    groups: dict[tuple[str, str], list[float]] = {}
    for dep in deps:  # [name, "call" | "teardown", µs]
        if isinstance(dep, list) and len(dep) == 3 and isinstance(dep[2], int | float):
            groups.setdefault((str(dep[0]), str(dep[1])), []).append(dep[2] / 1e6)
    dep_rows = []
    for (name, kind), values in sorted(
        groups.items(), key=lambda item: -percentile(sorted(item[1]), 95)
    ):
        values.sort()
        dep_rows.append(
            f"<tr><td class='mono'>{_e(name)}</td><td>{_e(kind)}</td>"
            f"<td class='num'>{len(values)}</td><td class='num'>{_ms(percentile(values, 50))}</td>"
            f"<td class='num'>{_ms(percentile(values, 95))}</td></tr>"
        )
    dep_table = (
        "<table id='dependencies'><tr><th>dependency</th><th>part</th><th class='num'>calls</th>"
        "<th class='num'>p50 ms</th><th class='num'>p95 ms</th></tr>" + "".join(dep_rows)
        + "</table>"
        if dep_rows
        else "<p class='muted'>No dependency spans recorded for this route.</p>"
    )
    if profiled and has_profiles:
        used = min(len(profiled), aggregate_limit)
        src = f"{base}/route/flame?{urlencode({'route': route})}"
        compare = []
        for part, label in (("slow", "the slowest 5 %"), ("rest", "the rest")):
            count = min(len(profiles_of_part(profiled, durations, part)), aggregate_limit)
            if count:
                href = f"{base}/route/flame?{urlencode({'route': route, 'part': part})}"
                compare.append(
                    f"<a id='part-{part}' href='{_e(href)}'>{label} ({count} profiles)</a>"
                )
            else:
                compare.append(f"{label} (no profile)")
        flame = (
            f"<p>{used} sampled profile(s) combined (pyinstrument). Compare: "
            f"{' · '.join(compare)}</p>"
            f"<iframe class='flame' id='aggregate' "
            f"src='{_e(src)}' title='aggregated profile'></iframe>"
        )
    else:
        flame = "<p class='muted'>No profile of this route is kept.</p>"
    body = (
        f"<h1>Route <code>{_e(route or '(no route)')}</code></h1>{stats}"
        f"<p><a href='{_e(base)}/?{_e(urlencode({'route': route}))}'>This route's requests</a>"
        f"</p><h2>Dependencies</h2>{dep_table}<h2>Aggregated profile</h2>{flame}"
    )
    return _page("Route", base, body)
