"""The ``posix`` disk backend: a local or mounted directory tree.

A replica may only be declared available once its bytes are known good, and a crash must never
leave a truncated file under a real name. Hence every copy is:

1. streamed through one reused 1 MiB buffer, updating adler32 as each chunk passes (one read of
   the source, no second pass),
2. written to a temporary name in the destination directory (``.<basename>.spool-tmp-<hex>``, so
   it is on the same file system and ``rename`` is atomic, and ``cleanup_temp`` can find it),
3. compared with the expected size and checksum, ``fsync``-ed, then renamed onto the final name,
   and the directory is ``fsync``-ed so the rename itself survives a power cut.

On any failure the temporary file is removed. Blocking I/O runs in a per-endpoint thread pool so
the event loop stays free and a slow mount cannot starve other endpoints (or the process-wide
default executor, which has only ``cpu + 4`` threads). Cancelling the awaiting task stops the copy
at its next chunk and removes the temporary file before the ``CancelledError`` propagates.

Errors are classified where the ``errno`` is still known: source problems a retry cannot fix are
``Permanent``; anything about the destination (read-only, full, I/O error) is ``Retryable``,
because an operator can fix the endpoint and the work should then simply resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
import stat as stat_mod
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import ADLER32_START, CHUNK_SIZE, format_adler32, normalise_adler32
from common.storage.paths import real_dir, resolve_inside

T = TypeVar("T")
log = structlog.get_logger("spool.storage")

TEMP_MARKER = ".spool-tmp-"
_TEMP_RE = re.compile(r"\..+\.spool-tmp-[0-9a-f]{12}")
# NAME_MAX is 255 on the usual file systems; keep room for the dot, the marker and the token.
_TEMP_BASENAME_MAX = 200

DEFAULT_IO_THREADS = 8

_NOT_WRITABLE = {errno.EACCES, errno.EROFS, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True, slots=True)
class CopyResult:
    """A verified replica: ``pfn`` is the path inside the endpoint, ``path`` the absolute one."""

    pfn: str
    path: Path
    size: int
    adler32: str


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file left by ``put_from`` (a basename, not a path)."""
    return _TEMP_RE.fullmatch(name) is not None


def temp_name_for(basename: str) -> str:
    """A fresh temporary name next to ``basename``; hidden, recognisable, unique per attempt."""
    return f".{basename[:_TEMP_BASENAME_MAX]}{TEMP_MARKER}{secrets.token_hex(6)}"


class _Aborted(Exception):
    """Raised inside the worker thread when the awaiting task was cancelled."""


def _source_error(exc: OSError, path: Path) -> SpoolError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Permanent("file_missing", f"source {path} does not exist")
    if exc.errno == errno.ELOOP:
        return Permanent("not_a_file", f"source {path} is a symbolic link, not a regular file")
    if exc.errno == errno.ENXIO:  # a socket or a device without a driver
        return Permanent("not_a_file", f"source {path} is not a regular file")
    return Retryable("source_io_error", f"reading source {path}: {exc.strerror or exc}")


def _destination_error(exc: OSError, path: Path) -> SpoolError:
    text = exc.strerror or str(exc)
    if exc.errno in _NOT_WRITABLE:
        return Retryable("destination_not_writable", f"cannot write {path}: {text}")
    if exc.errno in _FULL:
        return Retryable("disk_full", f"no space left writing {path}: {text}")
    return Retryable("storage_io_error", f"writing {path}: {text}")


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
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


