"""Adler-32, the archive's file checksum.

Adler-32 is what the instruments' DAQ systems and the grid storage world (dCache, FTS, Rucio)
already publish, and zlib computes it at memory speed while releasing the GIL on large buffers,
so many copies can checksum in parallel worker threads. The canonical text form is 8 lower-case
hex digits; external systems drop leading zeros or use upper case, hence ``normalise``.
"""

from __future__ import annotations

import os
import re
import threading
import zlib

from common.errors import Permanent
from common.storage import confined

CHUNK_SIZE = 1024 * 1024
ADLER32_START = 1  # zlib.adler32's initial value (the checksum of zero bytes)
_buffers = threading.local()


def chunk_buffer() -> bytearray:
    """This thread's ``CHUNK_SIZE`` copy buffer, made once and used again by every copy the thread
    makes (one copy at a time: the callers are leaf functions). A new megabyte per file comes from
    glibc's heap once its mmap threshold has risen past it, churning a heap that already held
    20-60 MB freed but not given back in the tape daemon of a night (15-25 MB after this change)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK_SIZE)
    return buf


_HEX = re.compile(r"[0-9a-f]{1,8}")
_CANONICAL_DIGITS = "0123456789abcdef"


_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")


def normalise_sha256(v: object) -> str | None:
    """sha256 as 64 lower-case hex digits (None stays None). Strict: a ``str`` of exactly 64 hex
    digits (upper case accepted and lowered), nothing else — no prefix, no base64, no number —
    so a comparison is a string equality. ``ValueError`` otherwise."""
    if v is None:
        return None
    if not isinstance(v, str) or not _SHA256_RE.fullmatch(v):
        raise ValueError("sha256 must be a string of 64 hexadecimal digits")
    return v.lower()


def format_adler32(value: int) -> str:
    """An adler32 integer as the canonical 8 lower-case hex digits."""
    return f"{value & 0xFFFFFFFF:08x}"


def normalise_adler32(text: str) -> str:
    """Canonical form of a checksum written by someone else (``"1A2b"`` -> ``"00001a2b"``).

    Raises ``ValueError`` when the text is not 1-8 hex digits (an optional ``0x`` is accepted).
    """
    if len(text) == 8 and not text.strip(_CANONICAL_DIGITS):
        return text  # canonical already (the catalogue's own values): per copy, no regex
    t = text.strip().lower().removeprefix("0x")
    if not _HEX.fullmatch(t):
        raise ValueError(f"adler32 must be 1-8 hexadecimal digits, got {text!r}")
    return t.zfill(8)


def adler32_of_bytes(data: bytes | bytearray | memoryview) -> str:
    return format_adler32(zlib.adler32(data))


def adler32_of_file(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> str:
    """Checksum a file, reading it in ``chunk_size`` pieces into one reused buffer.

    The file is untrusted (a landing-area file, a replica): opened with no symlink followed at any
    component, non-blocking, and read only if it is a regular file (``confined.open_regular``), so
    a FIFO re-announced under a registered name cannot block the thread for ever.
    ``Permanent("path_outside_area")`` for a symlink on the path, ``Permanent("not_a_file")`` for
    a FIFO, socket, device or directory. Blocking: call it from a worker thread in async code.
    Other ``OSError``s (``FileNotFoundError`` ...) propagate unclassified; the caller knows whether
    the file is a source or a replica and so which reason applies.
    """
    text = os.path.abspath(os.fspath(path))
    try:
        fd, _st = confined.open_regular(text)
    except confined.NotARegularFile as exc:
        raise Permanent("not_a_file", f"{text} is {exc.what}, not a regular file") from None
    except OSError as exc:
        if confined.is_refused(exc):
            raise Permanent(
                confined.PATH_OUTSIDE_AREA, f"{text}: a symbolic link on the path (not followed)"
            ) from None
        raise
    buf = chunk_buffer() if chunk_size == CHUNK_SIZE else bytearray(chunk_size)
    view = memoryview(buf)
    value = ADLER32_START
    with open(fd, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            value = zlib.adler32(view[:n], value)
    return format_adler32(value)
