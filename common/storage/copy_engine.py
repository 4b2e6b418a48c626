"""The copy engine: the blocking work of one verified copy (or check) on a posix endpoint.

A replica may only be declared available once its bytes are known good, and a crash must never
leave a truncated file under a real name. Hence every copy is:

1. streamed through one reused 1 MiB buffer, updating adler32 as each chunk passes (one read of
   the source, no second pass),
2. written to an unnamed file in the destination directory (``tempfiles``: ``O_TMPFILE``; where
   the file system has none, a temporary name there, on the same file system so that ``rename``
   is atomic, and ``cleanup_temp`` can find it),
3. compared with the expected size and checksum, ``fsync``-ed, then linked under (renamed onto)
   the final name, and the directory is ``fsync``-ed so that survives a power cut.

On any failure the temporary file is removed (an unnamed one frees itself, even on a kill). The
methods here run in a worker thread of ``PosixStorage`` or in its copy process (``copy_process``,
which builds a ``CopyEngine`` of its own: no backend, no event loop), and take the ``cancelled``
event of the awaiting task: set, the copy stops at its next chunk (``_Aborted``) and removes its
temporary file. Why a module of its own: this is the hot path of ingest and replication, shared by
the two places it runs, and tuned call by call (the figures are next to the code).

Replication (``replicate_sync``, ``replicate_from_sync``) copies a replica that already has a
catalogued size and checksum from another disk endpoint. It uses the kernel copy
(``copy_file_range``) and then reads the written temporary file back for adler32 (DESIGN.md
section 5: faster than the Python loop, and it checks what landed). Its reason codes say *which
side* is at fault (``reasons.SOURCE_REASONS`` versus ``reasons.DESTINATION_REASONS``). With
``fsync=False`` (batch durability) a large copy starts its own writeback once copied, so the disk
writes while the copy is verified and the batch's ``sync()`` has little left to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import ADLER32_START, format_adler32
from common.storage.kernel import (
    _NO_KERNEL_COPY,
    _SYNC_FILE_RANGE,
    _SYNC_FILE_RANGE_WRITE,
    _Aborted,
    _adler32,
    _adler32_fd,
    _buffer,
    _kernel_copy,
)
from common.storage.paths import _below_parent, real_dir, resolve_below
from common.storage.reasons import (
    _FULL,
    _NOT_WRITABLE,
    CHECKSUM_MISMATCH,
    DISK_FULL,
    SOURCE_CORRUPT,
    STORAGE_IO_ERROR,
    _destination_error,
    _replica_source_error,
    _source_error,
)
from common.storage.tempfiles import _O_TMPFILE, _link_unnamed, _no_tmpfile_dirs, _proc_fds, _TempFile

log = structlog.get_logger("spool.storage")

# Replication copies at least this large, when the caller makes them durable later (fsync=False),
# start their own writeback as soon as the bytes are copied, before the read-back: the disk then
# writes while the CPU checksums, and the caller's batch sync() finds little left to do. Measured
# with 8 x 256 MiB: copies + syncfs took 2.6 s against 3.6 s without (cp -r + sync: 2.8 s).
EARLY_WRITEBACK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CopyResult:
    """A verified replica: ``pfn`` is the path inside the endpoint, ``location`` the absolute one."""

    pfn: str
    # Text: a Path made per small copy, in the copy process and again in its parent, cost more
    # than the checks of the copy.
    location: str
    size: int
    adler32: str

    @property
    def path(self) -> Path:
        return Path(self.location)


def _open_replica(source: str | os.PathLike[str], expected_size: int) -> int:
    """The descriptor of a source replica that is a regular file of the expected size; its
    failures are the source's (``_replica_source_error``, ``source_corrupt``)."""
    try:
        # O_NONBLOCK: a FIFO planted at the source path must not hang the open.
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _replica_source_error(exc, source) from None
    try:
        st = os.fstat(src)
        if not stat_mod.S_ISREG(st.st_mode):
            raise Permanent(SOURCE_CORRUPT, f"source replica {source} is not a regular file")
        if st.st_size != expected_size:
            raise Permanent(
                SOURCE_CORRUPT, f"source replica {source} has {st.st_size} bytes, expected {expected_size}"
            )
    except OSError as exc:
        os.close(src)
        raise _replica_source_error(exc, source) from None
    except BaseException:
        os.close(src)
        raise
    return src


def _is_symlink(path: str) -> bool:
    try:
        return stat_mod.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


