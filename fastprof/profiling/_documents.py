"""The stored form of a profile and the formats it renders to.

A *document* is gzip-compressed JSON::

    {"fastprof": {...metadata...}, "session": <pyinstrument Session.to_json()>}

It renders to pyinstrument's self-contained HTML, speedscope JSON, or is served
as the session JSON itself (loadable with ``pyinstrument --load``).
"""

from __future__ import annotations

import gzip
import io
import json
from typing import Any, Final, Literal

from pyinstrument.session import Session

__all__ = ["FORMATS", "Format", "decode", "encode", "render"]

Format = Literal["html", "speedscope", "json"]
FORMATS: Final[tuple[Format, ...]] = ("html", "speedscope", "json")

#: Media type and file extension of each format.
MEDIA: Final[dict[str, tuple[str, str]]] = {
    "html": ("text/html; charset=utf-8", "html"),
    "speedscope": ("application/json", "speedscope.json"),
    "json": ("application/json", "pyisession"),
}


def encode(session: Session, meta: dict[str, Any]) -> bytes:
    body = json.dumps({"fastprof": meta, "session": session.to_json()}, separators=(",", ":"))
    return gzip.compress(body.encode("utf-8"), compresslevel=1)


def decode(document: bytes, max_bytes: int = 512 * 1024 * 1024) -> tuple[dict[str, Any], Session]:
    with gzip.GzipFile(fileobj=io.BytesIO(document)) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError("profile document too large")
    data = json.loads(raw)
    return dict(data.get("fastprof", {})), Session.from_json(data["session"])


def render(document: bytes, fmt: Format) -> bytes:
    """Render a stored document (CPU-bound: call off the event loop)."""
    _, session = decode(document)
    if fmt == "json":
        return json.dumps(session.to_json(), separators=(",", ":")).encode("utf-8")
    if fmt == "speedscope":
        from pyinstrument.renderers import SpeedscopeRenderer

        text: str = SpeedscopeRenderer().render(session)
        return text.encode("utf-8")
    if fmt == "html":
        from pyinstrument.renderers import HTMLRenderer

        page: str = HTMLRenderer().render(session)
        return page.encode("utf-8")
    raise ValueError(f"unknown format {fmt!r}")
