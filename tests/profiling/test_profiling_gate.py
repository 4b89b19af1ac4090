"""``Profiling.wants_unsampled``: which unsampled requests may be profiled (a cheap pre-check)."""

from __future__ import annotations

from typing import Any

import fastprof

SECRET = "s" * 32


def _scope(headers: list[tuple[bytes, bytes]] | None = None, query: bytes = b"") -> dict[str, Any]:
    return {"type": "http", "headers": headers or [], "query_string": query}


def test_token_header_trigger_wants_only_requests_carrying_the_header() -> None:
    profiling = fastprof.Profiling(secret=SECRET)
    assert not profiling.wants_unsampled(_scope([(b"host", b"x")]))
    assert not profiling.wants_unsampled(_scope())
    assert not profiling.wants_unsampled({"type": "http"})
    # Any value: the token is verified later, in on_request_start.
    assert profiling.wants_unsampled(_scope([(b"x-fastprof-profile", b"not-a-token")]))


def test_custom_header_name_is_the_one_checked() -> None:
    profiling = fastprof.Profiling(secret=SECRET, header="X-Prof")
    assert profiling.wants_unsampled(_scope([(b"x-prof", b"t")]))
    assert not profiling.wants_unsampled(_scope([(b"x-fastprof-profile", b"t")]))


def test_dev_mode_query_parameter_is_a_trigger() -> None:
    profiling = fastprof.Profiling(secret=SECRET, dev_mode=True, header=None)
    assert profiling.wants_unsampled(_scope(query=b"a=1&fastprof_profile=t"))
    assert not profiling.wants_unsampled(_scope(query=b"a=1"))
    assert not fastprof.Profiling(secret=SECRET).wants_unsampled(
        _scope(query=b"fastprof_profile=t")
    )


def test_sampling_wants_every_request() -> None:
    assert fastprof.Profiling(sample_rate=0.01).wants_unsampled(_scope())
    assert fastprof.Profiling(sample_routes={"/a": 0.5}).wants_unsampled(_scope())
