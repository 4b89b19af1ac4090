"""Profiling internals that the end-to-end tests only cover indirectly."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import io
import json
import os
import re
import sys
import threading
import time

import pytest
from pyinstrument import Profiler, stack_sampler
from pyinstrument.frame_info import frame_info_get_identifier
from pyinstrument.profiler import ActiveProfilerSession
from pyinstrument.session import Session
from pyinstrument.stack_sampler import AsyncState, build_call_stack

from fastprof import _internal_errors
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


def test_hot_frames_charges_app_lines_and_awaits_and_counts_out_of_context_as_waiting() -> None:
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
        top, waiting = _capture.hot_frames(_session(records, root), 10)
        assert top == [
            ("handler", "app/handlers.py:20", 0.004),
            ("waiter [await]", "json/decoder.py:7", 0.002),
        ]
        # The loop's own frame and pyinstrument's marker: the task was suspended.
        assert waiting == 0.001


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


def _nested(depth: int, fn):  # type: ignore[no-untyped-def]
    return fn() if depth == 0 else _nested(depth - 1, fn)


class _Holder:
    def method(self):  # type: ignore[no-untyped-def]
        return _capture._start_call_stack(sys._getframe()), build_call_stack(
            sys._getframe(), "initial", None
        )


def test_start_stack_has_pyinstruments_identifiers_and_lines() -> None:
    for _ in range(2):  # the second pass reads the per-code cache
        ours, theirs = _nested(5, _Holder().method)
        assert [frame_info_get_identifier(f) for f in ours] == [
            frame_info_get_identifier(f) for f in theirs
        ]
        # Same line numbers; only the class-name and hidden-frame attributes are left out.
        assert [re.sub("\x01(c[^\x01]*|h1)", "", f) for f in theirs] == ours
        assert any("\x01c_Holder" in f for f in theirs)


def test_start_stack_cache_is_bounded_and_checks_code_identity(monkeypatch) -> None:
    monkeypatch.setattr(_capture, "_FRAME_STRINGS", {})
    monkeypatch.setattr(_capture, "_FRAME_STRINGS_MAX", 2)
    monkeypatch.setattr(_capture, "_frame_strings_count", 0)
    frame = sys._getframe()
    # An entry for another code object under this code's id (ids are reused
    # after a code object is freed) is not used.
    _capture._FRAME_STRINGS[id(frame.f_code)] = (_nested.__code__, "bogus\x00", {})
    stack = _capture._start_call_stack(frame)
    assert not any(f.startswith("bogus") for f in stack)
    assert stack[-1].startswith(f"{frame.f_code.co_name}\x00{__file__}\x00")
    assert sum(len(lines) for _, _, lines in _capture._FRAME_STRINGS.values()) <= 2
    assert _capture._frame_strings_count <= 2
    again = _capture._start_call_stack(frame)  # rebuilt after clearing: the same callers
    assert again[:-1] == stack[:-1]


def _strict_profiler_records(calls: list[tuple[list[str], float, AsyncState | None]]) -> list:
    profiler = Profiler(interval=0.001, async_mode="strict")
    profiler._active_session = ActiveProfilerSession(
        start_time=0.0,
        start_process_time=0.0,
        start_call_stack=[],
        target_description="",
        interval=0.001,
    )
    for call in calls:
        profiler._sampler_saw_call_stack(*call)
    return profiler._active_session.frame_records


def test_task_sampler_records_what_a_strict_profiler_records() -> None:
    stack = [_frame("MainThread", "<thread>", 1), _frame("handler", APP, 20)]
    waiting = [_frame("MainThread", "<thread>", 1), _frame("waiter", LIB, 7)]
    calls = [
        (stack, 0.001, AsyncState("in_context")),
        (stack, 0.002, AsyncState("out_of_context_awaited", info=waiting)),
        (stack, 0.003, AsyncState("out_of_context_unknown", info=waiting)),
        (stack, 0.004, None),
    ]
    sampler = _capture._Sampler(0.001, in_task=True, max_samples=100)
    for call in calls:
        sampler._saw_call_stack(*call)
    assert sampler.frame_records == _strict_profiler_records(calls)
    assert sampler.frame_records[1][0][-1] == "[await]"
    assert sampler.frame_records[2][0][-1] == "[out-of-context]"


def _new_capture(interval_s: float = 0.001) -> _capture.ProfileCapture:
    return _capture.ProfileCapture("a" * 32, trigger="header", interval_s=interval_s, on_done=id)


def _make_update_fail(monkeypatch, message: str) -> None:  # type: ignore[no-untyped-def]
    """pyinstrument's StackSampler._update does its work, then raises ``message``."""
    update = stack_sampler.StackSampler._update

    def failing(self):  # type: ignore[no-untyped-def]
        update(self)
        raise ValueError(message)

    monkeypatch.setattr(stack_sampler.StackSampler, "_update", failing)


