"""Profile stores: caps, TTL, safe names, permissions, several processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from typing import Any

import pytest

import fastprof
from fastprof.profiling import FileStore, MemoryStore, ProfileMeta, ProfileStore, mint_token
from fastprof.profiling.stores import valid_profile_id


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pid(i: int) -> str:
    return f"{i:032x}"


def meta(i: int, created: float = 1_000_000.0) -> ProfileMeta:
    return ProfileMeta(pid(i), created=created, method="GET", route="/r")


def test_both_stores_satisfy_the_protocol(tmp_path) -> None:
    assert isinstance(MemoryStore(), ProfileStore)
    assert isinstance(FileStore(tmp_path), ProfileStore)


def test_memory_store_count_cap_evicts_oldest() -> None:
    store = MemoryStore(max_count=3, clock=Clock())
    for i in range(5):
        store.put(meta(i), b"x" * 10)
    assert [m.profile_id for m in store.list()] == [pid(4), pid(3), pid(2)]
    assert store.get(pid(0)) is None
    assert store.get(pid(4)) == b"x" * 10


def test_memory_store_byte_cap() -> None:
    store = MemoryStore(max_count=100, max_bytes=2048, clock=Clock())
    for i in range(5):
        store.put(meta(i), b"y" * 1000)
    assert len(store) == 2
    store.put(meta(9), b"z" * 4096)  # larger than the cap: not stored
    assert store.get(pid(9)) is None


def test_memory_store_ttl() -> None:
    clock = Clock()
    store = MemoryStore(ttl_s=60, clock=clock)
    store.put(meta(1, created=clock.now), b"a")
    clock.now += 61
    assert store.get(pid(1)) is None
    assert store.list() == []


@pytest.mark.parametrize(
    "bad", ["", "../" + "a" * 29, "A" * 32, "a" * 31, "a" * 33, "g" * 32, None]
)
def test_invalid_ids_are_refused(tmp_path, bad: object) -> None:
    assert not valid_profile_id(bad)
    store_dir = tmp_path / "store"
    file_store = FileStore(store_dir, clock=Clock())
    file_store.put(meta(1), b"kept")
    # Readable profile files a path trick could reach, if ids were not checked
    # before use (each header names the bad id, so only the id check refuses it).
    _plant(tmp_path / ("a" * 29 + ".profile"), "../" + "a" * 29)
    for name in ("A" * 32, "a" * 31, "a" * 33, "g" * 32):
        _plant(store_dir / (name + ".profile"), name)
    memory_store = MemoryStore(clock=Clock())
    memory_store.put(meta(1), b"kept")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(store_dir))
    for store in (memory_store, file_store):
        assert store.get(pid(1)) == b"kept"  # the store does serve valid ids
        assert store.get(bad) is None  # type: ignore[arg-type]
        meta_bad = ProfileMeta(bad, created=1_000_000.0)  # type: ignore[arg-type]
        store.put(meta_bad, b"refused")
        assert store.get(bad) is None  # type: ignore[arg-type]
        assert [m.profile_id for m in store.list()] == [pid(1)]
    # Nothing was written for the bad id, inside the directory or outside it.
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(store_dir))) == before


def _plant(path: Any, profile_id: str) -> None:
    header = json.dumps({"profile_id": profile_id, "created": 1_000_000.0}).encode()
    path.write_bytes(len(header).to_bytes(4, "big") + header + b"planted")


def test_file_store_roundtrip_permissions_and_names(tmp_path) -> None:
    directory = tmp_path / "profiles"
    store = FileStore(directory)
    store.put(meta(1), b"document")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    (name,) = os.listdir(directory)
    assert name == pid(1) + ".profile"
    assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600
    assert store.get(pid(1)) == b"document"
    (listed,) = store.list()
    assert listed.profile_id == pid(1) and listed.route == "/r"


def test_file_store_list_reads_headers_not_documents(tmp_path, monkeypatch) -> None:
    """Listing large profiles reads each file's small header, not its document."""
    from fastprof.profiling import stores

    store = FileStore(tmp_path)
    document = os.urandom(256 * 1024)
    for i in range(5):
        store.put(meta(i), document)
    read_bytes = [0]
    real_open = open

    class CountingFile:
        def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
            self._f = f

        def read(self, n: int = -1) -> bytes:
            data = self._f.read(n)
            read_bytes[0] += len(data)
            return data

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()

    monkeypatch.setattr(stores, "open", lambda *a: CountingFile(real_open(*a)), raising=False)
    listed = store.list()
    assert sorted(m.profile_id for m in listed) == sorted(pid(i) for i in range(5))
    assert all(m.size == os.path.getsize(tmp_path / f"{m.profile_id}.profile") for m in listed)
    assert 0 < read_bytes[0] < 5 * 1024  # headers only
    assert store.get(pid(3)) == document  # a fetch still reads the whole document
    assert read_bytes[0] > 256 * 1024


