"""The ``posix`` disk backend: a local or mounted directory tree.

A replica may only be declared available once its bytes are known good, and a crash must never
leave a truncated file under a real name. Hence every copy is:

1. streamed through one reused 1 MiB buffer, updating adler32 as each chunk passes (one read of
   the source, no second pass),
2. written to an unnamed file in the destination directory (``O_TMPFILE``; where the file system
   has none, a temporary name ``.<basename>.spool-tmp-<hex>`` there, on the same file system so
   that ``rename`` is atomic, and ``cleanup_temp`` can find it),
3. compared with the expected size and checksum, ``fsync``-ed, then linked under (renamed onto)
   the final name, and the directory is ``fsync``-ed so that survives a power cut.

On any failure the temporary file is removed (an unnamed one frees itself, even on a kill).
Blocking I/O runs in a per-endpoint thread pool so
the event loop stays free and a slow mount cannot starve other endpoints (or the process-wide
default executor, which has only ``cpu + 4`` threads). Cancelling the awaiting task stops the copy
at its next chunk and removes the temporary file before the ``CancelledError`` propagates.

Errors are classified where the ``errno`` is still known: source problems a retry cannot fix are
``Permanent``; anything about the destination (read-only, full, I/O error) is ``Retryable``,
because an operator can fix the endpoint and the work should then simply resume.

Replication (``copy_verified``) copies a replica that already has a catalogued size and checksum
from another disk endpoint. It uses the kernel copy (``copy_file_range``) and then reads the
written temporary file back for adler32 (DESIGN.md section 5: faster than the Python loop, and it
checks what landed). Its reason codes say *which side* is at fault (``SOURCE_REASONS`` versus
``DESTINATION_REASONS``), because the replicator reacts differently: a bad source replica is marked
bad and another source is tried; a destination problem is retried or trips the endpoint's breaker.
With ``fsync=False`` (batch durability) a large copy starts its own writeback once copied, so the
disk writes while the copy is verified and the batch's ``sync()`` has little left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import secrets
import stat as stat_mod
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from common.batching import MicroBatcher
from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import ADLER32_START, CHUNK_SIZE, format_adler32, normalise_adler32
from common.storage.copy_process import CopyProcess, Failed
from common.storage.paths import (
    _DIR_CACHE_MAX,
    DIR_CACHE_SECONDS,
    _realpath,
    is_within,
    real_dir,
    real_parent,
    resolve_inside,
)

T = TypeVar("T")
log = structlog.get_logger("spool.storage")

TEMP_MARKER = ".spool-tmp-"
_TEMP_RE = re.compile(r"\..+\.spool-tmp-[0-9a-f]{12}")
# NAME_MAX is 255 on the usual file systems; keep room for the dot, the marker and the token.
_TEMP_BASENAME_MAX = 200

DEFAULT_IO_THREADS = 8

_NOT_WRITABLE = {errno.EACCES, errno.EROFS, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}

# --- reason codes of copy_verified ---------------------------------------------------------------
# Source side: the replica being copied *from*. Permanent ones mean "this source replica is bad or
# gone, mark it so and pick another"; source_io_error (Retryable) may be a flaky mount.
SOURCE_MISSING = "source_missing"  # Permanent: no file at the source path
SOURCE_CORRUPT = "source_corrupt"  # Permanent: wrong size or checksum, or not a regular file
SOURCE_IO_ERROR = "source_io_error"  # Retryable: the source could not be read
# Destination side: this endpoint. All Retryable: an operator can fix the endpoint.
DESTINATION_NOT_WRITABLE = "destination_not_writable"
DISK_FULL = "disk_full"  # ENOSPC / EDQUOT, or the copy would eat into min_free_bytes
STORAGE_IO_ERROR = "storage_io_error"
CHECKSUM_MISMATCH = "checksum_mismatch"  # the written copy differs from a source that is good
SOURCE_REASONS = frozenset({SOURCE_MISSING, SOURCE_CORRUPT, SOURCE_IO_ERROR})
DESTINATION_REASONS = frozenset({DESTINATION_NOT_WRITABLE, DISK_FULL, STORAGE_IO_ERROR, CHECKSUM_MISMATCH})
# Neither side: the request itself is wrong (Permanent); retrying or another source cannot help.
REQUEST_REASONS = frozenset({"invalid_checksum", "invalid_size", "path_outside_area"})

# copy_file_range cannot copy between these two files (other file system type, old kernel,
# special file): copy the rest with read/write instead. ENOTSUP is EOPNOTSUPP on Linux.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
# Bytes per copy_file_range call: large enough that the syscall count does not matter, small
# enough that a cancelled copy stops within a few milliseconds.
KERNEL_COPY_CHUNK = 16 * 1024 * 1024


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


def resolve_below(root: str | os.PathLike[str], relpath: str | os.PathLike[str], name: str) -> Path:
    """Absolute path of ``relpath`` strictly below the endpoint ``root`` (``PosixStorage.resolve``);
    ``Permanent("path_outside_area")`` if it escapes or names the root."""
    raw = os.fspath(relpath)
    root_text = os.fspath(root)
    if "\x00" not in raw and "\x00" not in root_text:
        # Fast path for the common case, per file: the very string resolve_inside would compute,
        # accepted when it lies strictly below the root, tested on the string instead of by
        # three pathlib constructions (half the cost of resolving, ~15 us a file here). Any
        # other answer goes through resolve_inside, which decides and words the error.
        real_root = real_dir(root_text)
        real = _realpath(os.path.join(real_root, raw))
        if real != real_root and is_within(real, real_root):
            return Path(real)
    path = resolve_inside(Path(root_text), relpath)
    if os.fspath(path) == real_dir(root_text):  # both are normalised real paths
        raise Permanent("path_outside_area", f"path {raw!r} names the root of {name}")
    return path


def _below_parent(root: str | os.PathLike[str], relpath: str) -> str | None:
    """``relpath`` under ``root`` with its directories resolved (cached), its final component as
    written; ``None`` when only the full resolution can say (``..``, a NUL, an escape, the root).

    The answer for the directory part is kept (as long as ``real_dir`` keeps a directory): the
    copy process asks twice per small copy, and the string work was a tenth of a copy's CPU. Kept
    on top of ``real_dir``'s own cache, a directory swapped for a symlink is seen within twice
    ``DIR_CACHE_SECONDS`` (the race ``common.storage.paths`` describes, a few seconds longer).
    """
    cut = relpath.rfind("/") + 1
    prefix, name = relpath[:cut], relpath[cut:]  # "a/b/" and "c"; "/" and "c" (absolute); "" and "c"
    if name in ("", ".", "..") or "\x00" in name:
        return _below_parent_uncached(root, relpath)
    key = (root, prefix)
    now = time.monotonic()
    hit = _parent_cache.get(key)
    if hit is None or hit[0] <= now:
        # The parent's answer does not depend on the final component: asked with a stand-in.
        found = _below_parent_uncached(root, prefix + "x")
        if len(_parent_cache) >= _DIR_CACHE_MAX:
            _parent_cache.clear()
        hit = _parent_cache[key] = (now + DIR_CACHE_SECONDS, None if found is None else found[:-1])
    return None if hit[1] is None else hit[1] + name


# (root, a relpath up to its last "/") -> (expiry, the resolved parent directory + "/", or None).
_parent_cache: dict[tuple[str | os.PathLike[str], str], tuple[float, str | None]] = {}


def _below_parent_uncached(root: str | os.PathLike[str], relpath: str) -> str | None:
    if "\x00" in relpath:
        return None
    real_root = real_dir(os.fspath(root))
    path = real_parent(os.path.join(real_root, relpath))
    if path is None or not is_within(os.path.dirname(path), real_root):
        return None
    return path


def _is_symlink(path: str) -> bool:
    try:
        return stat_mod.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class ReplicaCopy:
    """One copy of ``PosixStorage.copy_verified_many``: a source replica (its endpoint's root and
    its pfn there, resolved by the worker) to ``relpath`` here, with the catalogue's size and
    adler32."""

    source_root: str
    source_pfn: str
    relpath: str
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


# Small operations gathered into one hand-off (``PosixStorage._batched``): named, so that a batch
# can go to the copy process as well as to a worker thread. As many as a bulk request's files
# (``common.placement.BULK``): each hand-off wakes the other side (a pipe write, on a virtual
# machine a costly cross-CPU wake-up) and was a sixth of the event loop's time with 64 a batch
# (10,000 x 64 KiB on tmpfs, the replicator end to end: 10,100-10,700 files/s with 64,
# 10,300-12,200 with 256, in alternate runs).
SMALL_BATCH = 256
# Batches sent to a copy process before the first is answered: enough that the process is not
# left idle while the event loop is busy elsewhere (a rule's page of requests to plan, a
# catalogue write holding the GIL for tens of milliseconds), few enough that a stop does not
# wait long for what is queued: about PIPELINED_BYTES of small copies, at least 2 batches.
# Measured (10,000 x 64 KiB, tmpfs, 64 copies a batch): 2 batches 7,800 files/s, 8-24 batches
# 8,400-8,900; 4 batches of 256 by default now.
PIPELINED_BYTES = 64 * 1024 * 1024
MIN_PIPELINED_BATCHES = 2
_Job = tuple[Callable[..., Any], tuple[Any, ...]]


def run_each(cancelled: threading.Event, jobs: Sequence[_Job]) -> list[Any]:
    """Run a batch's operations one after another; one that raises becomes its own ``Failed``."""
    out: list[Any] = []
    for fn, args in jobs:
        try:
            out.append(fn(cancelled, *args))
        except _Aborted:
            raise  # cancelled: the whole batch stops (each operation removed its temp file)
        except Exception as exc:
            out.append(Failed(exc))
    return out