def _count_stack_builds(monkeypatch) -> list[int]:
    """Counts pyinstrument's full call-stack builds (each sample or context change)."""
    builds = [0]
    original = stack_sampler.build_call_stack

    def counting(*args):  # type: ignore[no-untyped-def]
        builds[0] += 1
        return original(*args)

    monkeypatch.setattr(stack_sampler, "build_call_stack", counting)
    return builds


def _sampling_stopped() -> bool:
    return (
        not stack_sampler.get_stack_sampler().subscribers
        and sys.getprofile() is None
        and stack_sampler.active_profiler_context_var.get() is None
    )


@pytest.mark.anyio
async def test_stopping_a_profile_builds_no_stack_for_it(monkeypatch) -> None:
    builds = _count_stack_builds(monkeypatch)
    # A long interval: no sample is due, so any build is the context change.
    capture = _new_capture(10.0)
    capture.start(sys._getframe(), max_duration_s=60)
    builds[0] = 0
    session = capture.stop()
    assert builds[0] == 0
    assert session is not None and session.start_call_stack[-1].startswith("test_stopping")
    assert _sampling_stopped()
    # Control: pyinstrument's own stop, at the same depth, builds the stack once.
    profiler = Profiler(interval=10.0, async_mode="strict")
    profiler.start()
    builds[0] = 0
    profiler.stop()
    assert builds[0] == 1
    assert _sampling_stopped()


@pytest.mark.anyio
async def test_stopping_one_profile_keeps_a_concurrent_one_sampling() -> None:
    started = [asyncio.Event(), asyncio.Event()]
    release = [asyncio.Event(), asyncio.Event()]
    stopped = asyncio.Event()
    targets: list[object] = []

    async def request(index: int) -> None:
        capture = _new_capture()
        capture.start(sys._getframe(), max_duration_s=60)
        targets.append(capture._sampler._saw_call_stack)
        started[index].set()
        await release[index].wait()
        capture.stop()
        assert stack_sampler.active_profiler_context_var.get() is None
        stopped.set()

    tasks = [asyncio.create_task(request(i)) for i in range(2)]
    await asyncio.gather(started[0].wait(), started[1].wait())
    sampler = stack_sampler.get_stack_sampler()
    assert [s.target for s in sampler.subscribers] == targets
    release[0].set()
    await stopped.wait()
    assert [s.target for s in sampler.subscribers] == [targets[1]]
    assert sampler.current_sampling_interval == 0.001 and sys.getprofile() is not None
    release[1].set()
    await asyncio.gather(*tasks)
    assert _sampling_stopped()


@pytest.mark.anyio
async def test_unknown_pyinstrument_internals_use_the_public_unsubscribe(monkeypatch) -> None:
    monkeypatch.setattr(_capture, "_active_profiler", None)
    builds = _count_stack_builds(monkeypatch)
    capture = _new_capture(10.0)
    capture.start(sys._getframe(), max_duration_s=60)
    builds[0] = 0
    assert capture.stop() is not None
    assert builds[0] == 1  # pyinstrument's unsubscribe: the context change is seen
    assert _sampling_stopped()


def test_unsubscribing_a_stranger_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not subscribed"):
        _capture._unsubscribe(print)


@pytest.mark.anyio
async def test_a_failed_stop_leaves_the_context_free_for_the_next_profile(monkeypatch) -> None:
    capture = _new_capture()
    capture.start(sys._getframe(), max_duration_s=60)
    _make_update_fail(monkeypatch, "pyinstrument refused")
    with pytest.raises(ValueError, match="refused"):
        capture.stop()
    monkeypatch.undo()
    assert _sampling_stopped()
    again = _new_capture()
    again.start(sys._getframe(), max_duration_s=60)
    assert again.stop() is not None
    assert _sampling_stopped()