def test_file_store_refuses_oversized_headers(tmp_path) -> None:
    """Metadata over 64 KiB is neither written nor read (a file could claim any length)."""
    store = FileStore(tmp_path)
    big = ProfileMeta(pid(7), created=1_000_000.0, route="/" + "r" * 70_000)
    with pytest.raises(ValueError, match="metadata"):
        store.put(big, b"document")
    assert os.listdir(tmp_path) == []
    header = json.dumps(big.to_dict()).encode()
    (tmp_path / f"{pid(7)}.profile").write_bytes(len(header).to_bytes(4, "big") + header + b"doc")
    assert store.get(pid(7)) is None and store.list() == []


def test_file_store_count_and_size_caps(tmp_path) -> None:
    store = FileStore(tmp_path, max_count=3, max_bytes=100 * 1024)
    base = os.stat(tmp_path).st_mtime - 100
    for i in range(6):
        store.put(meta(i), b"p" * 100)
        os.utime(tmp_path / f"{pid(i)}.profile", (base + i, base + i))
    store.prune()
    assert sorted(os.listdir(tmp_path)) == [f"{pid(i)}.profile" for i in (3, 4, 5)]
    big = FileStore(tmp_path / "big", max_count=100, max_bytes=5000)
    for i in range(5):
        big.put(meta(i), b"q" * 2000)
    total = sum(os.path.getsize(tmp_path / "big" / n) for n in os.listdir(tmp_path / "big"))
    assert total <= 5000
    big.put(meta(99), b"r" * 10_000)  # alone larger than the cap
    assert big.get(pid(99)) is None


def test_file_store_ttl(tmp_path) -> None:
    clock = Clock(now=os.stat(tmp_path).st_mtime)
    store = FileStore(tmp_path, ttl_s=60, clock=clock)
    store.put(meta(1), b"old")
    path = tmp_path / f"{pid(1)}.profile"
    os.utime(path, (clock.now - 120, clock.now - 120))
    assert store.get(pid(1)) is None  # expired: not served
    assert store.list() == []
    store.put(meta(2), b"new")
    os.utime(tmp_path / f"{pid(2)}.profile", (clock.now, clock.now))
    store.prune()
    assert not path.exists()  # expired: deleted on prune
    assert store.get(pid(2)) == b"new"


def test_file_store_ignores_foreign_and_temp_files(tmp_path) -> None:
    (tmp_path / ".tmp-abc").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_bytes(b"hi")
    store = FileStore(tmp_path, max_count=1)
    store.put(meta(1), b"one")
    store.put(meta(2), b"two")
    assert (tmp_path / "notes.txt").exists() and (tmp_path / ".tmp-abc").exists()
    assert [m.profile_id for m in store.list()] == [pid(2)]


def _writer_process(directory: str, offset: int) -> None:
    store = FileStore(directory, max_count=10)
    for i in range(25):
        store.put(meta(offset + i), os.urandom(64))