def _source_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Permanent("file_missing", f"source {path} does not exist")
    if exc.errno == errno.ELOOP:
        return Permanent("not_a_file", f"source {path} is a symbolic link, not a regular file")
    if exc.errno == errno.ENXIO:  # a socket or a device without a driver
        return Permanent("not_a_file", f"source {path} is not a regular file")
    return Retryable("source_io_error", f"reading source {path}: {exc.strerror or exc}")


def _destination_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
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
# Replication copies at least this large, when the caller makes them durable later (fsync=False),
# start their own writeback as soon as the bytes are copied, before the read-back: the disk then
# writes while the CPU checksums, and the caller's batch sync() finds little left to do. Measured
# with 8 x 256 MiB: copies + syncfs took 2.6 s against 3.6 s without (cp -r + sync: 2.8 s).
EARLY_WRITEBACK_BYTES = 8 * 1024 * 1024


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


def _replica_source_error(exc: OSError, path: str | os.PathLike[str]) -> SpoolError:
    """Like ``_source_error``, with reason codes the replicator can tell from destination ones."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Permanent(SOURCE_MISSING, f"source replica {path} does not exist")
    if exc.errno in (errno.ELOOP, errno.ENXIO):  # O_NOFOLLOW on a symlink; a socket or device
        return Permanent(SOURCE_CORRUPT, f"source replica {path} is not a regular file")
    return Retryable(SOURCE_IO_ERROR, f"reading source replica {path}: {exc.strerror or exc}")


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
    view = memoryview(buf)
    value = ADLER32_START
    total = 0
    while True:
        if cancelled.is_set():
            raise _Aborted()
        n = os.preadv(fd, [buf], total)
        if n == 0:
            return total, format_adler32(value)
        value = _adler32(view[:n], value)
        total += n


def _expected_adler32(text: str) -> str:
    try:
        return normalise_adler32(text)
    except ValueError as exc:
        raise Permanent("invalid_checksum", str(exc)) from None


# Where they can, copies are written to an unnamed file (O_TMPFILE) that is linked under its final
# name once complete: the same atomic appearance as a temporary name and a rename, with one
# directory update instead of three (create; rename's removal and insertion), and a process killed
# mid-copy leaves nothing behind (the kernel frees an unlinked inode). Measured on this machine
# class it is no faster per small file (ext4 and tmpfs, within their noise): what it buys is that.
# The link goes through /proc/self/fd (linkat with AT_SYMLINK_FOLLOW needs no privilege;
# AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH). Where the file system (NFS, older kernels) or
# /proc does not allow it: a temporary name and a rename.
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP)
_no_tmpfile_dirs: set[str] = set()  # directories where O_TMPFILE was refused (bounded below)
_proc_fd_dir: int | None = None  # descriptor of this process's /proc/self/fd (-1: none)
_proc_lock = threading.Lock()


def _proc_fds() -> int | None:
    """A descriptor of this process's /proc/self/fd, opened on first use."""
    global _proc_fd_dir
    if _proc_fd_dir is None:
        with _proc_lock:
            if _proc_fd_dir is None:
                try:
                    _proc_fd_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    _proc_fd_dir = -1
    return _proc_fd_dir if _proc_fd_dir >= 0 else None