@pytest.mark.anyio
async def test_a_failed_start_leaves_no_sampler_behind(monkeypatch) -> None:
    """pyinstrument failing inside subscribe() (after registering the subscriber)."""
    _make_update_fail(monkeypatch, "timing thread preference clash")
    capture = _new_capture()
    with pytest.raises(ValueError, match="clash"):
        capture.start(sys._getframe(), max_duration_s=60)
    monkeypatch.undo()
    assert _sampling_stopped()
    assert capture._sampler.frame_records == [] and not capture._sampler.running


def test_sample_callback_never_raises_into_the_app(monkeypatch) -> None:
    sampler = _capture._Sampler(0.001, in_task=True, max_samples=2)
    stack = [_frame("handler", APP, 20)]
    sampler._saw_call_stack(stack, 0.001, object())  # an async state it does not know
    assert _internal_errors.counts()["profile.sample"] == 1
    sampler._saw_call_stack(stack, 0.001, None, "an argument a later pyinstrument might add")
    sampler._saw_call_stack(stack, 0.001)
    sampler._saw_call_stack(stack, 0.001, None)  # over max_samples: counted, not kept
    assert len(sampler.frame_records) == 2 and sampler.dropped == 1


@pytest.mark.anyio
async def test_a_long_worker_call_stops_keeping_samples_at_the_duration_cap() -> None:
    """A sync call still running in the thread pool when the profile's cap fires."""
    capture = _new_capture()
    capture.start(sys._getframe(), max_duration_s=0.05)
    workers: list[_capture._Sampler] = []
    original = _capture.ProfileCapture._merge_worker

    def spin_in_worker() -> None:
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            sum(range(200))

    def merge(self, worker, name):  # type: ignore[no-untyped-def]
        workers.append(worker)
        return original(self, worker, name)

    _capture.ProfileCapture._merge_worker = merge  # type: ignore[method-assign]
    try:
        await asyncio.to_thread(capture.worker_hook, spin_in_worker)
    finally:
        _capture.ProfileCapture._merge_worker = original  # type: ignore[method-assign]
    assert capture.truncated and capture.stop() is not None
    (worker,) = workers
    assert worker.dropped > len(worker.frame_records) > 0  # most of the 0.6 s was not kept
    assert (
        capture.worker_calls_incomplete == 0
    )  # nothing merged after the stop, nothing counted twice


def test_installed_pyinstrument_has_the_sampler_internals_fastprof_uses() -> None:
    """What ``_capture`` relies on beyond pyinstrument's public API (pinned to < 6)."""
    import inspect

    sampler = stack_sampler.StackSampler()
    assert isinstance(sampler.subscribers, list) and callable(sampler._update)
    assert {"target", "desired_interval", "use_async_context"} <= set(
        inspect.signature(sampler.subscribe).parameters
    )
    assert _capture._active_profiler is stack_sampler.active_profiler_context_var
    target = inspect.signature(Profiler._sampler_saw_call_stack).parameters
    assert list(target) == ["self", "call_stack", "time_since_last_sample", "async_state"]


@pytest.mark.anyio
async def test_worker_samples_stop_at_the_profiles_worker_sample_budget(monkeypatch) -> None:
    monkeypatch.setattr(_capture, "MAX_WORKER_SAMPLES", 5)
    capture = _new_capture()
    capture.start(sys._getframe(), max_duration_s=60)

    def spin_in_worker() -> None:
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            sum(range(200))

    kept: list[int] = []
    merge = _capture.ProfileCapture._merge_worker

    def spy(self, worker, name):  # type: ignore[no-untyped-def]
        kept.append(len(worker.frame_records))  # bounded while it ran, not only when merged
        return merge(self, worker, name)

    monkeypatch.setattr(_capture.ProfileCapture, "_merge_worker", spy)
    await asyncio.to_thread(capture.worker_hook, spin_in_worker)  # ~100 samples
    assert kept and kept[0] <= 5
    assert capture.worker_calls == 1 and capture.worker_calls_incomplete == 1
    # A further call finds the budget spent: it runs unsampled, and is counted.
    assert await asyncio.to_thread(capture.worker_hook, lambda: 42) == 42
    assert capture.worker_calls == 1 and capture.worker_calls_incomplete == 2
    session = capture.stop()
    assert session is not None
    grafted = [s for s, _ in session.frame_records if any("[worker thread]" in f for f in s)]
    assert 0 < len(grafted) <= 5