def test_file_store_shared_by_several_processes(tmp_path) -> None:
    """Writers/pruners in separate processes keep the caps and never corrupt a file."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer_process, args=(str(tmp_path), k * 1000)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = FileStore(tmp_path, max_count=10)
    store.prune()
    names = [n for n in os.listdir(tmp_path) if n.endswith(".profile")]
    assert 1 <= len(names) <= 10
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    for m in store.list():
        document = store.get(m.profile_id)
        assert document is not None and len(document) == 64


def test_store_config_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="max_count"):
        MemoryStore(max_count=0)
    with pytest.raises(ValueError, match="ttl_s"):
        FileStore(tmp_path, ttl_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        FileStore(tmp_path, max_bytes=10)


def test_memory_store_lazy_documents_are_made_once_on_first_get() -> None:
    calls: list[int] = []

    def encode() -> bytes:
        calls.append(1)
        return b"document-1"

    store = MemoryStore(max_count=4, max_bytes=10_000, clock=Clock())
    store.put_lazy(meta(1), encode, size_hint=500)
    assert calls == [] and len(store) == 1
    assert [m.profile_id for m in store.list()] == [pid(1)]
    assert store.get(pid(1)) == b"document-1"
    assert store.get(pid(1)) == b"document-1"
    assert calls == [1]  # encoded once, then kept as bytes
    assert store.list()[0].size == len(b"document-1")


def test_memory_store_lazy_size_hint_counts_against_the_byte_cap() -> None:
    store = MemoryStore(max_count=10, max_bytes=2048, clock=Clock())
    store.put_lazy(meta(1), lambda: b"a", size_hint=1200)
    store.put_lazy(meta(2), lambda: b"b", size_hint=1200)  # 2400 > 2048: the oldest goes
    assert store.get(pid(1)) is None
    assert store.get(pid(2)) == b"b"
    store.put_lazy(meta(3), lambda: b"c", size_hint=5000)  # larger than the cap: refused
    assert store.get(pid(3)) is None


def test_memory_store_lazy_encode_failure_drops_the_profile() -> None:
    from fastprof import _internal_errors

    def broken() -> bytes:
        raise RuntimeError("cannot encode")

    store = MemoryStore(clock=Clock())
    before = _internal_errors.counts().get("profile.encode", 0)
    store.put_lazy(meta(1), broken, size_hint=100)
    assert store.get(pid(1)) is None
    assert len(store) == 0
    assert _internal_errors.counts()["profile.encode"] == before + 1


def test_memory_store_lazy_document_over_the_cap_is_served_once_then_dropped() -> None:
    store = MemoryStore(max_bytes=1024, clock=Clock())
    store.put_lazy(meta(1), lambda: b"x" * 5000, size_hint=10)
    assert store.get(pid(1)) == b"x" * 5000
    assert store.get(pid(1)) is None and len(store) == 0


@pytest.mark.anyio
async def test_memory_store_subclass_customising_put_gets_every_document_through_it(spans) -> None:
    """A subclass overriding put() receives every profile through it, short ones included."""
    from tests.profiling._profiling_support import SECRET, client_for, make_app

    puts: list[str] = []

    class Audited(MemoryStore):
        def put(self, meta: ProfileMeta, document: bytes) -> None:
            puts.append(meta.profile_id)
            super().put(meta, document)

    class Plain(MemoryStore):
        pass

    assert Audited().put_lazy is None  # fastprof then uses put() (through its writer)
    assert Plain().put_lazy is not None and MemoryStore().put_lazy is not None
    profiling = fastprof.Profiling(secret=SECRET, store=Audited())
    async with client_for(make_app(profiling, spans)) as client:
        response = await client.get("/items/1", headers={"X-Fastprof-Profile": mint_token(SECRET)})
    assert profiling.flush(10)
    assert puts == [response.headers["x-fastprof-profile-id"]]