def _forget_proc_fds() -> None:
    global _proc_fd_dir
    _proc_fd_dir = None  # a forked child's /proc/self is not its parent's (the descriptor is)


os.register_at_fork(after_in_child=_forget_proc_fds)


def _link_unnamed(fd: int, to: str) -> None:
    """Give the unnamed file open as ``fd`` the name ``to`` (``FileExistsError`` if taken)."""
    os.link(str(fd), to, src_dir_fd=_proc_fds(), follow_symlinks=True)


class _TempFile:
    """The file a copy is written to before it appears under its final name ``dest``.

    Unnamed (O_TMPFILE, see above) where the file system allows, else a temporary name next to
    ``dest`` (``path``). ``commit`` makes it durable (optionally) and puts it at ``dest``
    atomically: by linking the unnamed file there, or through a temporary name renamed onto
    ``dest`` when a file exists there already or no unnamed file could be made. ``discard`` closes
    it and removes any temporary name. Every copy method goes through this one class, so the
    crash-safety rules of the module docstring (same directory, atomic appearance, directory
    fsync, nothing left on failure) are written once.
    """

    __slots__ = ("created", "dest", "fd", "parent", "path")

    def __init__(self, dest: str | os.PathLike[str], flags: int) -> None:
        # Strings, not Paths: built for every file, and pathlib's parsing showed in profiles.
        self.dest = dest = os.fspath(dest)
        self.created: list[Path] = []
        self.parent = parent = os.path.dirname(dest)
        self.path: str | None = None  # the temporary name, when there is one
        self.fd: int | None = None
        try:
            # Optimistically: the directory usually exists (a night's files share a few), and
            # asking first would cost a stat per file. ENOENT says a directory is missing.
            self._open(flags)
            return
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _destination_error(exc, self.where) from None
        try:
            self.created = _makedirs(Path(parent))
        except OSError as exc:
            raise _destination_error(exc, parent) from None
        try:
            self._open(flags)
        except OSError as exc:
            raise _destination_error(exc, self.where) from None

    @property
    def where(self) -> str:
        """The file being written, for messages."""
        return self.path or os.path.join(self.parent, "(unnamed file)")

    def _open(self, flags: int) -> None:
        if _O_TMPFILE and self.parent not in _no_tmpfile_dirs and _proc_fds() is not None:
            try:
                self.fd = os.open(self.parent, flags | _O_TMPFILE | os.O_CLOEXEC, 0o644)
                return
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise
                if len(_no_tmpfile_dirs) > 4096:
                    _no_tmpfile_dirs.clear()
                _no_tmpfile_dirs.add(self.parent)
        self.path = os.path.join(self.parent, temp_name_for(os.path.basename(self.dest)))
        self.fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def commit(self, fsync: bool) -> None:
        fd = self.fd
        assert fd is not None, "temporary file already closed"
        try:
            if fsync:
                os.fsync(fd)
            if self.path is None:
                try:
                    _link_unnamed(fd, self.dest)
                except FileExistsError:  # replacing a file: rename is the atomic way
                    self.path = os.path.join(self.parent, temp_name_for(os.path.basename(self.dest)))
                    _link_unnamed(fd, self.path)
                    os.rename(self.path, self.dest)
                self.fd = None
                os.close(fd)
            else:
                self.fd = None
                os.close(fd)  # network file systems report deferred write errors here
                os.rename(self.path, self.dest)
            if fsync:
                _fsync_dir(Path(self.parent))
                for parent in {d.parent for d in self.created}:
                    _fsync_dir(parent)
        except OSError as exc:
            raise _destination_error(exc, self.dest) from None

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):  # the error being handled matters more
                os.close(fd)  # an unnamed file is freed by the kernel here
        if self.path is not None:
            # Fails only if already renamed or the directory vanished; cleanup_temp gets the rest.
            with contextlib.suppress(OSError):
                os.unlink(self.path)


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
        self._small: MicroBatcher[tuple[str, tuple[Any, ...]], Any] | None = None
        # small_copies = "process": ``copy_processes`` of them, each started on first use.
        self._copiers: list[CopyProcess] = []
        # The operations a batch of small ones may hold, by the name a batch (and the copy
        # process, which runs this same table on its own instance) knows them by.
        self.small_operations: dict[str, Callable[..., Any]] = {
            "copy": self._copy_sync,
            "replicate": self._replicate_sync,
            "replicate_from": self._replicate_from_sync,
            "verify": self._verify_sync,
        }
        # Set by a caller limiting concurrent transfers to this endpoint (the replicator's
        # max_transfers): a batch of small operations, run one after another, holds one slot.
        self.transfer_slots: asyncio.Semaphore | None = None
        # Bytes announced by copy_verified calls in progress: they count against min_free_bytes
        # before they are written (several copies checking free space at once would overshoot).
        self._pending_bytes = 0
        self._pending_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PosixStorage({self.name!r}, root={str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------
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

    # --- copying -------------------------------------------------------------------------------
    async def put_from(
        self,
        source: str | os.PathLike[str],
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
        path = os.fspath(source)
        if expected_size is not None and self.batches_copy(expected_size, fsync):
            # Small and announced as small: copied with others in one hand-off (see ``_batched``).
            # A file larger than announced fails its size check right after fstat.
            return await self._batched("copy", path, relpath, expected_size, expected, fsync)
        return await self._in_thread(self._copy_sync, path, relpath, expected_size, expected, fsync)

    def _copy_sync(
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

    # --- replication -------------------------------------------------------------------------
    async def copy_verified(
        self,
        source: Path,
        relpath: str,
        *,
        expected_size: int,
        expected_adler32: str,
        fsync: bool = True,
    ) -> CopyResult:
        """Copy a replica from another disk endpoint to ``relpath`` here, verified, atomically.

        ``source`` is the absolute, already resolved path of a replica whose size and adler32 are
        known (the catalogue's). The bytes are copied by the kernel (``copy_file_range``; read/write
        where it cannot), then the written temporary file is read back and its size and adler32
        compared with the expected ones; only then is it fsync-ed (``fsync=True``, else the caller
        makes a batch durable with ``sync()``) and renamed onto ``relpath``, replacing any file
        there. Nothing is left under a temporary name on failure or cancellation.

        Copies run in the endpoint's worker threads (cancelling stops them at the next chunk);
        small ones (``batch_copy_bytes``) not fsync-ed go several to one hand-off (the endpoint's
        copy process by default), as ``put_from``'s do.
        With ``fsync=False`` a copy of ``EARLY_WRITEBACK_BYTES`` or more starts its own writeback.

        Errors (``SpoolError``; the reason says which side is at fault, see ``SOURCE_REASONS`` and
        ``DESTINATION_REASONS``):

        - ``Permanent("source_missing")``: no file at ``source``.
        - ``Permanent("source_corrupt")``: the source's size or adler32 is not the expected one, or
          it is not a regular file. When the written copy does not verify, the source is
          checksummed to tell this case from the next one.
        - ``Retryable("source_io_error")``: the source could not be read.
        - ``Retryable("checksum_mismatch")``: the source is good but the copy written here is not.
        - ``Retryable("disk_full")``: ENOSPC / EDQUOT, or the copy would leave less than the
          endpoint's ``min_free_bytes`` free (checked before writing).
        - ``Retryable("destination_not_writable")``, ``Retryable("storage_io_error")``: as for
          ``put_from``.
        - ``Permanent`` ``invalid_checksum``, ``invalid_size``, ``path_outside_area``: the request
          itself is wrong (``REQUEST_REASONS``).
        """
        expected = _expected_adler32(expected_adler32)
        if not isinstance(source, Path):
            source = Path(source)
        if expected_size < 0:
            raise Permanent("invalid_size", f"expected size {expected_size} is negative")
        if self.batches_copy(expected_size, fsync):
            return await self._batched("replicate", source, relpath, expected_size, expected, fsync)
        return await self._in_thread(self._replicate_sync, source, relpath, expected_size, expected, fsync)

    async def copy_verified_many(self, copies: Sequence[ReplicaCopy]) -> list[CopyResult | SpoolError]:
        """``copy_verified`` (``fsync=False``) of many small copies at once, for a bulk request.

        Every copy must be one ``batches_copy`` accepts (small, no fsync): they join the batches
        of small operations together, one await for all. Each outcome is the ``CopyResult`` or
        the ``SpoolError`` that ``copy_verified`` would have raised, in order; nothing raises for
        one copy. The source path is resolved in the worker, off the event loop (a ``lstat`` per
        file); a pfn escaping its endpoint's root is ``source_corrupt``, that replica unusable.
        """
        jobs: list[tuple[str, tuple[Any, ...]]] = []
        for c in copies:
            if not self.batches_copy(c.size, False):
                raise ValueError(f"{c.relpath}: {c.size} bytes is not a small copy of {self.name}")
            adler32 = _expected_adler32(c.adler32)
            jobs.append(("replicate_from", (c.source_root, c.source_pfn, c.relpath, c.size, adler32)))
        outcomes = await self._batched_many(jobs)
        return [o.error if isinstance(o, Failed) else o for o in outcomes]  # type: ignore[misc]

    def _replicate_from_sync(
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

    def _replicate_sync(
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
        try:
            # O_NONBLOCK: a FIFO planted at the source path must not hang the open.
            src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _replica_source_error(exc, source) from None
        try:
            try:
                st = os.fstat(src)
            except OSError as exc:
                raise _replica_source_error(exc, source) from None
            if not stat_mod.S_ISREG(st.st_mode):
                raise Permanent(SOURCE_CORRUPT, f"source replica {source} is not a regular file")
            if st.st_size != expected_size:
                raise Permanent(
                    SOURCE_CORRUPT,
                    f"source replica {source} has {st.st_size} bytes, expected {expected_size}",
                )
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
                value = _adler32(view[:n], value)
        finally:
            os.close(fd)

    async def verify(self, relpath: str, *, expected_size: int, expected_adler32: str) -> str | None:
        """None when the file at ``relpath`` has the expected size and adler32, else what is wrong.

        The answer is a short description for logs and messages: ``"missing"``, ``"not a regular
        file"``, ``"size 12 != 34"`` (found != expected), ``"adler32 0a1b2c3d != 00000001"``. The
        size is compared first and the file only read when it matches. Used on a redelivered copy
        request to check a replica a previous attempt may already have made. Raises
        ``Retryable("storage_io_error")`` when the file cannot be read (nothing can be concluded)
        and ``Permanent`` for a malformed checksum or a path outside the endpoint.
        """
        expected = _expected_adler32(expected_adler32)
        if expected_size <= self.endpoint.batch_copy_bytes:
            return await self._batched("verify", relpath, expected_size, expected)
        return await self._in_thread(self._verify_sync, relpath, expected_size, expected)

    def _verify_sync(
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
    async def _batched(self, op: str, *args: object) -> Any:
        """Run the small operation ``op`` (``"copy"``, ``"replicate"``, ``"verify"``) in a batch.

        Why: a 1 KiB copy is a dozen system calls, and file creation on a busy ext4 took 0.1-0.3 ms
        of them. Run on the event loop (as small copies once were), that kernel time stopped the
        daemon's only Python thread; handed over one by one, the hand-offs cost as much as the
        copy. Gathered (every operation submitted while the previous batch runs goes in the next
        one), the kernel work runs beside the event loop for one hand-off per batch: to the
        endpoint's copy process (``small_copies = "process"``, see ``copy_process``), or to a
        worker thread (``"thread"``), which must take the GIL back after every system call.
        """
        outcome = await self._small_batcher().submit((op, args))
        if isinstance(outcome, Failed):
            raise outcome.error
        return outcome

    async def _batched_many(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """``_batched`` of many operations at once; outcomes (values or ``Failed``) in order."""
        if not jobs:
            return []
        return await self._small_batcher().submit_many(jobs)

    def _small_batcher(self) -> MicroBatcher[tuple[str, tuple[Any, ...]], Any]:
        if self._small is None:
            # The copy process serves batches in order: those sent ahead keep it busy.
            # Worker threads would run two at once, and fight the event loop for the GIL.
            process = self.endpoint.small_copies == "process"
            pipelined = self.pipelined_batches() * self.endpoint.copy_processes if process else 1
            self._small = MicroBatcher(
                self._run_small, max_size=SMALL_BATCH, max_wait=0, concurrency=pipelined
            )
        return self._small

    def pipelined_batches(self) -> int:
        """Batches of small copies one copy process is sent ahead (see ``PIPELINED_BYTES``)."""
        batch_bytes = SMALL_BATCH * max(1, self.endpoint.batch_copy_bytes)
        return max(MIN_PIPELINED_BATCHES, PIPELINED_BYTES // batch_bytes)

    def batches_copy(self, size: int, fsync: bool) -> bool:
        """Whether a copy of ``size`` bytes goes in a batch of small operations. Not with
        fsync: each fsync takes milliseconds, and a batch would hold every copy behind all of them."""
        return not fsync and size <= self.endpoint.batch_copy_bytes

    async def _run_small(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        if self.transfer_slots is None:
            return await self._run_batch(jobs)
        async with self.transfer_slots:
            return await self._run_batch(jobs)

    async def _run_batch(self, jobs: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        if self.endpoint.small_copies == "process":
            return await self._least_busy_copier().run(jobs)
        ops = self.small_operations
        return await self._in_thread(run_each, [(ops[op], args) for op, args in jobs])

    async def start_copy_process(self) -> None:
        """Start the endpoint's first copy process now rather than on its first batch of small
        copies (``small_copies = "process"``; nothing otherwise): a daemon calls it at start-up.
        Returns once it is running (at once if it was; after a start in progress, if one was).

        Why: the process imports the configuration and storage modules, about 0.25 s of CPU here,
        and the first batch waited that out. In a run of 10,000 small copies (1.3 s) that was a
        sixth of the time. A start that fails is logged, not raised: the first batch tries again,
        and its copies fail (retryably) if the process still cannot run.
        """
        if self.endpoint.small_copies != "process":
            return
        if not self._copiers:
            self._copiers.append(CopyProcess(self.name, self.endpoint, self.chunk_size))
        copier = self._copiers[0]
        try:
            await copier.start()
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.warning("copy_process_start_failed", storage=self.name, error=f"{type(exc).__name__}: {exc}")
            copier.close()

    def _least_busy_copier(self) -> CopyProcess:
        """The copy process with the fewest batches in its pipe (a new one while fewer than
        ``copy_processes`` run and every one has work)."""
        idle = min(self._copiers, key=lambda c: c.in_flight, default=None)
        if idle is not None and (idle.in_flight == 0 or len(self._copiers) >= self.endpoint.copy_processes):
            return idle
        copier = CopyProcess(self.name, self.endpoint, self.chunk_size)
        self._copiers.append(copier)
        return copier

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
        """Stop the worker threads and the copy process (waits for running operations). The object
        stays usable: both start again on demand."""
        self._small = None  # bound to the event loop that made it
        for copier in self._copiers:
            copier.close()
        self._copiers = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
