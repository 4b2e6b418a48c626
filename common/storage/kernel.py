"""Kernel bindings of the posix backend: what the copies ask of the kernel, at its speed.

Why a module of its own: these are the few places where a copy's bytes move (``copy_file_range``
in chunks, a read-back through one page-aligned buffer per thread, adler32 by ISA-L where
installed) and where Python's ``os`` has no binding (``syncfs``, ``sync_file_range``, through
ctypes). Each was measured on this machine class (the figures are next to them); the copy engine
(``copy_engine``) and the backend (``posix``) call them directly, with no layer in between.

Everything here raises ``OSError`` unclassified (the caller knows which side a descriptor is on,
``reasons`` maps the errno), except ``_Aborted`` (the awaiting task was cancelled) and
``_sync_root``'s ``Retryable``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import Retryable
from common.storage.checksum import ADLER32_START, format_adler32

# copy_file_range cannot copy between these two files (other file system type, old kernel,
# special file): copy the rest with read/write instead. ENOTSUP is EOPNOTSUPP on Linux.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
# Bytes per copy_file_range call: large enough that the syscall count does not matter, small
# enough that a cancelled copy stops within a few milliseconds.
KERNEL_COPY_CHUNK = 16 * 1024 * 1024


class _Aborted(Exception):
    """Raised inside the worker thread when the awaiting task was cancelled."""


def _sync_root(_cancelled: Any, root: Path) -> None:
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise Retryable("storage_io_error", f"syncfs {root}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _load_syncfs() -> Any:
    """libc's ``syncfs(fd)``: flush one file system (Python has no binding before 3.12's os)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _load_syncfs()


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range``: start writeback of a file without waiting (no binding in os)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait for it


def _load_adler32() -> Callable[[Any, int], int]:
    """The fastest adler32 at hand: ISA-L's (package ``isal``) if installed, else zlib's.

    The same function (same values, chaining included), and both release the GIL on large
    buffers; ISA-L's uses SIMD and ran at 19-22 GB/s here against zlib 1.2.13's 3 GB/s. The
    checksum pass is what reading a copy back costs beyond the read itself: with zlib it is
    about half of a small-file replication copy's CPU time, and it caps large copies at 3 GB/s.
    """
    try:
        from isal import isal_zlib  # optional: used where installed
    except ImportError:
        return zlib.adler32
    return isal_zlib.adler32


_adler32 = _load_adler32()

_local = threading.local()


def _buffer(size: int) -> mmap.mmap:
    """One reusable buffer per worker thread, so a 1 KiB copy does not allocate 1 MiB each time.

    Page-aligned (an anonymous mapping), not a bytearray: the kernel copies page-cache pages
    (page-aligned) into it, and on this machine class (AMD EPYC) that copy ran 5-8x slower into a
    destination 16 bytes past a page boundary, which is where malloc puts a 1 MiB bytearray:
    24 us instead of 3 us for 64 KiB, 2.6 instead of 13 GB/s for large reads.
    """
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) != size:
        buf = _local.buf = mmap.mmap(-1, size)
    return buf


_copy_file_range: Callable[[int, int, int], int] | None = getattr(os, "copy_file_range", None)


def _kernel_copy(src: int, dst: int, limit: int, cancelled: threading.Event) -> int:
    """Copy up to ``limit`` bytes from ``src`` to ``dst`` at their file positions, in the kernel.

    Returns the bytes copied (fewer at end of file). Raises ``OSError`` unclassified (ENOSYS where
    Python has no ``copy_file_range``); the caller knows which errors mean "use read/write". The
    one function doing the bytes of a replication copy, so tests can replace it to corrupt them.
    """
    if _copy_file_range is None:
        raise OSError(errno.ENOSYS, "copy_file_range is not available")
    total = 0
    while total < limit:
        if cancelled.is_set():
            raise _Aborted()
        n = _copy_file_range(src, dst, min(KERNEL_COPY_CHUNK, limit - total))
        if n == 0:
            break
        total += n
    return total


def _adler32_fd(fd: int, buf: mmap.mmap, cancelled: threading.Event) -> tuple[int, str]:
    """(size, adler32) of an open file read from offset 0 to its end. ``OSError`` unclassified."""
    size, adler, _ = _sums_fd(fd, buf, cancelled, sha256=False)
    return size, adler


def _sums_fd(
    fd: int, buf: mmap.mmap, cancelled: threading.Event, sha256: bool
) -> tuple[int, str, str | None]:
    """(size, adler32, sha256 or None) of an open file read once from offset 0 to its end: with
    ``sha256`` each chunk feeds both sums (hashlib's sha256 releases the GIL on large buffers).
    ``OSError`` unclassified."""
    view = memoryview(buf)
    value = ADLER32_START
    digest = hashlib.sha256() if sha256 else None
    total = 0
    while True:
        if cancelled.is_set():
            raise _Aborted()
        n = os.preadv(fd, [buf], total)
        if n == 0:
            return total, format_adler32(value), None if digest is None else digest.hexdigest()
        chunk = view[:n]
        value = _adler32(chunk, value)
        if digest is not None:
            digest.update(chunk)
        total += n
