"""Profiling internals that the end-to-end tests only cover indirectly."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import io
import json
import os
import threading

import pytest
from pyinstrument.session import Session

from fastprof.profiling import _capture, _documents
from fastprof.profiling._tokens import _Signer

APP = "/srv/app/handlers.py"
LIB = os.path.join(os.path.dirname(json.__file__), "decoder.py")


def _frame(function: str, path: str, line: int, attrs: str = "") -> str:
    return f"{function}\x00{path}\x00{line}{attrs}"


def _session(records: list[tuple[list[str], float]], start: list[str]) -> Session:
    return Session(
        frame_records=records,
        start_time=1_700_000_000.0,
        duration=sum(d for _, d in records),
        min_interval=0.001,
        max_interval=0.001,
        sample_count=len(records),
        start_call_stack=start,
        target_description="test",
        cpu_time=0.01,
        sys_path=["/srv/app"],
        sys_prefixes=["/usr"],
    )


@pytest.mark.parametrize("length", [32, 63, 64, 65, 200])
def test_signer_matches_hmac_sha256(length: int) -> None:
    secret = os.urandom(length)
    for payload in ("", "v1.1700000000.AAAAAAAAAAAAAAAAAAAAAA.", "x" * 300):
        expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        assert _Signer(secret).sign(payload) == _documents_b64(expected)


def _documents_b64(digest: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _sample_session() -> Session:
    root = [_frame("MainThread", "<thread>", 1), _frame("run", LIB, 10, "\x01l5")]
    a = [*root, _frame("handler", APP, 20, "\x01cView"), _frame("loads", LIB, 30)]
    b = [*root, _frame("handler", APP, 21)]
    return _session([(a, 0.001), (list(a), 0.002), (b, 0.0015), (a, 0.001)], root)


def test_document_roundtrip_keeps_every_sample() -> None:
    session = _sample_session()
    document = _documents.encode(session, {"profile_id": "a" * 32})
    meta, decoded = _documents.decode(document)
    assert meta == {"profile_id": "a" * 32}
    assert [(list(s), d) for s, d in decoded.frame_records] == [
        (list(s), d) for s, d in session.frame_records
    ]
    assert decoded.start_call_stack == session.start_call_stack
    assert decoded.sample_count == session.sample_count
    assert decoded.duration == session.duration
    body = json.loads(gzip.decompress(document))
    assert body["format"] == 2
    assert len(body["frames"]) == 5  # each distinct frame string once
    assert len(body["stacks"]) == 2  # each distinct stack once
    for fmt in _documents.FORMATS:
        assert _documents.render(document, fmt)


def test_malformed_format_2_document_is_a_value_error() -> None:
    body = {"fastprof": {}, "format": 2, "session": {}, "frames": [], "stacks": [[3]]}
    body.update(start_stack=[], samples=[0], durations=[0.1])
    with pytest.raises(ValueError):
        _documents.decode(gzip.compress(json.dumps(body).encode()))


def test_hot_frames_charges_app_lines_awaits_and_out_of_context() -> None:
    root = [_frame("MainThread", "<thread>", 1)]
    loop = _frame(
        "_run_once", os.path.join(os.path.dirname(asyncio.__file__), "base_events.py"), 1900
    )
    records = [
        ([*root, _frame("handler", APP, 20), _frame("loads", LIB, 30)], 0.003),
        ([*root, _frame("handler", APP, 20, "\x01cView")], 0.001),
        ([*root, _frame("waiter", LIB, 7), "[await]"], 0.002),
        ([*root, loop], 0.0005),
        ([*root, _frame("waiter", LIB, 7), "[out-of-context]"], 0.0005),
        ([], 1.0),
    ]
    for _ in range(2):  # the second pass reads the per-frame cache
        top = _capture.hot_frames(_session(records, root), 10)
        assert top == [
            ("handler", "app/handlers.py:20", 0.004),
            ("waiter [await]", "json/decoder.py:7", 0.002),
            ("[out-of-context]", "", 0.001),
        ]


def test_hot_frames_cache_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(_capture, "_FRAME_CACHE_MAX", 4)
    monkeypatch.setattr(_capture, "_FRAME_CACHE", {})
    records = [([_frame(f"f{i}", APP, i)], 0.001) for i in range(10)]
    _capture.hot_frames(_session(records, []), 3)
    assert len(_capture._FRAME_CACHE) <= 4


def test_large_documents_are_compressed_small_ones_stored() -> None:
    small = _documents.encode(_sample_session(), {})
    assert gzip.decompress(small)  # a gzip stream either way
    root = [_frame("MainThread", "<thread>", 1)]
    records = [([*root, _frame(f"f{i}", APP, i)], 0.001) for i in range(400)]
    large = _documents.encode(_session(records, root), {})
    assert len(large) < len(gzip.decompress(large)) // 2
    assert len(small) > len(gzip.decompress(small))
    _, decoded = _documents.decode(large)
    assert decoded.sample_count == 400


def test_writer_bounds_waiting_jobs_and_flushes() -> None:
    from fastprof.profiling._writer import Writer

    writer = Writer(2)
    gate = threading.Event()
    started = threading.Event()
    done: list[int] = []

    def blocking() -> None:
        started.set()
        gate.wait(5)
        done.append(0)

    assert writer.submit(blocking)
    assert started.wait(5)  # taken by the thread: no longer waiting
    assert writer.submit(lambda: done.append(1))
    assert writer.submit(lambda: done.append(2))
    assert not writer.submit(lambda: done.append(3))  # two already waiting
    assert writer.dropped == 1
    assert not writer.flush(0.05)
    gate.set()
    assert writer.flush(5)
    assert done == [0, 1, 2]

    def failing() -> None:
        raise RuntimeError("boom")

    assert writer.submit(failing)
    assert writer.flush(5)
    assert writer.failed == 1
    writer.close(5)
    assert writer._thread is not None and not writer._thread.is_alive()


@pytest.mark.parametrize("size", [0, 1, 4096, 5000, 65535, 65536, 200_000])
def test_stored_gzip_stream_is_valid_gzip(size: int) -> None:
    data = os.urandom(size)
    stream = _documents._gzip_stored(data)
    assert gzip.decompress(stream) == data
    with gzip.GzipFile(fileobj=io.BytesIO(stream)) as f:
        assert f.read() == data


def test_profile_ids_are_unique_hex_and_differ_after_fork(monkeypatch) -> None:
    from fastprof.profiling._profiling import _ProfileIds
    from fastprof.profiling.stores import valid_profile_id

    ids = _ProfileIds()
    first = [ids.new() for _ in range(1000)]
    assert len(set(first)) == 1000
    assert all(valid_profile_id(i) for i in first)
    assert _ProfileIds().new() != first[0]  # another key
    monkeypatch.setattr(os, "getpid", lambda: -7)  # as in a forked child: new key
    assert ids.new() not in first


def test_writer_pause_between_batches_is_cut_short_by_flush_and_close(monkeypatch) -> None:
    from fastprof.profiling._writer import Writer

    monkeypatch.setattr(Writer, "GATHER_S", 30.0)
    writer = Writer(8)
    done: list[int] = []
    assert writer.submit(lambda: done.append(1))
    assert writer.flush(5)  # processed, then the writer pauses
    assert writer.submit(lambda: done.append(2))
    assert writer.submit(lambda: done.append(3))
    assert writer.flush(5)  # does not wait for the pause to end
    assert done == [1, 2, 3]
    writer.close(5)
    assert writer._thread is not None and not writer._thread.is_alive()


def test_embedded_documents_are_always_compressed() -> None:
    stored = _documents.encode(_sample_session(), {})
    embedded = _documents.encode(_sample_session(), {}, always_compress=True)
    assert gzip.decompress(embedded) == gzip.decompress(stored)
    assert len(embedded) < len(stored)
