"""Where the dashboard keeps recent requests: in memory (default) or in a SQLite file.

Both stores are bounded by count, bytes and age, are thread-safe, and are written
only by the dashboard's writer thread (:meth:`RequestStore.add`); the pages read
them from a worker thread. Neither is ever called on the event loop.

:class:`SQLiteStore` is one file per host: every worker process of the host
writes its requests (and, passed to ``fastprof.Profiling(store=...)``, its
profiles) into it, so any worker's dashboard shows every worker's data.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

from fastprof._bounded import evict_oldest
from fastprof._options import check_int, check_seconds
from fastprof.dashboard._records import RequestRecord, valid_request_key
from fastprof.profiling.stores import ProfileMeta, valid_profile_id

__all__ = ["MemoryRequestStore", "RequestFilter", "RequestStore", "SQLiteStore", "default_path"]

#: Rows the list page shows at most.
MAX_LIST: Final = 500
#: Requests of one route the route page reads at most (newest first).
MAX_ROUTE_SAMPLE: Final = 5000
_COMPRESS_ABOVE: Final = 1024


class RequestFilter:
    """What the requests page asks for."""

    __slots__ = ("flags", "limit", "min_duration_s", "route", "status")

    def __init__(
        self,
        *,
        route: str | None = None,
        min_duration_s: float = 0.0,
        status: int | None = None,
        flags: int = 0,
        limit: int = 200,
    ) -> None:
        self.route = route
        self.min_duration_s = min_duration_s
        self.status = status
        self.flags = flags
        self.limit = max(1, min(limit, MAX_LIST))

    def matches(self, record: RequestRecord) -> bool:
        if self.route is not None and record.route != self.route:
            return False
        if record.duration_s < self.min_duration_s:
            return False
        if self.status is not None and not _status_matches(record.status, self.status):
            return False
        return (record.flags & self.flags) == self.flags


def _status_matches(status: int, wanted: int) -> bool:
    """``wanted`` 1-5 matches a class (``5`` is every 5xx); otherwise the exact status."""
    if 1 <= wanted <= 5:
        return status // 100 == wanted
    return status == wanted


@runtime_checkable
class RequestStore(Protocol):
    """Keeps recent requests. Implementations must be thread-safe and bounded."""

    def add(self, records: list[RequestRecord], late: list[tuple[str, list[Any]]]) -> None:
        """Store a batch of requests, and spans that ended after their request's span."""

    def recent(self, query: RequestFilter) -> list[RequestRecord]:
        """Newest first, without their spans."""

    def get(self, key: str) -> RequestRecord | None:
        """One request with its spans, or ``None``."""

    def routes(self) -> list[tuple[str, int]]:
        """Every route with its number of requests kept."""

    def route_sample(
        self, route: str
    ) -> tuple[list[float], list[list[Any]], list[tuple[str, float]]]:
        """A route's durations, dependency timings and ``(profile id, request duration)``
        of its profiled requests (newest first)."""


def _size(record: RequestRecord, spans: bytes | str, deps: str) -> int:
    return 256 + len(spans) + len(deps) + len(record.route) + len(record.path)