def _makedirs(path: Path) -> list[Path]:
    """``mkdir -p`` that returns the directories it created (their parents need an fsync)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
            created.append(d)
        except FileExistsError:
            if not d.is_dir():  # a concurrent copy made it: fine; a file there: not fine
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d)) from None
    return created


_local = threading.local()


def _buffer(size: int) -> bytearray:
    """One reusable buffer per worker thread, so a 1 KiB copy does not allocate 1 MiB each time."""
    buf: bytearray | None = getattr(_local, "buf", None)
    if buf is None or len(buf) != size:
        buf = _local.buf = bytearray(size)
    return buf


class PosixStorage:
    """A disk endpoint rooted at a directory. Paths given to it are relative to the root (pfns).

    Constructed as ``PosixStorage(name, endpoint)`` from the configuration, or
    ``PosixStorage(name, root)`` in tools and tests. The root is not created here: ``put_from``
    creates the destination directories (root included) on first write.
    """

    backend = "posix"

    def __init__(
        self,
        name: str,
        endpoint: StorageEndpoint | str | os.PathLike[str],
        *,
        io_threads: int = DEFAULT_IO_THREADS,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if not isinstance(endpoint, StorageEndpoint):
            endpoint = StorageEndpoint(root=Path(endpoint))
        self.name = name
        self.endpoint = endpoint
        self.kind: str = endpoint.kind
        self.root = Path(endpoint.root).absolute()
        self.attributes = dict(endpoint.attributes)
        self.io_threads = io_threads
        self.chunk_size = chunk_size
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"PosixStorage({self.name!r}, root={str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------
    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relpath`` inside the root; ``Permanent`` if it escapes or is the root."""
        path = resolve_inside(self.root, relpath)
        if path == Path(real_dir(os.fspath(self.root))):
            raise Permanent("path_outside_area", f"path {os.fspath(relpath)!r} names the root of {self.name}")
        return path

    def pfn_of(self, path: Path) -> str:
        """The path of a resolved ``path`` relative to the endpoint root, as stored in the catalogue."""
        return path.relative_to(real_dir(os.fspath(self.root))).as_posix()

    # --- copying -------------------------------------------------------------------------------
    async def put_from(
        self,
        source: Path,
        relpath: str,
        *,
        expected_size: int | None = None,
        expected_adler32: str | None = None,
        fsync: bool = True,
    ) -> CopyResult:
        """Copy ``source`` to ``relpath`` on this endpoint, verified, atomically; see the module doc.

        An existing file at ``relpath`` is replaced atomically (a redelivered message re-copies).
        ``source`` should already be resolved (e.g. by ``resolve_inside`` on a landing area): a
        symbolic link as its last component is refused as ``not_a_file``.
        """
        expected: str | None = None
        if expected_adler32 is not None:
            try:
                expected = normalise_adler32(expected_adler32)
            except ValueError as exc:
                raise Permanent("invalid_checksum", str(exc)) from None
        if expected_size is not None and expected_size <= self.endpoint.inline_copy_bytes:
            # Small and announced as small: copying here costs less than handing it to a thread,
            # whose GIL hand-offs on every syscall dominated ingest of 1 KiB files. A file larger
            # than announced fails its size check right after fstat, before any byte is copied.
            return self._copy_sync(threading.Event(), Path(source), relpath, expected_size, expected, fsync)
        return await self._in_thread(self._copy_sync, Path(source), relpath, expected_size, expected, fsync)

    def _copy_sync(
        self,
        cancelled: threading.Event,
        source: Path,
        relpath: str,
        expected_size: int | None,
        expected_adler32: str | None,
        fsync: bool,
    ) -> CopyResult:
        # Resolved here, not on the event loop: on a hung network mount even lstat blocks.
        dest = self.resolve(relpath)
        try:
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _source_error(exc, source) from None
        try:
            st = os.fstat(src)
            if not stat_mod.S_ISREG(st.st_mode):
                raise Permanent("not_a_file", f"source {source} is not a regular file")
            if expected_size is not None and st.st_size != expected_size:
                raise Permanent(
                    "size_mismatch", f"source {source} has {st.st_size} bytes, expected {expected_size}"
                )
            with contextlib.suppress(AttributeError, OSError):  # a hint: larger read-ahead
                os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            size, adler = self._stream_to(
                cancelled, src, source, dest, expected_size, expected_adler32, fsync
            )
        finally:
            os.close(src)
        return CopyResult(pfn=self.pfn_of(dest), path=dest, size=size, adler32=adler)

    def _stream_to(
        self,
        cancelled: threading.Event,
        src: int,
        source: Path,
        dest: Path,
        expected_size: int | None,
        expected_adler32: str | None,
        fsync: bool,
    ) -> tuple[int, str]:
        try:
            created = _makedirs(dest.parent)
        except OSError as exc:
            raise _destination_error(exc, dest.parent) from None
        tmp = dest.parent / temp_name_for(dest.name)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _destination_error(exc, tmp) from None
        dst_open = True
        try:
            buf = _buffer(self.chunk_size)
            view = memoryview(buf)
            value = ADLER32_START
            total = 0
            while True:
                if cancelled.is_set():
                    raise _Aborted()
                try:
                    n = os.readv(src, [buf])
                except OSError as exc:
                    raise _source_error(exc, source) from None
                if n == 0:
                    break
                total += n
                if expected_size is not None and total > expected_size:
                    raise Permanent(
                        "size_mismatch",
                        f"source {source} has more than the expected {expected_size} bytes",
                    )
                chunk = view[:n]
                value = zlib.adler32(chunk, value)
                try:
                    while chunk:
                        chunk = chunk[os.write(dst, chunk) :]
                except OSError as exc:
                    raise _destination_error(exc, dest) from None
            adler = format_adler32(value)
            if expected_size is not None and total != expected_size:
                raise Permanent(
                    "size_mismatch", f"source {source} has {total} bytes, expected {expected_size}"
                )
            if expected_adler32 is not None and adler != expected_adler32:
                raise Permanent(
                    "checksum_mismatch",
                    f"source {source} has adler32 {adler}, expected {expected_adler32}",
                )
            try:
                if fsync:
                    os.fsync(dst)
                dst_open = False
                os.close(dst)  # network file systems report deferred write errors here
                os.rename(tmp, dest)
                if fsync:
                    _fsync_dir(dest.parent)
                    for parent in {d.parent for d in created}:
                        _fsync_dir(parent)
            except OSError as exc:
                raise _destination_error(exc, dest) from None
            return total, adler
        except BaseException:
            if dst_open:
                os.close(dst)
            # Fails only if already renamed or the directory vanished; cleanup_temp gets the rest.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    # --- inspection ----------------------------------------------------------------------------
    # exists/stat/free_bytes are plain calls (a few syscalls each); on a network mount that may
    # hang, call them through asyncio.to_thread.
    def exists(self, relpath: str) -> bool:
        """True when a regular file is present at ``relpath``."""
        return self.resolve(relpath).is_file()

    def stat(self, relpath: str) -> int:
        """Size in bytes of the file at ``relpath``."""
        path = self.resolve(relpath)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise Permanent("file_missing", f"{path} does not exist on {self.name}") from None
        except OSError as exc:
            raise Retryable("storage_io_error", f"stat {path}: {exc.strerror or exc}") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise Permanent("not_a_file", f"{path} on {self.name} is not a regular file")
        return st.st_size

    async def checksum(self, relpath: str) -> str:
        """Adler-32 of the file at ``relpath``, read back from the endpoint."""
        return await self._in_thread(self._checksum_sync, relpath)

    def _checksum_sync(self, cancelled: threading.Event, relpath: str) -> str:
        path = self.resolve(relpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise Permanent("file_missing", f"{path} does not exist on {self.name}") from None
            raise Retryable("storage_io_error", f"reading {path}: {exc.strerror or exc}") from None
        try:
            if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                raise Permanent("not_a_file", f"{path} on {self.name} is not a regular file")
            buf = _buffer(self.chunk_size)
            view = memoryview(buf)
            value = ADLER32_START
            while True:
                if cancelled.is_set():
                    raise _Aborted()
                try:
                    n = os.readv(fd, [buf])
                except OSError as exc:
                    raise Retryable("storage_io_error", f"reading {path}: {exc.strerror or exc}") from None
                if n == 0:
                    return format_adler32(value)
                value = zlib.adler32(view[:n], value)
        finally:
            os.close(fd)

    async def delete(self, relpath: str) -> bool:
        """Remove the file at ``relpath``; True if it was there. Deleting a missing file succeeds."""
        return await self._in_thread(self._delete_sync, relpath)

    def _delete_sync(self, cancelled: threading.Event, relpath: str) -> bool:
        path = self.resolve(relpath)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            # Linux says EISDIR for a directory, POSIX allows EPERM.
            if exc.errno == errno.EISDIR or (exc.errno == errno.EPERM and path.is_dir()):
                raise Permanent("not_a_file", f"{path} on {self.name} is a directory") from None
            raise _destination_error(exc, path) from None
        return True

    async def sync(self) -> None:
        """Make every completed copy on this endpoint durable with one flush of its file system.

        The group-commit alternative to ``fsync=True`` per file: a daemon copies a batch with
        ``fsync=False``, calls ``sync()`` once, and only then records the replicas. One journal
        commit instead of two fsyncs per file; on this machine class it is what lets ingest keep up
        with small files. Falls back to ``os.sync()`` where ``syncfs`` is missing.
        """
        await self._in_thread(_sync_root, self.root)

    def free_bytes(self) -> int:
        """Bytes available to us on the root's file system (what ``df`` calls Avail)."""
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise Retryable("storage_io_error", f"statvfs {self.root}: {exc.strerror or exc}") from None
        return st.f_bavail * st.f_frsize

    def cleanup_temp(self, older_than: float = 0) -> int:
        """Remove temporary files left under the root by copies that died; return how many.

        Only files whose last write is at least ``older_than`` seconds old are removed: with
        several writers on one endpoint (another node's ingest), pass a margin such as 3600 so
        copies in progress elsewhere are left alone. Walks the whole tree: call it at start-up,
        from a worker thread if the endpoint is large.
        """
        if not self.root.is_dir():
            return 0
        deadline = time.time() - older_than
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not is_temp_name(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_mtime <= deadline:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a read-only endpoint must not stop the daemon starting
                    log.warning("temp_cleanup_failed", storage=self.name, path=path, error=str(exc))
        return removed

    # --- threads -------------------------------------------------------------------------------
    async def _in_thread(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(cancelled_event, *args)`` in this endpoint's pool; cancellation stops it early."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.io_threads, thread_name_prefix=f"storage-{self.name}"
            )
        cancelled = threading.Event()
        fut = asyncio.get_running_loop().run_in_executor(self._executor, fn, cancelled, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled.set()
            # Mark the outcome as retrieved, then wait (one chunk at most) for the temp file cleanup.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.wait([fut])
            raise

    def close(self) -> None:
        """Stop the worker threads (waits for running operations). The object stays usable."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
