"""Moving file bytes on and off the simulated tape, and running blocking work off the event loop.

The data of a file "on tape" is a real file, so a read returns real bytes whose checksum means
something, and a test can damage the media by flipping a byte. Both directions go through a temp
file that is fsync-ed and renamed only when complete, so a crash never leaves a file on tape, nor
a recalled file at its destination, that is not wholly there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common.errors import Permanent, Retryable
from common.storage import confined
from common.storage.checksum import ADLER32_START, CHUNK_SIZE, chunk_buffer, format_adler32
from common.tape.library import ReadResult, TapeChecksumMismatch
from common.tape.store import fsync_dir

T = TypeVar("T")


class Aborted(Exception):
    """The awaiting task was cancelled; the worker thread stops at its next chunk."""


async def run_to_completion(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(cancelled_event, *args)`` in a thread; on cancellation, stop it and wait for it.

    ``asyncio.to_thread`` alone returns at once on cancellation while the thread runs on, which
    would let cleanup race the copy it is cleaning up after. The ``CancelledError`` is re-raised
    only once the thread has finished.
    """
    cancelled = threading.Event()
    fut = asyncio.ensure_future(asyncio.to_thread(fn, cancelled, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancelled.set()
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        if not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not warn; the cancellation wins
        raise


ErrorFactory = Callable[[OSError], Exception]


def _stream(
    cancelled: threading.Event,
    src: int,
    dst: int,
    read_error: ErrorFactory,
    write_error: ErrorFactory,
    limit: int | None = None,
) -> tuple[int, str, str]:
    """Copy ``src`` to ``dst`` through one buffer, computing adler32 and sha256 on the way (one
    read feeds both); with ``limit``, at most that many bytes (an aggregate's member)."""
    view = memoryview(chunk_buffer())
    value, total = ADLER32_START, 0
    digest = hashlib.sha256()
    while True:
        if cancelled.is_set():
            raise Aborted()
        want = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - total)
        try:
            n = os.readv(src, [view[:want]]) if want > 0 else 0
        except OSError as exc:
            raise read_error(exc) from None
        if n == 0:
            return total, format_adler32(value), digest.hexdigest()
        chunk = view[:n]
        value = zlib.adler32(chunk, value)
        digest.update(chunk)
        total += n
        try:
            while chunk:
                chunk = chunk[os.write(dst, chunk) :]
        except OSError as exc:
            raise write_error(exc) from None


def _through_temp(
    cancelled: threading.Event,
    src: int,
    temp: Path,
    final: Path,
    *,
    read_error: ErrorFactory,
    write_error: ErrorFactory,
    check: Callable[[int, str, str], None],
    durable: bool,
    exclusive: bool,
    limit: int | None = None,
) -> tuple[int, str, str]:
    """Stream ``src`` into ``temp``, let ``check(size, adler32, sha256)`` judge it, make it durable, rename
    it onto ``final``; ``temp`` is removed on any failure, ``src`` closed in every case. Returns
    (size, adler32, sha256) of what was copied."""
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            dst = os.open(temp, flags, 0o644)
        except OSError as exc:
            raise write_error(exc) from None
        try:
            total, actual, sha256 = _stream(cancelled, src, dst, read_error, write_error, limit)
            check(total, actual, sha256)
            try:
                if durable:
                    os.fsync(dst)
            except OSError as exc:
                raise write_error(exc) from None
        finally:
            os.close(dst)
        try:
            os.replace(temp, final)
            if durable:
                fsync_dir(final.parent)
        except OSError as exc:
            raise write_error(exc) from None
        return total, actual, sha256
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(src)


def open_source(source: Path) -> int:
    """Open the source of a tape write: a disk replica (``PosixStorage.resolve``'s name) or a
    staging file, untrusted bytes, opened with no symlink followed at any component and
    non-blocking, and only if a regular file (``confined``): a FIFO planted in a storage root
    cannot hang a drive's thread. Failures carry the codes of ``TapeLibrary.write``."""
    try:
        fd, _st = confined.open_regular(os.path.abspath(source))
    except confined.NotARegularFile as exc:
        raise Permanent("not_a_file", f"source {source} is {exc.what}, not a regular file") from None
    except FileNotFoundError:
        raise Permanent("file_missing", f"source {source} does not exist") from None
    except OSError as exc:
        if confined.is_refused(exc):
            raise Permanent("path_outside_area", f"source {source}: a symbolic link on the path") from None
        raise Retryable("source_io_error", f"reading {source}: {exc.strerror or exc}") from None
    return fd


def write_data(
    cancelled: threading.Event,
    source: Path,
    temp: Path,
    final: Path,
    size: int,
    adler32: str,
    durable: bool = True,
    sha256: str | None = None,
) -> None:
    """Copy ``source`` onto the tape as ``final``, verifying the announced size and checksum (and
    the recorded sha256 when given, computed in the same pass)."""

    def source_error(exc: OSError) -> Exception:
        return Retryable("source_io_error", f"reading {source}: {exc.strerror or exc}")

    def tape_error(exc: OSError) -> Exception:
        return Retryable("tape_write_error", f"writing {final}: {exc.strerror or exc}")

    def check(total: int, actual: str, digest: str) -> None:
        if total != size:
            raise Permanent("size_mismatch", f"source {source} has {total} bytes, announced {size}")
        if actual != adler32:
            raise Permanent("checksum_mismatch", f"source {source} has adler32 {actual}, announced {adler32}")
        if sha256 is not None and digest != sha256:
            raise Permanent("checksum_mismatch", f"source {source} has sha256 {digest}, recorded {sha256}")

    src = open_source(source)
    _through_temp(
        cancelled, src, temp, final, read_error=source_error, write_error=tape_error, check=check,
        durable=durable, exclusive=False,
    )  # fmt: skip


def read_data(
    cancelled: threading.Event,
    data: Path,
    dest: Path,
    *,
    vid: str,
    fseq: int,
    size: int,
    expected: str,
    keep_mismatch: bool,
    durable: bool = True,
    offset: int = 0,
) -> ReadResult:
    """Copy a file off the tape to ``dest`` (``size`` bytes from ``offset``: the whole file, or an
    aggregate's member); media problems raise ``tape_read_error`` or a mismatch.

    With ``keep_mismatch`` a checksum mismatch still lands at ``dest`` (the caller asked for the
    raw bytes and compares itself); otherwise ``dest`` is left untouched.
    """

    def media_error(exc: OSError) -> Exception:
        return Permanent("tape_read_error", f"{vid} fseq {fseq}: {exc.strerror or exc}")

    def dest_error(exc: OSError) -> Exception:
        return Retryable("storage_io_error", f"writing {dest}: {exc.strerror or exc}")

    def check(total: int, actual: str, _digest: str) -> None:
        if total != size:
            raise Permanent("tape_read_error", f"{vid} fseq {fseq}: read {total} bytes of {size}")
        if actual != expected and not keep_mismatch:
            raise TapeChecksumMismatch(vid, fseq, expected, actual)

    try:
        src = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise media_error(exc) from None
    if offset:
        try:
            os.lseek(src, offset, os.SEEK_SET)
        except OSError as exc:
            os.close(src)
            raise media_error(exc) from None
    tmp = dest.with_name(f".{dest.name}.tape-tmp-{secrets.token_hex(6)}")
    # Reading at most ``size`` + 1 bytes: a whole file longer than recorded is still found short
    # or long; a member stops at its end, its neighbours' bytes never read.
    total, actual, sha256 = _through_temp(
        cancelled, src, tmp, dest, read_error=media_error, write_error=dest_error, check=check,
        durable=durable, exclusive=True, limit=size + (1 if offset == 0 else 0),
    )  # fmt: skip
    return ReadResult(total, actual, sha256)