class MemoryRequestStore:
    """The recent requests of this process, in memory (the default).

    Args:
        max_count: Requests kept; the oldest go first.
        max_bytes: Size of the kept requests (their spans as JSON, about).
        ttl_s: Requests older than this are dropped.
    """

    def __init__(
        self,
        *,
        max_count: int = 2000,
        max_bytes: int = 32 * 1024 * 1024,
        ttl_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_caps(max_count, max_bytes, ttl_s)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, RequestRecord] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, records: list[RequestRecord], late: list[tuple[str, list[Any]]]) -> None:
        for record in records:
            record.size = _size(record, record.spans_json(), record.deps_json())
        with self._lock:
            for record in records:
                old = self._items.pop(record.key, None)
                if old is not None:
                    self._bytes -= old.size
                self._items[record.key] = record
                self._bytes += record.size
            for key, entry in late:
                found = self._items.get(key)
                if found is not None:
                    self._bytes -= found.size
                    found.add_late_span(entry)
                    found.size = _size(found, found.spans_json(), found.deps_json())
                    self._bytes += found.size
            self._prune_locked()

    def _prune_locked(self) -> None:
        self._bytes = evict_oldest(
            self._items,
            self._bytes,
            max_count=self.max_count,
            max_bytes=self.max_bytes,
            deadline=self._clock() - self.ttl_s,
            measure=lambda record: (record.size, record.start),
        )

    def recent(self, query: RequestFilter) -> list[RequestRecord]:
        with self._lock:
            self._prune_locked()
            records = list(self._items.values())
        out: list[RequestRecord] = []
        for record in reversed(records):
            if query.matches(record):
                out.append(record)
                if len(out) >= query.limit:
                    break
        return out

    def get(self, key: str) -> RequestRecord | None:
        if not valid_request_key(key):
            return None
        with self._lock:
            return self._items.get(key)

    def routes(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        with self._lock:
            for record in self._items.values():
                counts[record.route] = counts.get(record.route, 0) + 1
        return sorted(counts.items())

    def route_sample(
        self, route: str
    ) -> tuple[list[float], list[list[Any]], list[tuple[str, float]]]:
        with self._lock:
            records = [r for r in reversed(self._items.values()) if r.route == route]
        records = records[:MAX_ROUTE_SAMPLE]
        durations = [r.duration_s for r in records]
        deps = [dep for r in records for dep in r.deps]
        profiles = [(r.profile_id, r.duration_s) for r in records if r.profile_id]
        return durations, deps, profiles

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes


def default_path(directory: str | os.PathLike[str] | None = None) -> str:
    """``<directory>/fastprof-dashboard-<hostname>.sqlite3``: one file per host."""
    import tempfile

    base = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_.")[:64] or "host"
    return os.path.join(base, f"fastprof-dashboard-{host}.sqlite3")


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    trace_id TEXT NOT NULL,
    start REAL NOT NULL,
    duration REAL NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    error_type TEXT NOT NULL,
    flags INTEGER NOT NULL,
    profile_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    spans BLOB NOT NULL,
    deps TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_start ON requests(start);
CREATE INDEX IF NOT EXISTS requests_route ON requests(route, seq);
CREATE TABLE IF NOT EXISTS profiles (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    meta TEXT NOT NULL,
    document BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES ('requests', 0, 0), ('profiles', 0, 0);
CREATE TRIGGER IF NOT EXISTS requests_in AFTER INSERT ON requests BEGIN
    UPDATE totals SET count = count + 1, bytes = bytes + NEW.size WHERE name = 'requests';
END;
CREATE TRIGGER IF NOT EXISTS requests_out AFTER DELETE ON requests BEGIN
    UPDATE totals SET count = count - 1, bytes = bytes - OLD.size WHERE name = 'requests';
END;
CREATE TRIGGER IF NOT EXISTS requests_up AFTER UPDATE OF size ON requests BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size WHERE name = 'requests';
END;
CREATE TRIGGER IF NOT EXISTS profiles_in AFTER INSERT ON profiles BEGIN
    UPDATE totals SET count = count + 1, bytes = bytes + NEW.size WHERE name = 'profiles';
END;
CREATE TRIGGER IF NOT EXISTS profiles_out AFTER DELETE ON profiles BEGIN
    UPDATE totals SET count = count - 1, bytes = bytes - OLD.size WHERE name = 'profiles';
END;
"""

_SUMMARY: Final = (
    "key, trace_id, start, duration, method, route, path, status, error_type, flags, "
    "profile_id, request_id, pid"
)


def _pack(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > _COMPRESS_ABOVE:
        return b"z" + zlib.compress(raw, 1)
    return b"j" + raw


def _unpack(blob: bytes) -> Any:
    raw = zlib.decompress(blob[1:]) if blob[:1] == b"z" else blob[1:]
    return json.loads(raw)


def _summary(row: tuple[Any, ...]) -> RequestRecord:
    return RequestRecord(
        row[0],
        trace_id=row[1],
        start=row[2],
        duration_s=row[3],
        method=row[4],
        route=row[5],
        path=row[6],
        status=row[7],
        error_type=row[8],
        flags=row[9],
        profile_id=row[10],
        request_id=row[11],
        pid=row[12],
        spans=[],
        deps=[],
    )


class SQLiteStore:
    """Recent requests and profiles of every worker process of a host, in one SQLite file.

    The file is in WAL mode (readers never wait for the writer), created with mode
    0600. Each process writes its own requests from the dashboard's writer thread, in
    one transaction per batch, then prunes: requests older than ``ttl_s``, then the
    oldest beyond ``max_count`` or ``max_bytes``. Pass the same object to
    ``fastprof.Profiling(store=...)`` and the profiles go to the same file (bounded by
    ``max_profiles`` and ``max_profile_bytes``, written by the profile writer thread).

    Args:
        path: The database file; use one per host (see :func:`default_path`), not a
            network file system.
        max_count: Requests kept (all processes together).
        max_bytes: Size of the kept requests' rows (spans compressed).
        ttl_s: Requests and profiles older than this are deleted.
        max_profiles: Profiles kept.
        max_profile_bytes: Size of the kept profile documents.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_count: int = 20_000,
        max_bytes: int = 128 * 1024 * 1024,
        ttl_s: float = 24 * 3600.0,
        max_profiles: int = 200,
        max_profile_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_caps(max_count, max_bytes, ttl_s)
        check_int("max_profiles", max_profiles, 1, 1_000_000)
        check_int("max_profile_bytes", max_profile_bytes, 1024, 1 << 40)
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:":
            raise ValueError("path: expected a file path (one SQLite file per host)")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_profiles = max_profiles
        self.max_profile_bytes = max_profile_bytes
        self._clock = clock
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_pid = 0

    # -- connections ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and getattr(local, "pid", 0) == os.getpid():
            return conn
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not os.path.exists(self.path):
            # Create it 0600 before SQLite does (SQLite uses the umask).
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA journal_size_limit = 8388608")
        # INSERT OR REPLACE then fires the delete triggers that keep the totals right.
        conn.execute("PRAGMA recursive_triggers = ON")
        with self._schema_lock:
            if self._schema_pid != os.getpid():
                conn.executescript(_SCHEMA)
                self._schema_pid = os.getpid()
        local.conn = conn
        local.pid = os.getpid()
        return conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            conn.close()

    # -- requests -----------------------------------------------------------------

    def add(self, records: list[RequestRecord], late: list[tuple[str, list[Any]]]) -> None:
        rows = []
        for record in records:
            spans = _pack(record.spans_json())
            deps = record.deps_json()
            record.size = _size(record, spans, deps)
            rows.append(
                (
                    record.key,
                    record.trace_id,
                    record.start,
                    record.duration_s,
                    record.method,
                    record.route,
                    record.path,
                    record.status,
                    record.error_type,
                    record.flags,
                    record.profile_id,
                    record.request_id,
                    record.pid,
                    spans,
                    deps,
                    record.size,
                )
            )
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO requests (key, trace_id, start, duration, method, "
                "route, path, status, error_type, flags, profile_id, request_id, pid, spans, "
                "deps, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            for key, entry in late:
                self._add_late(conn, key, entry)
            self._prune(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _add_late(self, conn: sqlite3.Connection, key: str, entry: list[Any]) -> None:
        row = conn.execute(
            f"SELECT {_SUMMARY}, spans, deps FROM requests WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return
        record = _summary(row)
        body = _unpack(row[13])
        record.spans = body["spans"]
        record.spans_dropped = body.get("dropped", 0)
        record.deps = json.loads(row[14])
        record.add_late_span(entry)
        spans = _pack(record.spans_json())
        deps = record.deps_json()
        conn.execute(
            "UPDATE requests SET spans = ?, deps = ?, flags = ?, size = ? WHERE key = ?",
            (spans, deps, record.flags, _size(record, spans, deps), key),
        )

    def _prune(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM requests WHERE start < ?", (self._clock() - self.ttl_s,))
        count, size = conn.execute(
            "SELECT count, bytes FROM totals WHERE name = 'requests'"
        ).fetchone()
        if count > self.max_count:
            conn.execute(
                "DELETE FROM requests WHERE seq IN "
                "(SELECT seq FROM requests ORDER BY seq LIMIT ?)",
                (count - self.max_count,),
            )
            count, size = conn.execute(
                "SELECT count, bytes FROM totals WHERE name = 'requests'"
            ).fetchone()
        while size > self.max_bytes and count > 0:
            # Delete the oldest in chunks of about the excess.
            average = max(size // count, 1)
            chunk = max(1, min(count, (size - self.max_bytes) // average + 1))
            conn.execute(
                "DELETE FROM requests WHERE seq IN "
                "(SELECT seq FROM requests ORDER BY seq LIMIT ?)",
                (chunk,),
            )
            count, size = conn.execute(
                "SELECT count, bytes FROM totals WHERE name = 'requests'"
            ).fetchone()

    def recent(self, query: RequestFilter) -> list[RequestRecord]:
        clauses = ["start >= ?"]
        params: list[Any] = [self._clock() - self.ttl_s]
        if query.route is not None:
            clauses.append("route = ?")
            params.append(query.route)
        if query.min_duration_s > 0:
            clauses.append("duration >= ?")
            params.append(query.min_duration_s)
        if query.status is not None:
            if 1 <= query.status <= 5:
                clauses.append("status >= ? AND status < ?")
                params += [query.status * 100, query.status * 100 + 100]
            else:
                clauses.append("status = ?")
                params.append(query.status)
        if query.flags:
            clauses.append("(flags & ?) = ?")
            params += [query.flags, query.flags]
        params.append(query.limit)
        rows = (
            self._connect()
            .execute(
                f"SELECT {_SUMMARY} FROM requests WHERE {' AND '.join(clauses)} "
                "ORDER BY seq DESC LIMIT ?",
                params,
            )
            .fetchall()
        )
        return [_summary(row) for row in rows]

    def get(self, key: str) -> RequestRecord | None:
        if not valid_request_key(key):
            return None
        row = (
            self._connect()
            .execute(
                f"SELECT {_SUMMARY}, spans, deps FROM requests WHERE key = ? AND start >= ?",
                (key, self._clock() - self.ttl_s),
            )
            .fetchone()
        )
        if row is None:
            return None
        record = _summary(row)
        body = _unpack(row[13])
        record.spans = body["spans"]
        record.spans_dropped = body.get("dropped", 0)
        record.deps = json.loads(row[14])
        return record

    def routes(self) -> list[tuple[str, int]]:
        rows = (
            self._connect()
            .execute("SELECT route, count(*) FROM requests GROUP BY route ORDER BY route")
            .fetchall()
        )
        return [(route, count) for route, count in rows]

    def route_sample(
        self, route: str
    ) -> tuple[list[float], list[list[Any]], list[tuple[str, float]]]:
        rows = (
            self._connect()
            .execute(
                "SELECT duration, deps, profile_id FROM requests WHERE route = ? "
                "ORDER BY seq DESC LIMIT ?",
                (route, MAX_ROUTE_SAMPLE),
            )
            .fetchall()
        )
        durations = [row[0] for row in rows]
        deps = [dep for row in rows if row[1] != "[]" for dep in json.loads(row[1])]
        profiles = [(row[2], row[0]) for row in rows if row[2]]
        return durations, deps, profiles

    def totals(self) -> dict[str, tuple[int, int]]:
        """``{"requests": (count, bytes), "profiles": (count, bytes)}``."""
        rows = self._connect().execute("SELECT name, count, bytes FROM totals").fetchall()
        return {name: (count, size) for name, count, size in rows}

    def __len__(self) -> int:
        return self.totals()["requests"][0]

    # -- profiles (a fastprof.profiling.ProfileStore) ----------------------------------

    def put(self, meta: ProfileMeta, document: bytes) -> None:
        """Store a profile (from the profile writer thread)."""
        if not valid_profile_id(meta.profile_id) or len(document) > self.max_profile_bytes:
            return
        meta.size = len(document)
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT OR REPLACE INTO profiles (id, created, meta, document, size) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    meta.profile_id,
                    meta.created,
                    json.dumps(meta.to_dict(), separators=(",", ":")),
                    document,
                    len(document),
                ),
            )
            conn.execute("DELETE FROM profiles WHERE created < ?", (self._clock() - self.ttl_s,))
            while True:
                count, size = conn.execute(
                    "SELECT count, bytes FROM totals WHERE name = 'profiles'"
                ).fetchone()
                if count <= self.max_profiles and size <= self.max_profile_bytes:
                    break
                conn.execute(
                    "DELETE FROM profiles WHERE seq = (SELECT min(seq) FROM profiles)"
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def get_profile(self, profile_id: str) -> bytes | None:
        """The profile document (the :class:`~fastprof.profiling.ProfileStore` ``get``)."""
        if not valid_profile_id(profile_id):
            return None
        row = (
            self._connect()
            .execute(
                "SELECT document FROM profiles WHERE id = ? AND created >= ?",
                (profile_id, self._clock() - self.ttl_s),
            )
            .fetchone()
        )
        return bytes(row[0]) if row is not None else None

    def list_profiles(self, limit: int = 100) -> list[ProfileMeta]:
        rows = (
            self._connect()
            .execute(
                "SELECT meta, size FROM profiles WHERE created >= ? ORDER BY seq DESC LIMIT ?",
                (self._clock() - self.ttl_s, limit),
            )
            .fetchall()
        )
        out = []
        for meta_json, size in rows:
            meta = ProfileMeta.from_dict(json.loads(meta_json))
            meta.size = size
            out.append(meta)
        return out

    def profiles(self) -> _SQLiteProfiles:
        """This file as a :class:`~fastprof.profiling.ProfileStore` for ``Profiling(store=...)``."""
        return _SQLiteProfiles(self)


class _SQLiteProfiles:
    """The profiles half of a :class:`SQLiteStore`, with ProfileStore's method names."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def put(self, meta: ProfileMeta, document: bytes) -> None:
        self.store.put(meta, document)

    def get(self, profile_id: str) -> bytes | None:
        return self.store.get_profile(profile_id)

    def list(self, limit: int = 100) -> list[ProfileMeta]:
        return self.store.list_profiles(limit)


def _check_caps(max_count: int, max_bytes: int, ttl_s: float) -> None:
    check_int("max_count", max_count, 1, 10_000_000)
    check_int("max_bytes", max_bytes, 64 * 1024, 1 << 40)
    check_seconds("ttl_s", ttl_s, 0.001, 366 * 24 * 3600.0)
