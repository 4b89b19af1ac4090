"""Signed, expiring, single-use profile tokens.

Format (URL-safe, ASCII)::

    v1.<exp>.<nonce>.<scope>.<sig>

* ``exp``: expiry, integer Unix seconds;
* ``nonce``: 16 random bytes, base64url without padding (22 characters);
* ``scope``: base64url (no padding) of ``METHOD route`` (either part may be
  empty; the whole field is empty for an unscoped token);
* ``sig``: base64url HMAC-SHA256 over ``v1.<exp>.<nonce>.<scope>`` (43 characters).

Verification does the cheap checks first (length, shape, expiry) and only then
computes HMACs, comparing with :func:`hmac.compare_digest`. Every secret of the
configured list verifies; the first one signs (key rotation).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MIN_SECRET_BYTES",
    "NONCE_RE",
    "NonceClaim",
    "ReplayCache",
    "TokenClaims",
    "TokenVerifier",
    "mint_token",
    "normalize_secrets",
    "viewer_token",
]

MIN_SECRET_BYTES: Final = 32
MAX_TOKEN_LENGTH: Final = 512
_VERSION: Final = "v1"
_SIG_LENGTH: Final = 43  # base64url(32 bytes) without padding
NONCE_RE: Final = re.compile(r"[A-Za-z0-9_-]{22}")
_B64_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_VIEWER_LABEL: Final = b"fastprof viewer token v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def normalize_secrets(
    secret: str | bytes | Sequence[str | bytes], option: str = "secret"
) -> tuple[bytes, ...]:
    """Validate secrets (each at least :data:`MIN_SECRET_BYTES` bytes); first one signs."""
    items: Sequence[str | bytes]
    items = [secret] if isinstance(secret, (str, bytes)) else list(secret)
    if not items:
        raise ValueError(f"{option}: at least one secret is required")
    out: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            item = item.encode("utf-8")
        if not isinstance(item, bytes):
            raise ValueError(f"{option}: expected str or bytes secrets")
        if len(item) < MIN_SECRET_BYTES:
            raise ValueError(
                f"{option}: each secret must be at least {MIN_SECRET_BYTES} bytes "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        out.append(item)
    return tuple(out)


class _Signer:
    """HMAC-SHA256 with one secret, its keyed inner and outer hash states computed once.

    The same value as ``hmac.digest(secret, payload, "sha256")`` (RFC 2104), for about
    a third of the cost per token: no key setup, two copies of precomputed SHA-256 states.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        if len(secret) > 64:  # longer than SHA-256's block: hashed first
            secret = hashlib.sha256(secret).digest()
        key = secret.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def sign(self, payload: str) -> str:
        inner = self._inner.copy()
        inner.update(payload.encode("ascii"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _b64(outer.digest())


def mint_token(
    secret: str | bytes | Sequence[str | bytes],
    *,
    ttl_s: float = 300.0,
    route: str | None = None,
    method: str | None = None,
    now: float | None = None,
) -> str:
    """Return a new single-use profile token signed with the first secret."""
    secrets = normalize_secrets(secret)
    if not ttl_s > 0:
        raise ValueError("ttl_s: must be positive")
    if route is not None and (not route.startswith("/") or len(route) > 200):
        raise ValueError(
            "route: expected a route template starting with '/', e.g. '/items/{item_id}'"
        )
    if method is not None and not re.fullmatch(r"[A-Za-z]{1,16}", method):
        raise ValueError("method: expected an HTTP method such as GET")
    exp = int((time.time() if now is None else now) + ttl_s)
    nonce = _b64(os.urandom(16))
    scope = ""
    if route is not None or method is not None:
        scope = _b64(f"{(method or '').upper()} {route or ''}".encode())
    payload = f"{_VERSION}.{exp}.{nonce}.{scope}"
    return f"{payload}.{_Signer(secrets[0]).sign(payload)}"


def viewer_token(secret: str | bytes | Sequence[str | bytes]) -> str:
    """The default bearer token of the profile viewer, derived from the first secret.

    It is an HMAC of a fixed, distinct label, so it cannot be used as a profile
    token and does not reveal the secret.
    """
    return _b64(hmac.new(normalize_secrets(secret)[0], _VIEWER_LABEL, hashlib.sha256).digest())


class TokenClaims:
    """What a verified token allows."""

    __slots__ = ("exp", "method", "nonce", "route")

    def __init__(self, exp: int, nonce: str, method: str | None, route: str | None) -> None:
        self.exp = exp
        self.nonce = nonce
        self.method = method
        self.route = route


NonceClaim = Callable[[str, int, float], "str | None"]
"""``claim(nonce, exp, now)``: claim a nonce for every process sharing it; returns a
refusal reason (``"replayed"``, ...) or ``None`` when this call claimed it first."""


class ReplayCache:
    """Nonces already used, kept until their token expires.

    Bounded: when full of unexpired nonces, new tokens are refused (fail
    closed) rather than forgetting a nonce that could then be replayed.

    With ``shared`` (a store's ``claim_nonce``, e.g. :class:`FileStore`'s), a nonce
    this process has not seen is also claimed there, atomically across every
    worker process sharing the store; this process's cache then answers repeated
    replays without asking the store again.
    """

    def __init__(self, max_entries: int = 10_000, shared: NonceClaim | None = None) -> None:
        self._max = max_entries
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._shared = shared

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, exp: int, now: float) -> str | None:
        """Record ``nonce``; return a refusal reason, or ``None`` if it is fresh."""
        with self._lock:
            seen = self._seen
            if nonce in seen:
                return "replayed"
            if len(seen) >= self._max:
                # Drop expired entries (insertion order is roughly expiry order).
                for key in [k for k, e in seen.items() if e < now]:
                    del seen[key]
                if len(seen) >= self._max:
                    return "replay_cache_full"
            if self._shared is None:
                seen[nonce] = exp
                return None
        # Outside the lock: the shared claim is atomic by itself (one winner
        # across processes, and across threads of this one).
        reason = self._shared(nonce, exp, now)
        if reason is None or reason == "replayed":
            with self._lock:
                if len(self._seen) < self._max:
                    self._seen[nonce] = exp
        return reason


class TokenVerifier:
    """Verifies tokens against one or more secrets; single use via a :class:`ReplayCache`."""

    def __init__(
        self,
        secrets: tuple[bytes, ...],
        *,
        max_ttl_s: float,
        replay_cache: ReplayCache,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._signers = tuple(_Signer(secret) for secret in secrets)
        self._max_ttl_s = max_ttl_s
        self._replay = replay_cache
        self._clock = clock

    def verify(self, raw: bytes) -> TokenClaims | str:
        """Return the claims of a valid, fresh token, or a refusal reason."""
        if len(raw) > MAX_TOKEN_LENGTH:
            return "malformed"
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return "malformed"
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return "malformed"
        _, exp_text, nonce, scope, sig = parts
        if (
            not exp_text.isdigit()
            or len(exp_text) > 12
            or not NONCE_RE.fullmatch(nonce)
            or len(sig) != _SIG_LENGTH
            or not _B64_RE.fullmatch(sig)
            or not _B64_RE.fullmatch(scope)
        ):
            return "malformed"
        exp = int(exp_text)
        now = self._clock()
        if exp < now:
            return "expired"
        if exp > now + self._max_ttl_s + 1:
            return "lifetime_too_long"
        payload = token[: -(_SIG_LENGTH + 1)]
        sig_bytes = sig.encode("ascii")
        valid = False
        for signer in self._signers:
            # Check every secret, so timing does not say which one matched.
            valid |= hmac.compare_digest(signer.sign(payload).encode("ascii"), sig_bytes)
        if not valid:
            return "forged"
        method: str | None = None
        route: str | None = None
        if scope:
            try:
                method_text, _, route_text = _unb64(scope).decode("utf-8").partition(" ")
            except (binascii.Error, ValueError):
                return "malformed"
            method = method_text or None
            route = route_text or None
        reason = self._replay.add(nonce, exp, now)
        if reason is not None:
            return reason
        return TokenClaims(exp, nonce, method, route)
