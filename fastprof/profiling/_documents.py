"""The stored form of a profile and the formats it renders to.

A *document* is gzip-compressed JSON. Format 2 (what fastprof writes) stores every
distinct frame string and every distinct stack once::

    {"fastprof": {...metadata...},
     "format": 2,
     "session": <pyinstrument Session.to_json() without frame_records and start_call_stack>,
     "frames": ["<pyinstrument frame string>", ...],
     "stacks": [[<index in frames>, ...], ...],      # root first
     "start_stack": [<index in frames>, ...],        # the session's start_call_stack
     "samples": [<index in stacks>, ...],
     "durations": [<seconds>, ...]}                  # one per sample

A profile's samples mostly share their stacks (and every stack shares the
request's start stack), so this is a fraction of the size and of the encoding
time of pyinstrument's own session JSON, which repeats every frame string of
every sample.

A document renders to pyinstrument's self-contained HTML, speedscope JSON, or is
served as the session JSON itself (loadable with ``pyinstrument --load``).
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
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


#: Documents up to this size (uncompressed JSON) are not compressed.
_COMPRESS_ABOVE: Final = 8 * 1024


def encode(session: Session, meta: dict[str, Any], *, always_compress: bool = False) -> bytes:
    """The format 2 document of ``session`` (CPU-bound: fastprof's writer thread calls it).

    Documents of at most 8 KiB are stored uncompressed in the gzip stream unless
    ``always_compress`` (for the copy embedded in the span, where size counts).
    """
    frame_index: dict[str, int] = {}
    stack_index: dict[tuple[str, ...], int] = {}
    stacks: list[list[int]] = []
    samples: list[int] = []
    durations: list[float] = []
    for stack, duration in session.frame_records:
        key = tuple(stack)
        index = stack_index.get(key)
        if index is None:
            index = stack_index[key] = len(stacks)
            stacks.append([frame_index.setdefault(f, len(frame_index)) for f in stack])
        samples.append(index)
        durations.append(duration)
    body = session.to_json(include_frame_records=False)
    start_stack = [
        frame_index.setdefault(f, len(frame_index)) for f in body.pop("start_call_stack")
    ]
    document = {
        "fastprof": meta,
        "format": 2,
        "session": body,
        "frames": list(frame_index),
        "stacks": stacks,
        "start_stack": start_stack,
        "samples": samples,
        "durations": durations,
    }
    raw = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if len(raw) <= _COMPRESS_ABOVE and not always_compress:
        return _gzip_stored(raw)
    # wbits=31: a gzip stream (header with mtime 0), in one call.
    return zlib.compress(raw, level=1, wbits=31)


#: gzip member header: deflate, no flags, mtime 0, no extra flags, OS unknown.
_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_CRC_CHUNK: Final = 4096  # zlib.crc32 keeps the GIL up to 5 KiB


def _gzip_stored(data: bytes) -> bytes:
    """``data`` as a gzip stream of stored (uncompressed) deflate blocks.

    For small documents: compressing a few KiB would cost several times the
    rest of the encoding, and zlib releases the GIL around each call, so the
    writer thread would have to win the GIL back from the event loop once more
    per profile. This builds the same valid stream (RFC 1952/1951) without
    letting go of the GIL.
    """
    crc = 0
    for i in range(0, len(data), _CRC_CHUNK):
        crc = zlib.crc32(data[i : i + _CRC_CHUNK], crc)
    parts = [_GZIP_HEADER]
    size = len(data)
    offset = 0
    while True:
        block = data[offset : offset + 0xFFFF]
        offset += len(block)
        final = offset >= size
        parts.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF))
        parts.append(block)
        if final:
            break
    parts.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return b"".join(parts)


def decode(document: bytes, max_bytes: int = 512 * 1024 * 1024) -> tuple[dict[str, Any], Session]:
    with gzip.GzipFile(fileobj=io.BytesIO(document)) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError("profile document too large")
    data = json.loads(raw)
    meta = dict(data.get("fastprof", {}))
    try:
        if data["format"] != 2:
            raise ValueError(f"unknown profile document format {data['format']!r}")
        frames: list[str] = data["frames"]
        stacks = [[frames[i] for i in stack] for stack in data["stacks"]]
        records = [
            (list(stacks[i]), float(d))
            for i, d in zip(data["samples"], data["durations"], strict=True)
        ]
        session = dict(data["session"])
        session["start_call_stack"] = [frames[i] for i in data["start_stack"]]
        session["frame_records"] = records
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed profile document: {exc!r}") from exc
    return meta, Session.from_json(session)


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