class CopyEngine:
    """The copies and checks of one endpoint (``name``, rooted at ``endpoint.root``), blocking.

    ``operations`` are the small operations a batch may hold, by the name a batch (and the copy
    process, which runs this same table on its own engine) knows them by. ``min_free_bytes`` is
    accounted per engine: copies in progress count against it before they are written.
    """

    def __init__(self, name: str, endpoint: StorageEndpoint, chunk_size: int) -> None:
        self.name = name
        self.endpoint = endpoint
        self.root = Path(endpoint.root).absolute()
        self.chunk_size = chunk_size
        self.operations: dict[str, Callable[..., Any]] = {
            "copy": self.copy_sync,
            "replicate": self.replicate_sync,
            "replicate_from": self.replicate_from_sync,
            "verify": self.verify_sync,
        }
        # Bytes announced by copy_verified calls in progress: they count against min_free_bytes
        # before they are written (several copies checking free space at once would overshoot).
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relpath`` inside the root; ``Permanent`` if it escapes or is the root."""
        return resolve_below(self.root, relpath, self.name)

    def pfn_of(self, path: str | os.PathLike[str]) -> str:
        """The path of a resolved ``path`` relative to the endpoint root, as stored in the catalogue."""
        root = real_dir(os.fspath(self.root))
        text = os.fspath(path)
        if text.startswith(root) and text[len(root) : len(root) + 1] == "/":
            return text[len(root) + 1 :]  # the common case, without pathlib's parsing (per file)
        return Path(path).relative_to(root).as_posix()

    def copy_sync(
        self,
        cancelled: threading.Event,
        source: str,
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
            if st.st_size > self.chunk_size:  # a hint (larger read-ahead), worth its syscall beyond one read
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            size, adler = self._stream_to(
                cancelled, src, source, dest, expected_size, expected_adler32, fsync
            )
        finally:
            os.close(src)
        return CopyResult(pfn=self.pfn_of(dest), location=os.fspath(dest), size=size, adler32=adler)

    def _stream_to(
        self,
        cancelled: threading.Event,
        src: int,
        source: str,
        dest: Path,
        expected_size: int | None,
        expected_adler32: str | None,
        fsync: bool,
    ) -> tuple[int, str]:
        tmp = _TempFile(dest, os.O_WRONLY)
        assert tmp.fd is not None
        dst = tmp.fd
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
                value = _adler32(chunk, value)
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
            tmp.commit(fsync)
            return total, adler
        except BaseException:
            tmp.discard()
            raise

    def replicate_from_sync(
        self,
        cancelled: threading.Event,
        source_root: str,
        source_pfn: str,
        relpath: str,
        expected_size: int,
        expected_adler32: str,
    ) -> CopyResult:
        # The final components are not looked at here (a lstat each, a tenth of this function):
        # the source is opened with O_NOFOLLOW, and a symlink there (ELOOP) is resolved the full
        # way and opened again; the destination is renamed onto, which replaces a symlink there.
        source = _below_parent(source_root, source_pfn)
        dest = _below_parent(self.root, relpath)
        if source is not None and dest is not None:
            made = self._replicate_plainly(cancelled, source, dest, expected_size, expected_adler32)
            if made is not None:
                return made
        if source is None:
            source = self._source_the_full_way(source_root, source_pfn)
        if dest is None:
            dest = os.fspath(self.resolve(relpath))
        try:
            return self._replicate_to(cancelled, source, dest, expected_size, expected_adler32, False)
        except Permanent as err:
            if err.reason != SOURCE_CORRUPT or not _is_symlink(source):
                raise
        # A symlink in the source endpoint: followed, like resolve does, if it stays inside it.
        real = self._source_the_full_way(source_root, source_pfn)
        return self._replicate_to(cancelled, real, dest, expected_size, expected_adler32, False)

    def _replicate_plainly(
        self, cancelled: threading.Event, source: str, dest: str, size: int, adler32: str
    ) -> CopyResult | None:
        """The copy of ``_replicate_to`` when all goes well, in the fewest steps: a new unnamed
        file, one kernel copy, one read-back, one link; ``None`` as soon as anything is not plain
        (an error, a mismatch, a file already at ``dest``, no unnamed files, a reserve to keep),
        and the caller makes the copy the careful way, which says what is wrong. Nothing is left
        behind by an attempt given up: the unnamed file goes with its descriptor.

        Why: most of the copy process's time is its system calls, but a fifth was the Python
        around them (per small file, tens of microseconds of calls, checks and objects).
        """
        buf = _buffer(self.chunk_size)
        if not _O_TMPFILE or _proc_fds() is None or size > len(buf) or self.endpoint.min_free_bytes > 0:
            return None
        parent = os.path.dirname(dest)
        if parent in _no_tmpfile_dirs:
            return None
        try:
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(src)
            if not stat_mod.S_ISREG(st.st_mode) or st.st_size != size:
                return None
            tmp = os.open(parent, os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o644)
            try:
                if size and _kernel_copy(src, tmp, size, cancelled) != size:
                    return None
                if os.preadv(tmp, [buf], 0) != size:
                    return None
                if format_adler32(_adler32(memoryview(buf)[:size], ADLER32_START)) != adler32:
                    return None
                _link_unnamed(tmp, dest)
            finally:
                os.close(tmp)
        except OSError:
            return None
        finally:
            os.close(src)
        return CopyResult(pfn=self.pfn_of(dest), location=dest, size=size, adler32=adler32)

    @staticmethod
    def _source_the_full_way(source_root: str, source_pfn: str) -> str:
        try:
            return os.fspath(resolve_below(source_root, source_pfn, "its source endpoint"))
        except Permanent as err:  # the catalogue's pfn escapes its root: that copy is unusable
            raise Permanent(SOURCE_CORRUPT, f"source replica {source_pfn!r}: {err.message}") from None

    def replicate_sync(
        self,
        cancelled: threading.Event,
        source: str | os.PathLike[str],
        relpath: str,
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
    ) -> CopyResult:
        dest = self.resolve(relpath)  # here, not on the event loop: lstat can block on a mount
        return self._replicate_to(cancelled, source, dest, expected_size, expected_adler32, fsync)

    def _replicate_to(
        self,
        cancelled: threading.Event,
        source: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
    ) -> CopyResult:
        src = _open_replica(source, expected_size)
        try:
            if expected_size > self.chunk_size:  # a hint, worth its syscall beyond one read
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if self.endpoint.min_free_bytes > 0:
                with self._reserve(dest, expected_size):
                    self._copy_and_check(cancelled, src, source, dest, expected_size, expected_adler32, fsync)
            else:
                self._copy_and_check(cancelled, src, source, dest, expected_size, expected_adler32, fsync)
        finally:
            os.close(src)
        return CopyResult(
            pfn=self.pfn_of(dest), location=os.fspath(dest), size=expected_size, adler32=expected_adler32
        )

    def pull_sync(
        self,
        cancelled: threading.Event,
        source_root: str,
        source_pfn: str,
        relpath: str,
        expected_size: int,
        expected_adler32: str,
    ) -> CopyResult:
        """``replicate_sync`` (fsync-ed) of another posix endpoint's file, its pfn resolved here
        the full way (``PosixStorage.copy_from``); a pfn escaping its root is ``source_corrupt``."""
        source = self._source_the_full_way(source_root, source_pfn)
        return self.replicate_sync(cancelled, source, relpath, expected_size, expected_adler32, True)

    def download_sync(
        self,
        cancelled: threading.Event,
        relpath: str,
        local: str,
        expected_size: int,
        expected_adler32: str,
    ) -> None:
        """Copy the file at ``relpath`` here to ``local``, a path anywhere on this node, as
        ``replicate_sync`` copies (kernel copy, read-back, atomic, fsync-ed), this endpoint being
        the source: its reason codes are the source's. ``min_free_bytes`` (this endpoint's
        reserve) does not apply to a file written elsewhere."""
        source = os.fspath(self.resolve(relpath))
        src = _open_replica(source, expected_size)
        try:
            self._copy_and_check(cancelled, src, source, local, expected_size, expected_adler32, True)
        finally:
            os.close(src)

    def _copy_and_check(
        self,
        cancelled: threading.Event,
        src: int,
        source: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
    ) -> None:
        # O_RDWR: the same descriptor reads the copy back, without a second open.
        tmp = _TempFile(dest, os.O_RDWR)
        try:
            assert tmp.fd is not None
            self._fill(cancelled, src, tmp.fd, source, dest, expected_size)
            if not fsync and expected_size >= EARLY_WRITEBACK_BYTES and _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(tmp.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            try:
                size, adler = _adler32_fd(tmp.fd, _buffer(self.chunk_size), cancelled)
            except OSError as exc:
                raise _destination_error(exc, tmp.where) from None
            if size != expected_size or adler != expected_adler32:
                raise self._blame(cancelled, src, source, dest, size, adler, expected_size, expected_adler32)
            tmp.commit(fsync)
        except BaseException:
            tmp.discard()
            raise

    @contextlib.contextmanager
    def _reserve(self, dest: str | os.PathLike[str], size: int) -> Iterator[None]:
        """Refuse a copy of ``size`` bytes that would eat into ``min_free_bytes``; count it meanwhile."""
        reserve = self.endpoint.min_free_bytes
        probe = Path(dest).parent
        while True:  # the directories of a first copy do not exist yet: ask their nearest ancestor
            try:
                st = os.statvfs(probe)
                break
            except (FileNotFoundError, NotADirectoryError):
                if probe.parent == probe:
                    raise
                probe = probe.parent
            except OSError as exc:
                raise Retryable(STORAGE_IO_ERROR, f"statvfs {probe}: {exc.strerror or exc}") from None
        free = st.f_bavail * st.f_frsize
        with self._pending_lock:
            # Bytes already written by the copies in progress are counted twice (in ``free`` and
            # in ``_pending_bytes``): this errs on the side of refusing, never of overshooting.
            left = free - self._pending_bytes - size
            if left < reserve:
                raise Retryable(
                    DISK_FULL,
                    f"copying {size} bytes to {dest} would leave {max(left, 0)} bytes free on "
                    f"{self.name}, below its min_free_bytes {reserve}",
                )
            self._pending_bytes += size
        try:
            yield
        finally:
            with self._pending_lock:
                self._pending_bytes -= size

    def _fill(
        self,
        cancelled: threading.Event,
        src: int,
        dst: int,
        source: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        size: int,
    ) -> None:
        """Copy the source into the temporary file: by the kernel, by read/write where it cannot."""
        # Exactly the expected bytes: a source grown since its fstat still yields a good copy of
        # the catalogued file (the read-back checks it), and a small file needs one call, not two.
        limit = size
        try:
            _kernel_copy(src, dst, limit, cancelled)
            return
        except OSError as exc:
            if exc.errno in _FULL or exc.errno in _NOT_WRITABLE:
                raise _destination_error(exc, dest) from None
            if exc.errno not in _NO_KERNEL_COPY:
                # EIO and the like: copy_file_range does not say which side failed. The read/write
                # loop below does (and a transient error may not recur; the read-back verifies).
                log.info("kernel_copy_failed", storage=self.name, source=str(source), error=str(exc))
        # Carry on where the kernel stopped: copy_file_range advanced both file positions alike.
        try:
            done = os.lseek(dst, 0, os.SEEK_CUR)
        except OSError as exc:
            raise _destination_error(exc, dest) from None
        try:
            os.lseek(src, done, os.SEEK_SET)
        except OSError as exc:
            raise _replica_source_error(exc, source) from None
        buf = _buffer(self.chunk_size)
        view = memoryview(buf)
        while done < limit:
            if cancelled.is_set():
                raise _Aborted()
            try:
                n = os.readv(src, [view[: min(len(buf), limit - done)]])
            except OSError as exc:
                raise _replica_source_error(exc, source) from None
            if n == 0:
                return
            done += n
            chunk = view[:n]
            try:
                while chunk:
                    chunk = chunk[os.write(dst, chunk) :]
            except OSError as exc:
                raise _destination_error(exc, dest) from None

    def _blame(
        self,
        cancelled: threading.Event,
        src: int,
        source: str | os.PathLike[str],
        dest: str | os.PathLike[str],
        size: int,
        adler: str,
        expected_size: int,
        expected_adler32: str,
    ) -> SpoolError:
        """The written copy does not verify: checksum the source to say whose fault it is."""
        try:
            src_size, src_adler = _adler32_fd(src, _buffer(self.chunk_size), cancelled)
        except OSError as exc:
            return _replica_source_error(exc, source)
        if src_size != expected_size or src_adler != expected_adler32:
            return Permanent(
                SOURCE_CORRUPT,
                f"source replica {source} has {src_size} bytes with adler32 {src_adler}, "
                f"expected {expected_size} bytes with adler32 {expected_adler32}",
            )
        got = f"adler32 {adler}" if size == expected_size else f"{size} bytes with adler32 {adler}"
        return Retryable(
            CHECKSUM_MISMATCH,
            f"destination copy of {source} at {dest} has {got}, expected adler32 {expected_adler32}"
            + ("" if size == expected_size else f" and {expected_size} bytes"),
        )

    def checksum_sync(self, cancelled: threading.Event, relpath: str) -> str:
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
                value = _adler32(view[:n], value)
        finally:
            os.close(fd)

    def verify_sync(
        self, cancelled: threading.Event, relpath: str, expected_size: int, expected_adler32: str
    ) -> str | None:
        path = self.resolve(relpath)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return "missing"
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                return "not a regular file"
            raise Retryable(STORAGE_IO_ERROR, f"reading {path}: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                return "not a regular file"
            if st.st_size != expected_size:
                return f"size {st.st_size} != {expected_size}"
            size, adler = _adler32_fd(fd, _buffer(self.chunk_size), cancelled)
        except OSError as exc:
            raise Retryable(STORAGE_IO_ERROR, f"reading {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if size != expected_size:  # changed while being read
            return f"size {size} != {expected_size}"
        if adler != expected_adler32:
            return f"adler32 {adler} != {expected_adler32}"
        return None
