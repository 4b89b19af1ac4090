"""Where profiles are kept: a :class:`ProfileStore` protocol and two implementations.

A stored profile is an opaque *document* (bytes; fastprof writes gzip-compressed
JSON holding the pyinstrument session and metadata) plus a
:class:`ProfileMeta`. Ids are always 32 lowercase hex characters; anything
else is refused before it reaches a dictionary or a file name.

Stores are called from fastprof's writer thread and from the viewer's worker
thread, never from the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol, runtime_checkable

from fastprof import _internal_errors
from fastprof._bounded import evict_oldest
from fastprof._options import check_int, check_seconds
from fastprof.profiling._tokens import NONCE_RE

__all__ = ["FileStore", "MemoryStore", "ProfileMeta", "ProfileStore", "valid_profile_id"]

_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_SUFFIX: Final = ".profile"
#: A profile file's metadata header is at most this long (it is a few hundred bytes).
_MAX_HEADER: Final = 64 * 1024
#: Subdirectory of a FileStore holding the nonces of used profile tokens.
_NONCE_DIR: Final = ".nonces"
#: A process prunes the nonces after this many claims (and when they are full).
_NONCE_PRUNE_EVERY: Final = 64
_NONCE_PRUNE_MIN_INTERVAL_S: Final = 1.0
#: A nonce file whose expiry was never written is kept this long (the longest
#: ``max_token_ttl_s`` Profiling accepts).
_NONCE_MAX_TTL_S: Final = 7 * 86400.0 + 1.0
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


def valid_profile_id(profile_id: object) -> bool:
    """``True`` for exactly 32 lowercase hex characters."""
    return isinstance(profile_id, str) and _ID_RE.fullmatch(profile_id) is not None


class ProfileMeta:
    """Small, serialisable facts about a stored profile."""

    __slots__ = (
        "created",
        "duration_s",
        "method",
        "profile_id",
        "route",
        "size",
        "trace_id",
        "trigger",
    )

    def __init__(
        self,
        profile_id: str,
        *,
        created: float,
        method: str = "",
        route: str = "",
        duration_s: float = 0.0,
        trace_id: str = "",
        trigger: str = "",
        size: int = 0,
    ) -> None:
        self.profile_id = profile_id
        self.created = created
        self.method = method
        self.route = route
        self.duration_s = duration_s
        self.trace_id = trace_id
        self.trigger = trigger
        self.size = size

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileMeta:
        return cls(
            str(data["profile_id"]),
            created=float(data.get("created", 0.0)),
            method=str(data.get("method", "")),
            route=str(data.get("route", "")),
            duration_s=float(data.get("duration_s", 0.0)),
            trace_id=str(data.get("trace_id", "")),
            trigger=str(data.get("trigger", "")),
            size=int(data.get("size", 0)),
        )


@runtime_checkable
class ProfileStore(Protocol):
    """Keeps profile documents by id. Implementations must be thread-safe.

    A store may also offer ``put_lazy(meta, encode, size_hint)`` (see
    :meth:`MemoryStore.put_lazy`): fastprof then hands it short profiles
    unencoded, and ``encode()`` makes the document when it is first fetched.

    And ``claim_nonce(nonce, exp, now) -> str | None`` (see
    :meth:`FileStore.claim_nonce`): profile tokens are then single-use across
    every process sharing the store. It is called on the event loop: keep it cheap.
    """

    def put(self, meta: ProfileMeta, document: bytes) -> None:
        """Store a document (may evict older ones). May raise ``OSError``."""

    def get(self, profile_id: str) -> bytes | None:
        """The document, or ``None`` if unknown, expired or the id is invalid."""

    def list(self, limit: int = 100) -> list[ProfileMeta]:
        """Newest first, at most ``limit``."""


class MemoryStore:
    """A ring buffer in memory (the default): per process, lost on restart.

    With several worker processes, each has its own: the viewer of one worker
    lists only that worker's profiles, and a profile token can be used once per
    worker. Share a :class:`FileStore` directory between them instead.

    Args:
        max_count: Profiles kept; the oldest is evicted first.
        max_bytes: Total size of the documents kept.
        ttl_s: Profiles older than this are dropped.
    """

    def __init__(
        self,
        *,
        max_count: int = 32,
        max_bytes: int = 64 * 1024 * 1024,
        ttl_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_caps(max_count, max_bytes, ttl_s)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        # profile id -> (meta, document or the function that makes it, bytes counted)
        self._items: OrderedDict[str, tuple[ProfileMeta, bytes | Callable[[], bytes], int]] = (
            OrderedDict()
        )
        self._bytes = 0
        self._lock = threading.Lock()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "put" in cls.__dict__ and "put_lazy" not in cls.__dict__:
            # A subclass that customises put() gets every document through it.
            setattr(cls, "put_lazy", None)  # noqa: B010

    def put(self, meta: ProfileMeta, document: bytes) -> None:
        if not valid_profile_id(meta.profile_id) or len(document) > self.max_bytes:
            return
        meta.size = len(document)
        self._insert(meta, document, len(document))

    def put_lazy(self, meta: ProfileMeta, encode: Callable[[], bytes], size_hint: int) -> None:
        """Keep a profile whose document is made by ``encode()`` on its first :meth:`get`.

        fastprof's profiler stores small profiles this way: a profile nobody fetches
        is never encoded, and no writer thread competes with the event loop for it.
        Until it is encoded it counts as ``size_hint`` bytes against ``max_bytes``.
        ``encode`` runs in the thread calling :meth:`get` (the viewer's worker thread).
        """
        if not valid_profile_id(meta.profile_id) or size_hint > self.max_bytes:
            return
        self._insert(meta, encode, size_hint)

    def _insert(self, meta: ProfileMeta, document: bytes | Callable[[], bytes], size: int) -> None:
        with self._lock:
            old = self._items.pop(meta.profile_id, None)
            if old is not None:
                self._bytes -= old[2]
            self._items[meta.profile_id] = (meta, document, size)
            self._bytes += size
            self._prune_locked()

    def _prune_locked(self) -> None:
        self._bytes = evict_oldest(
            self._items,
            self._bytes,
            max_count=self.max_count,
            max_bytes=self.max_bytes,
            deadline=self._clock() - self.ttl_s,
            measure=lambda entry: (entry[2], entry[0].created),
        )

    def get(self, profile_id: str) -> bytes | None:
        if not valid_profile_id(profile_id):
            return None
        with self._lock:
            self._prune_locked()
            item = self._items.get(profile_id)
        if item is None:
            return None
        meta, document, size = item
        if isinstance(document, bytes):
            return document
        try:
            data = document()
        except Exception as exc:
            _internal_errors.report("profile.encode", exc)
            with self._lock:
                if self._items.get(profile_id) is item:
                    del self._items[profile_id]
                    self._bytes -= size
            return None
        with self._lock:
            if self._items.get(profile_id) is item:
                meta.size = len(data)
                self._items[profile_id] = (meta, data, len(data))
                self._bytes += len(data) - size
                if len(data) > self.max_bytes:
                    del self._items[profile_id]
                    self._bytes -= len(data)
                self._prune_locked()
        return data

    def list(self, limit: int = 100) -> list[ProfileMeta]:
        with self._lock:
            self._prune_locked()
            metas = [meta for meta, _, _ in self._items.values()]
        return list(reversed(metas))[:limit]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class FileStore:
    """Profiles as files in a directory, shareable by several worker processes.

    One file per profile, named ``<id>.profile`` (id: 32 hex characters), written
    to a temporary file in the same directory and renamed into place
    (``os.replace``), so readers never see a partial file. The directory is
    created with mode 0700, files with 0600. After each write the directory is
    pruned: files older than ``ttl_s``, then the oldest beyond ``max_count`` or
    ``max_bytes``. Pruning by several processes at once is safe (a file another
    process already removed is skipped).

    It also keeps the nonces of used profile tokens (:meth:`claim_nonce`), in the
    subdirectory ``.nonces``: a token is single-use across every worker process
    that shares the directory (on one host: a local disk or tmpfs, not a network
    file system).

    Args:
        directory: Where to keep profiles (created if missing).
        max_count: Profiles kept.
        max_bytes: Total size of profile files kept; a larger single profile is
            not written.
        ttl_s: Age after which a profile is deleted (and no longer served).
        max_nonces: Used-token nonces kept until their token expires. When that
            many unexpired ones are kept, further tokens are refused
            (``replay_cache_full``) rather than risking a replay.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_count: int = 200,
        max_bytes: int = 256 * 1024 * 1024,
        ttl_s: float = 7 * 24 * 3600.0,
        max_nonces: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_caps(max_count, max_bytes, ttl_s)
        self.directory = os.fspath(directory)
        if not self.directory:
            raise ValueError("directory: must not be empty")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_nonces = check_int("max_nonces", max_nonces, 1, 10_000_000)
        self._clock = clock
        self._lock = threading.Lock()
        self._nonce_dir = os.path.join(self.directory, _NONCE_DIR)
        self._nonce_lock = threading.Lock()
        self._nonce_claims = 0  # claims since the last prune of the nonces
        self._nonces_full = False
        self._nonce_pruning = False
        self._nonce_pruned_at = 0.0

    # -- used-token nonces (shared single use) --------------------------------

    def claim_nonce(self, nonce: str, exp: int, now: float) -> str | None:
        """Claim a profile token's nonce for every process sharing this directory.

        Returns ``None`` when this call claimed it, else a refusal reason:
        ``"replayed"`` (already claimed, by any process), ``"replay_cache_full"``
        or ``"replay_check_failed"`` (the directory is not writable: fail closed).

        Called on the event loop by fastprof's token check, for tokens whose
        signature verified and that this process has not seen: one exclusive file
        creation (``O_CREAT | O_EXCL``, atomic across processes) and one ``utime``
        that dates the file at the token's expiry, tens of microseconds on a local
        disk. Expired nonces are deleted by a short-lived background thread, never
        on the loop.
        """
        if not NONCE_RE.fullmatch(nonce):
            return "malformed"
        if self._nonces_full:
            self._schedule_nonce_prune(now)
            return "replay_cache_full"
        path = os.path.join(self._nonce_dir, nonce)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | _O_NOFOLLOW
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                os.makedirs(self._nonce_dir, mode=0o700, exist_ok=True)
                fd = os.open(path, flags, 0o600)
        except FileExistsError:
            return "replayed"
        except OSError as exc:
            _internal_errors.report("profile.nonce_claim", exc)
            return "replay_check_failed"
        try:
            os.utime(fd, (exp, exp))  # the mtime says when the nonce may be forgotten
        except OSError as exc:  # the file is kept for the longest token lifetime instead
            _internal_errors.report("profile.nonce_claim", exc)
        finally:
            os.close(fd)
        with self._nonce_lock:
            self._nonce_claims += 1
            due = self._nonce_claims >= _NONCE_PRUNE_EVERY
        if due:
            self._schedule_nonce_prune(now)
        return None

    def _schedule_nonce_prune(self, now: float) -> None:
        with self._nonce_lock:
            if self._nonce_pruning or now - self._nonce_pruned_at < _NONCE_PRUNE_MIN_INTERVAL_S:
                return
            self._nonce_pruning = True
            self._nonce_claims = 0
            self._nonce_pruned_at = now
        try:
            threading.Thread(
                target=self._prune_nonces_job, name="fastprof-nonce-prune", daemon=True
            ).start()
        except Exception as exc:  # pragma: no cover - no threads left
            with self._nonce_lock:
                self._nonce_pruning = False
            _internal_errors.report("profile.nonce_prune", exc)

    def _prune_nonces_job(self) -> None:
        try:
            self.prune_nonces()
        except Exception as exc:
            _internal_errors.report("profile.nonce_prune", exc)
        finally:
            with self._nonce_lock:
                self._nonce_pruning = False

    def prune_nonces(self) -> int:
        """Delete the nonces of expired tokens; return how many unexpired ones are kept.

        Not for the event loop (it lists the directory). Safe with several
        processes pruning at once.
        """
        now = self._clock()
        kept = 0
        try:
            entries = os.scandir(self._nonce_dir)
        except FileNotFoundError:
            self._nonces_full = False
            return 0
        with entries:
            for entry in entries:
                if not NONCE_RE.fullmatch(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                # ``utime`` set the mtime to the token's expiry, after the file's
                # creation; a file it never dated is kept for the longest lifetime.
                expiry = (
                    st.st_mtime if st.st_mtime > st.st_ctime else st.st_ctime + _NONCE_MAX_TTL_S
                )
                if expiry < now:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                else:
                    kept += 1
        self._nonces_full = kept >= self.max_nonces
        return kept

    def _ensure_dir(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def _path(self, profile_id: str) -> str:
        return os.path.join(self.directory, profile_id + _SUFFIX)

    def put(self, meta: ProfileMeta, document: bytes) -> None:
        if not valid_profile_id(meta.profile_id):
            return
        header = json.dumps(meta.to_dict(), separators=(",", ":")).encode("utf-8")
        if len(header) > _MAX_HEADER:
            raise ValueError(f"profile metadata of {len(header)} bytes (at most {_MAX_HEADER})")
        payload = len(header).to_bytes(4, "big") + header + document
        if len(payload) > self.max_bytes:
            return
        meta.size = len(payload)
        self._ensure_dir()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self._path(meta.profile_id))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.prune()

    def _entries(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, id)`` of every profile file, oldest first."""
        out: list[tuple[float, int, str]] = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(_SUFFIX):
                continue
            profile_id = name[: -len(_SUFFIX)]
            if not valid_profile_id(profile_id):
                continue
            try:
                st = os.stat(os.path.join(self.directory, name))
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, profile_id))
        out.sort()
        return out

    def prune(self) -> None:
        """Apply the TTL and the count/size caps now."""
        with self._lock:
            entries = self._entries()
            deadline = self._clock() - self.ttl_s
            total = sum(size for _, size, _ in entries)
            count = len(entries)
            for mtime, size, profile_id in entries:
                if mtime >= deadline and count <= self.max_count and total <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(profile_id))
                count -= 1
                total -= size

    def _read(self, profile_id: str, *, document: bool = True) -> tuple[ProfileMeta, bytes] | None:
        """The profile's metadata and, if ``document``, its document (else ``b""``).

        Without the document only the file's header is read: listing a directory
        of large profiles reads a few hundred bytes per profile.
        """
        path = self._path(profile_id)
        try:
            st = os.stat(path)
            if st.st_mtime < self._clock() - self.ttl_s or st.st_size > self.max_bytes:
                return None
            with open(path, "rb") as f:
                head = f.read(4)
                header_len = int.from_bytes(head, "big")
                if len(head) < 4 or header_len > _MAX_HEADER:
                    return None
                header = f.read(header_len)
                body = f.read(self.max_bytes + 1) if document else b""
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EISDIR, errno.ENOTDIR):
                return None
            raise
        try:
            meta = ProfileMeta.from_dict(json.loads(header))
        except (ValueError, KeyError, TypeError):
            return None
        if meta.profile_id != profile_id:
            return None
        meta.size = 4 + len(header) + len(body) if document else st.st_size
        return meta, body

    def get(self, profile_id: str) -> bytes | None:
        if not valid_profile_id(profile_id):
            return None
        item = self._read(profile_id)
        return item[1] if item is not None else None

    def list(self, limit: int = 100) -> list[ProfileMeta]:
        out: list[ProfileMeta] = []
        deadline = self._clock() - self.ttl_s
        for mtime, _, profile_id in reversed(self._entries()):
            if len(out) >= limit:
                break
            if mtime < deadline:
                continue
            item = self._read(profile_id, document=False)
            if item is not None:
                out.append(item[0])
        return out


def _check_caps(max_count: int, max_bytes: int, ttl_s: float) -> None:
    check_int("max_count", max_count, 1, 1_000_000)
    check_int("max_bytes", max_bytes, 1024, 1 << 40)
    check_seconds("ttl_s", ttl_s, 0.001, 366 * 24 * 3600.0)
