"""The copy engine: the blocking work of one verified copy (or check) on a posix endpoint.

A replica may only be declared available once its bytes are known good, and a crash must never
leave a truncated file under a real name. Hence every copy is:

1. streamed through one reused 1 MiB buffer, updating adler32 and sha256 as each chunk passes
   (one read of the source, no second pass),
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
section 5: faster than the Python loop, and it checks what landed), and for sha256 in the same
pass when the catalogue has one (a source altered under an unchanged adler32 is then
``source_corrupt``). Its reason codes say *which
side* is at fault (``reasons.SOURCE_REASONS`` versus ``reasons.DESTINATION_REASONS``). With
``fsync=False`` (batch durability) a large copy starts its own writeback once copied, so the disk
writes while the copy is verified and the batch's ``sync()`` has little left to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from common.errors import Permanent, Retryable, SpoolError
from common.storage import confined
from common.storage.checksum import ADLER32_START, format_adler32
from common.storage.kernel import (
    _NO_KERNEL_COPY,
    _SYNC_FILE_RANGE,
    _SYNC_FILE_RANGE_WRITE,
    _Aborted,
    _adler32,
    _buffer,
    _kernel_copy,
    _sums_fd,
)
from common.storage.paths import below, real_root
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
from common.storage.tempfiles import (
    _O_TMPFILE,
    _link_unnamed,
    _no_tmpfile_dirs,
    _proc_fds,
    _TempFile,
)

log = structlog.get_logger("spool.storage")

# Replication copies at least this large, when the caller makes them durable later (fsync=False),
# start their own writeback as soon as the bytes are copied, before the read-back: the disk then
# writes while the CPU checksums, and the caller's batch sync() finds little left to do
# (figures: docs/decisions.md#storage-batch-sizes-and-early-writeback).
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
    # 64 lower-case hex digits: computed by an ingest copy (the same pass as adler32), and by a
    # replication copy that was given the catalogue's sha256 to check; else None.
    sha256: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location)


def _open_replica(source: str, expected_size: int, rel: str | None = None) -> int:
    """The descriptor of a source replica that is a regular file of the expected size; its
    failures are the source's (``_replica_source_error``, ``source_corrupt``). ``source`` is the
    replica's absolute path, or (with ``rel``) its endpoint's root and ``rel`` beneath it; either
    way no symlink is followed at any component and the open does not block (``confined``)."""
    try:
        if rel is None:
            src, st = confined.open_regular(source)
        else:
            src, st = confined.open_regular_beneath(source, rel)
    except confined.NotARegularFile as exc:
        raise Permanent(
            SOURCE_CORRUPT, f"source replica {source} is {exc.what}, not a regular file"
        ) from None
    except OSError as exc:
        raise _replica_source_error(exc, source if rel is None else f"{source}/{rel}") from None
    if st.st_size != expected_size:
        os.close(src)
        raise Permanent(
            SOURCE_CORRUPT, f"source replica {source} has {st.st_size} bytes, expected {expected_size}"
        )
    return src


def _open_source(source: str) -> tuple[int, os.stat_result]:
    """An ingest source (a landing-area file, absolute), opened as ``confined.open_regular``:
    ``not_a_file`` for a FIFO and the like, ``path_outside_area`` for a symlink on the path."""
    try:
        return confined.open_regular(source)
    except confined.NotARegularFile as exc:
        raise Permanent("not_a_file", f"source {source} is {exc.what}, not a regular file") from None
    except OSError as exc:
        raise _source_error(exc, source) from None


class EngineEndpoint(Protocol):
    """What the engine reads of an endpoint's settings (a ``StorageEndpoint`` in the daemon; in the
    copy process a plain record of these two, so that process does not import pydantic)."""

    @property
    def root(self) -> Path: ...

    @property
    def min_free_bytes(self) -> int: ...


class CopyEngine:
    """The copies and checks of one endpoint (``name``, rooted at ``endpoint.root``), blocking.

    ``operations`` are the small operations a batch may hold, by the name a batch (and the copy
    process, which runs this same table on its own engine) knows them by. ``min_free_bytes`` is
    accounted per engine: copies in progress count against it before they are written.
    """

    def __init__(self, name: str, endpoint: EngineEndpoint, chunk_size: int) -> None:
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

    @property
    def real_root(self) -> str:
        """The root's real path (resolved once: the operator's path)."""
        return real_root(self.root)

    def below(self, relpath: str | os.PathLike[str]) -> str:
        """``relpath`` as a clean path strictly below the root (``paths.below``)."""
        return below(self.root, relpath, self.name)

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relpath`` inside the root; ``Permanent`` if it escapes or is the root.
        A name only: opens go through ``confined``, which refuses symlinks on the path."""
        return Path(self.real_root + "/" + self.below(relpath))

    def pfn_of(self, path: str | os.PathLike[str]) -> str:
        """The path of a resolved ``path`` relative to the endpoint root, as stored in the catalogue."""
        root = self.real_root
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
        expected_sha256: str | None = None,
    ) -> CopyResult:
        # Opened here, not on the event loop: on a hung network mount even an open blocks.
        rel = self.below(relpath)
        src, st = _open_source(source)
        try:
            if expected_size is not None and st.st_size != expected_size:
                raise Permanent(
                    "size_mismatch", f"source {source} has {st.st_size} bytes, expected {expected_size}"
                )
            if st.st_size > self.chunk_size:  # a hint (larger read-ahead), worth its syscall beyond one read
                with contextlib.suppress(AttributeError, OSError):
                    os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            size, adler, sha = self._stream_to(
                cancelled, src, source, rel, expected_size, expected_adler32, expected_sha256, fsync
            )
        finally:
            os.close(src)
        return CopyResult(pfn=rel, location=self.real_root + "/" + rel, size=size, adler32=adler, sha256=sha)

    def _stream_to(
        self,
        cancelled: threading.Event,
        src: int,
        source: str,
        rel: str,
        expected_size: int | None,
        expected_adler32: str | None,
        expected_sha256: str | None,
        fsync: bool,
    ) -> tuple[int, str, str]:
        """Stream ``src`` into a new file at ``rel``; the one read of the source feeds adler32 and
        sha256 alike (the same buffer, no second pass)."""
        tmp = _TempFile(self.real_root, rel, os.O_WRONLY)
        dest = tmp.dest
        assert tmp.fd is not None
        dst = tmp.fd
        try:
            buf = _buffer(self.chunk_size)
            view = memoryview(buf)
            value = ADLER32_START
            digest = hashlib.sha256()
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
                digest.update(chunk)
                try:
                    while chunk:
                        chunk = chunk[os.write(dst, chunk) :]
                except OSError as exc:
                    raise _destination_error(exc, dest) from None
            adler = format_adler32(value)
            sha = digest.hexdigest()
            if expected_size is not None and total != expected_size:
                raise Permanent(
                    "size_mismatch", f"source {source} has {total} bytes, expected {expected_size}"
                )
            if expected_adler32 is not None and adler != expected_adler32:
                raise Permanent(
                    "checksum_mismatch",
                    f"source {source} has adler32 {adler}, expected {expected_adler32}",
                )
            if expected_sha256 is not None and sha != expected_sha256:
                raise Permanent(
                    "checksum_mismatch", f"source {source} has sha256 {sha}, expected {expected_sha256}"
                )
            tmp.commit(fsync)
            return total, adler, sha
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
        expected_sha256: str | None = None,
    ) -> CopyResult:
        """A bulk request's copy: the source opened beneath its endpoint's root (``source_root``),
        the destination beneath this one's, neither through a symlink (``confined``)."""
        src = self._open_source_replica(source_root, source_pfn, expected_size)
        source = f"{source_root}/{source_pfn}"
        try:
            rel = self.below(relpath)
            made = self._replicate_plainly(
                cancelled, src, rel, expected_size, expected_adler32, expected_sha256
            )
            if made is not None:
                return made
            os.lseek(src, 0, os.SEEK_SET)  # the careful way starts again from the first byte
            return self._replicate_fd(
                cancelled, src, source, rel, expected_size, expected_adler32, False, expected_sha256
            )
        finally:
            os.close(src)

    def _replicate_plainly(
        self, cancelled: threading.Event, src: int, rel: str, size: int, adler32: str, sha256: str | None
    ) -> CopyResult | None:
        """The copy of ``_replicate_fd`` when all goes well, in the fewest steps: a new unnamed
        file, one kernel copy, one read-back, one link; ``None`` as soon as anything is not plain
        (an error, a mismatch, a file already at ``rel``, a missing directory, no unnamed files,
        a reserve to keep), and the caller makes the copy the careful way, which says what is
        wrong. Nothing is left behind by an attempt given up: the unnamed file goes with its
        descriptor (the caller rewinds ``src`` for the careful way).

        Why: most of the copy process's time is its system calls, but a fifth was the Python
        around them (per small file, tens of microseconds of calls, checks and objects).
        """
        buf = _buffer(self.chunk_size)
        if not _O_TMPFILE or _proc_fds() is None or size > len(buf) or self.endpoint.min_free_bytes > 0:
            return None
        root = self.real_root
        if os.path.dirname(root + "/" + rel) in _no_tmpfile_dirs:
            return None
        try:
            parent = confined.parent_of(root, rel)
        except OSError:
            return None
        try:
            tmp = os.open(".", os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o644, dir_fd=parent.fd)
            try:
                if size and _kernel_copy(src, tmp, size, cancelled) != size:
                    return None
                if os.preadv(tmp, [buf], 0) != size:
                    return None
                if format_adler32(_adler32(memoryview(buf)[:size], ADLER32_START)) != adler32:
                    return None
                if sha256 is not None and hashlib.sha256(memoryview(buf)[:size]).hexdigest() != sha256:
                    return None
                _link_unnamed(tmp, parent.name, parent.fd)
            finally:
                os.close(tmp)
        except OSError:
            return None
        finally:
            parent.close()
        return CopyResult(pfn=rel, location=root + "/" + rel, size=size, adler32=adler32, sha256=sha256)

    @staticmethod
    def _open_source_replica(source_root: str, source_pfn: str, expected_size: int) -> int:
        """A source replica named by its endpoint's root and pfn, opened beneath that root; a pfn
        escaping it (the catalogue's!) is ``source_corrupt``: that copy is unusable."""
        try:
            rel = below(source_root, source_pfn, "its source endpoint")
        except Permanent as err:
            raise Permanent(SOURCE_CORRUPT, f"source replica {source_pfn!r}: {err.message}") from None
        return _open_replica(real_root(source_root), expected_size, rel)

    def replicate_sync(
        self,
        cancelled: threading.Event,
        source: str | os.PathLike[str],
        relpath: str,
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
        expected_sha256: str | None = None,
    ) -> CopyResult:
        """Copy the replica at the absolute path ``source`` (another endpoint's ``resolve``) to
        ``relpath`` here; both opened with no symlink followed (``confined``). With
        ``expected_sha256`` (the catalogue's) the read-back checks sha256 too."""
        rel = self.below(relpath)
        text = os.fspath(source)
        src = _open_replica(text, expected_size)
        try:
            return self._replicate_fd(
                cancelled, src, text, rel, expected_size, expected_adler32, fsync, expected_sha256
            )
        finally:
            os.close(src)

    def _replicate_fd(
        self,
        cancelled: threading.Event,
        src: int,
        source: str,
        rel: str,
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
        expected_sha256: str | None = None,
    ) -> CopyResult:
        if expected_size > self.chunk_size:  # a hint, worth its syscall beyond one read
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        root = self.real_root
        args = (cancelled, src, source, root, rel, expected_size, expected_adler32, fsync, expected_sha256)
        if self.endpoint.min_free_bytes > 0:
            with self._reserve(root + "/" + rel, expected_size):
                self._copy_and_check(*args)
        else:
            self._copy_and_check(*args)
        return CopyResult(
            pfn=rel,
            location=root + "/" + rel,
            size=expected_size,
            adler32=expected_adler32,
            sha256=expected_sha256,
        )

    def pull_sync(
        self,
        cancelled: threading.Event,
        source_root: str,
        source_pfn: str,
        relpath: str,
        expected_size: int,
        expected_adler32: str,
        expected_sha256: str | None = None,
    ) -> CopyResult:
        """``replicate_sync`` (fsync-ed) of another posix endpoint's file, opened beneath its root
        (``PosixStorage.copy_from``); a pfn escaping its root is ``source_corrupt``."""
        rel = self.below(relpath)
        src = self._open_source_replica(source_root, source_pfn, expected_size)
        try:
            source = f"{source_root}/{source_pfn}"
            return self._replicate_fd(
                cancelled, src, source, rel, expected_size, expected_adler32, True, expected_sha256
            )
        finally:
            os.close(src)

    def download_sync(
        self,
        cancelled: threading.Event,
        relpath: str,
        local: str,
        expected_size: int,
        expected_adler32: str,
        expected_sha256: str | None = None,
    ) -> None:
        """Copy the file at ``relpath`` here to ``local``, a path anywhere on this node, as
        ``replicate_sync`` copies (kernel copy, read-back, atomic, fsync-ed), this endpoint being
        the source: its reason codes are the source's. ``min_free_bytes`` (this endpoint's
        reserve) does not apply to a file written elsewhere. ``local`` is the daemon's own path
        (its directory is not followed if a symlink, its parents are the operator's)."""
        rel = self.below(relpath)
        src = _open_replica(self.real_root, expected_size, rel)
        local = os.path.join(
            os.path.realpath(os.path.dirname(os.path.abspath(local))), os.path.basename(local)
        )
        try:
            self._copy_and_check(
                cancelled, src, self.real_root + "/" + rel, os.path.dirname(local),
                os.path.basename(local), expected_size, expected_adler32, True, expected_sha256,
            )  # fmt: skip
        finally:
            os.close(src)

    def _copy_and_check(
        self,
        cancelled: threading.Event,
        src: int,
        source: str | os.PathLike[str],
        droot: str,
        drel: str,
        expected_size: int,
        expected_adler32: str,
        fsync: bool,
        expected_sha256: str | None = None,
    ) -> None:
        # O_RDWR: the same descriptor reads the copy back, without a second open.
        tmp = _TempFile(droot, drel, os.O_RDWR)
        dest = tmp.dest
        try:
            assert tmp.fd is not None
            self._fill(cancelled, src, tmp.fd, source, dest, expected_size)
            if not fsync and expected_size >= EARLY_WRITEBACK_BYTES and _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(tmp.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
            want_sha = expected_sha256 is not None
            try:
                size, adler, sha = _sums_fd(tmp.fd, _buffer(self.chunk_size), cancelled, want_sha)
            except OSError as exc:
                raise _destination_error(exc, tmp.where) from None
            if size != expected_size or adler != expected_adler32 or sha != expected_sha256:
                raise self._blame(
                    cancelled, src, source, dest, (size, adler, sha), expected_size, expected_adler32,
                    expected_sha256,
                )  # fmt: skip
            tmp.commit(fsync)
        except BaseException:
            tmp.discard()
            raise

    @contextlib.contextmanager
    def _reserve(self, dest: str | os.PathLike[str], size: int) -> Iterator[None]:
        """Refuse a copy of ``size`` bytes that would eat into ``min_free_bytes``; count it meanwhile."""
        reserve = self.endpoint.min_free_bytes
        probe = self.real_root  # the endpoint's file system (statvfs of the root, followed by nothing below)
        try:
            st = os.statvfs(probe)
        except FileNotFoundError:
            st = os.statvfs(os.path.dirname(probe) or "/")  # a first copy creates the root
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
        found: tuple[int, str, str | None],
        expected_size: int,
        expected_adler32: str,
        expected_sha256: str | None,
    ) -> SpoolError:
        """The written copy does not verify: checksum the source to say whose fault it is."""
        size, adler, sha = found
        want_sha = expected_sha256 is not None
        try:
            src_size, src_adler, src_sha = _sums_fd(src, _buffer(self.chunk_size), cancelled, want_sha)
        except OSError as exc:
            return _replica_source_error(exc, source)
        if src_size != expected_size or src_adler != expected_adler32:
            return Permanent(
                SOURCE_CORRUPT,
                f"source replica {source} has {src_size} bytes with adler32 {src_adler}, "
                f"expected {expected_size} bytes with adler32 {expected_adler32}",
            )
        if src_sha != expected_sha256:
            # Same size and adler32, other bytes: only the strong checksum sees it.
            return Permanent(
                SOURCE_CORRUPT,
                f"source replica {source} has sha256 {src_sha}, expected {expected_sha256}"
                " (its size and adler32 match: altered bytes adler32 does not see)",
            )
        if size == expected_size and adler == expected_adler32:
            return Retryable(
                CHECKSUM_MISMATCH,
                f"destination copy of {source} at {dest} has sha256 {sha}, expected {expected_sha256}",
            )
        got = f"adler32 {adler}" if size == expected_size else f"{size} bytes with adler32 {adler}"
        return Retryable(
            CHECKSUM_MISMATCH,
            f"destination copy of {source} at {dest} has {got}, expected adler32 {expected_adler32}"
            + ("" if size == expected_size else f" and {expected_size} bytes"),
        )

    def checksum_sync(self, cancelled: threading.Event, relpath: str) -> str:
        rel = self.below(relpath)
        path = self.real_root + "/" + rel
        try:
            fd, _st = confined.open_regular_beneath(self.real_root, rel)
        except confined.NotARegularFile as exc:
            raise Permanent(
                "not_a_file", f"{path} on {self.name} is {exc.what}, not a regular file"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise Permanent("file_missing", f"{path} does not exist on {self.name}") from None
            if confined.is_refused(exc):
                raise Permanent(
                    "path_outside_area", f"{path} on {self.name}: a symbolic link on the path"
                ) from None
            raise Retryable("storage_io_error", f"reading {path}: {exc.strerror or exc}") from None
        try:
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
        self,
        cancelled: threading.Event,
        relpath: str,
        expected_size: int,
        expected_adler32: str,
        expected_sha256: str | None = None,
    ) -> str | None:
        rel = self.below(relpath)
        path = self.real_root + "/" + rel
        try:
            fd, st = confined.open_regular_beneath(self.real_root, rel)
        except confined.NotARegularFile:
            return "not a regular file"
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return "missing"
            if confined.is_refused(exc):
                return "not a regular file (a symbolic link on the path)"
            raise Retryable(STORAGE_IO_ERROR, f"reading {path}: {exc.strerror or exc}") from None
        try:
            if st.st_size != expected_size:
                return f"size {st.st_size} != {expected_size}"
            size, adler, sha = _sums_fd(fd, _buffer(self.chunk_size), cancelled, expected_sha256 is not None)
        except OSError as exc:
            raise Retryable(STORAGE_IO_ERROR, f"reading {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if size != expected_size:  # changed while being read
            return f"size {size} != {expected_size}"
        if adler != expected_adler32:
            return f"adler32 {adler} != {expected_adler32}"
        if sha != expected_sha256:
            return f"sha256 {sha} != {expected_sha256}"
        return None
