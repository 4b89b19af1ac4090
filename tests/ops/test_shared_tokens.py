"""Profile tokens are single-use across worker processes that share a FileStore."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import warnings

import pytest
from _ops_support import SECRET

import fastprof
from fastprof.profiling import FileStore, MemoryStore

NONCE = "A" * 22


def _claim(directory: str, nonce: str, start: multiprocessing.synchronize.Event, results) -> None:
    store = FileStore(directory)
    start.wait(10)
    results.put(store.claim_nonce(nonce, int(time.time()) + 60, time.time()))


def test_one_process_wins_a_nonce_claimed_by_several_at_once(tmp_path) -> None:
    """Three processes claim the same nonce at the same moment: exactly one gets it."""
    # fork: the children only make one system call each (spawn would re-import
    # everything, seconds per child on a busy machine).
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_claim, args=(str(tmp_path), NONCE, start, results)) for _ in range(3)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        for proc in procs:
            proc.start()
    start.set()
    outcomes = sorted(str(results.get(timeout=20)) for _ in procs)
    for proc in procs:
        proc.join(10)
    assert outcomes == ["None", "replayed", "replayed"]


def test_expired_nonces_are_pruned_and_unexpired_ones_kept(tmp_path) -> None:
    """A nonce file lives until its token's expiry; the cap refuses tokens when full."""
    now = [float(int(time.time()))]
    store = FileStore(tmp_path, max_nonces=2, clock=lambda: now[0])
    assert store.claim_nonce("a" * 22, int(now[0]) + 10, now[0]) is None
    assert store.claim_nonce("b" * 22, int(now[0]) + 100, now[0]) is None
    assert store.prune_nonces() == 2
    # Full of unexpired nonces: refused rather than forgetting one.
    assert store.claim_nonce("c" * 22, int(now[0]) + 100, now[0]) == "replay_cache_full"
    now[0] += 50  # the first token has expired
    assert store.prune_nonces() == 1
    assert sorted(os.listdir(tmp_path / ".nonces")) == ["b" * 22]
    assert store.claim_nonce("c" * 22, int(now[0]) + 100, now[0]) is None
    assert store.claim_nonce("b" * 22, int(now[0]) + 100, now[0]) == "replayed"


def test_claims_prune_expired_nonces_in_a_background_thread(tmp_path) -> None:
    """Every 64 claims a short-lived thread (not the caller, which is the event loop)
    deletes the nonces of expired tokens and keeps the others."""
    for thread in threading.enumerate():
        if thread.name == "fastprof-nonce-prune":
            thread.join(10)  # an earlier test's prune, still finishing on a busy machine
    now = time.time()
    store = FileStore(tmp_path, clock=lambda: now + 100)  # prunes 100 s from now
    live = "L" * 22
    assert store.claim_nonce(live, int(now) + 600, now) is None
    expired = [f"{i:022d}" for i in range(63)]  # tokens valid for 10 s more
    for nonce in expired[:-1]:
        assert store.claim_nonce(nonce, int(now) + 10, now) is None
    assert len(os.listdir(tmp_path / ".nonces")) == 63
    assert not [t for t in threading.enumerate() if t.name == "fastprof-nonce-prune"]
    assert store.claim_nonce(expired[-1], int(now) + 10, now) is None  # the 64th claim
    deadline = time.monotonic() + 10
    while os.listdir(tmp_path / ".nonces") != [live] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.listdir(tmp_path / ".nonces") == [live]
    assert store.claim_nonce(live, int(now) + 600, now) == "replayed"


def test_an_unwritable_nonce_directory_fails_closed(tmp_path) -> None:
    """If the claim cannot be written the token is refused (and counted), never accepted."""
    (tmp_path / ".nonces").write_text("not a directory")
    store = FileStore(tmp_path)
    assert store.claim_nonce(NONCE, int(time.time()) + 60, time.time()) == "replay_check_failed"


def test_memory_store_warns_at_start_up_with_several_workers(monkeypatch, caplog) -> None:
    """With WEB_CONCURRENCY > 1 (read by uvicorn, gunicorn, fastapi run) the per-process
    MemoryStore is called out once, at construction; a FileStore or one worker is silent."""
    caplog.set_level(logging.WARNING, "fastprof.profiling")
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    fastprof.Profiling(secret=SECRET)
    assert not caplog.records
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    fastprof.Profiling(secret=SECRET, store=FileStore("/nonexistent-never-created"))
    assert not caplog.records
    fastprof.Profiling(secret=SECRET)
    fastprof.Profiling(secret=SECRET, store=MemoryStore())
    assert len(caplog.records) == 2
    assert "3 workers" in caplog.records[0].getMessage()
    assert "FileStore" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["uvicorn", "main:app"], 1),
        (["uvicorn", "main:app", "--workers", "4"], 4),
        (["fastapi", "run", "--workers=2"], 2),
        (["gunicorn", "-w", "3", "-k", "uvicorn.workers.UvicornWorker", "main:app"], 3),
    ],
)
def test_worker_count_is_read_from_the_command_line(argv, expected) -> None:
    from fastprof._workers import worker_count

    assert worker_count(argv, {}) == expected
