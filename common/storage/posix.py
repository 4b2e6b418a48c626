"""The ``posix`` disk backend: a local or mounted directory tree (``PosixStorage``).

This module is the backend's asynchronous face and its plumbing; the work lives in modules of
their own, each with one job:

- ``copy_engine``: the blocking work of one verified, atomic copy or check (``CopyEngine``),
- ``tempfiles``: where a copy is written before it has its final name,
- ``kernel``: the kernel calls the copies make (``copy_file_range``, ``syncfs``, the read-back),
- ``paths``: naming a ``relpath`` below the root (lexically),
- ``confined``: opening, creating, deleting beneath the root with no symlink followed,
- ``reasons``: the reason codes and how an ``errno`` maps to them,
- ``copy_process``: the helper process that runs batches of small copies.

Blocking I/O runs in a per-endpoint thread pool so the event loop stays free and a slow mount
cannot starve other endpoints (or the process-wide default executor, which has only ``cpu + 4``
threads). Cancelling the awaiting task stops the copy at its next chunk and removes the temporary
file before the ``CancelledError`` propagates. Small copies without fsync go several to one
hand-off (``_batched``): to the endpoint's copy process, or to a worker thread.

Errors are classified where the ``errno`` is still known: source problems a retry cannot fix are
``Permanent``; anything about the destination (read-only, full, I/O error) is ``Retryable``,
because an operator can fix the endpoint and the work should then simply resume. Replication's
reason codes say which side is at fault (``reasons.SOURCE_REASONS`` /
``reasons.DESTINATION_REASONS``), because the replicator reacts differently: a bad source replica
is marked bad and another source is tried; a destination problem is retried or trips the
endpoint's breaker.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat as stat_mod
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from common.batching import MicroBatcher
from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage import confined
from common.storage.checksum import CHUNK_SIZE, normalise_adler32
from common.storage.copy_engine import CopyEngine, CopyResult
from common.storage.copy_process import CopyProcess, Failed, run_each
from common.storage.interface import CopyDone, ListedFile, ObjectStat, StorageBackend
from common.storage.kernel import _adler32_fd, _buffer, _sync_root
from common.storage.paths import is_within
from common.storage.reasons import STORAGE_IO_ERROR, _destination_error, _replica_source_error
from common.storage.reasons import expected_adler32 as _expected_adler32
from common.storage.reasons import expected_sha256 as _expected_sha256
from common.storage.tempfiles import destination_refused, is_temp_name

T = TypeVar("T")
log = structlog.get_logger("spool.storage")

DEFAULT_IO_THREADS = 8


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
    # The catalogue's sha256, checked on the read-back too when known.
    sha256: str | None = None


# Small operations gathered into one hand-off (``PosixStorage._batched``): named, so that a batch
# can go to the copy process as well as to a worker thread. As many as a bulk request's files
# (``common.placement.BULK``): each hand-off wakes the other side (a pipe write, on a virtual
# machine a costly cross-CPU wake-up) and was a sixth of the event loop's time with 64 a batch
# (figures: docs/decisions.md#storage-batch-sizes-and-early-writeback).
SMALL_BATCH = 256
# Batches sent to a copy process before the first is answered: enough that the process is not
# left idle while the event loop is busy elsewhere (a rule's page of requests to plan, a
# catalogue write holding the GIL for tens of milliseconds), few enough that a stop does not
# wait long for what is queued: about PIPELINED_BYTES of small copies, at least 2 batches
# (figures: docs/decisions.md#storage-batch-sizes-and-early-writeback).
PIPELINED_BYTES = 64 * 1024 * 1024
MIN_PIPELINED_BATCHES = 2


def _plain(_cancelled: threading.Event, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` run by ``PosixStorage._in_thread``, which passes a cancellation event first."""
    return fn(*args)


class PosixStorage:
    """A disk endpoint rooted at a directory. Paths given to it are relative to the root (pfns).

    Constructed as ``PosixStorage(name, endpoint)`` from the configuration, or
    ``PosixStorage(name, root)`` in tools and tests. The root is not created here: ``put_from``
    creates the destination directories (root included) on first write.

    It serves ``interface.StorageBackend`` (``scheme = "file"``) over the same code: see the
    section "the StorageBackend interface" below. The daemons' fast paths (``put_from``,
    ``copy_verified``, ``copy_verified_many`` with batch durability and ``sync``) stay as they are.
    """

    backend = "posix"
    scheme = "file"

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
        # The blocking work of every copy and check (run in the worker threads; the copy process
        # has an engine of its own).
        self._engine = engine = CopyEngine(name, endpoint, chunk_size)
        # The operations a batch of small ones may hold, by the name a batch (and the copy
        # process, which runs this same table on its own engine) knows them by.
        self.small_operations: dict[str, Callable[..., Any]] = engine.operations
        # Set by a caller limiting concurrent transfers to this endpoint (the replicator's
        # max_transfers, shared by its instances): a batch of small operations, run one after
        # another, holds one slot (``async with``, as with a semaphore).
        self.transfer_slots: AbstractAsyncContextManager[object] | None = None

    def __repr__(self) -> str:
        return f"PosixStorage({self.name!r}, root={str(self.root)!r})"

    # --- paths ---------------------------------------------------------------------------------
    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of ``relpath`` inside the root; ``Permanent`` if it escapes or is the root.

        A name, checked lexically (no ``..``, nothing outside): every open, create and delete of it
        goes through ``confined``, which refuses a symlink at any component at that moment."""
        return self._engine.resolve(relpath)

    def pfn_of(self, path: str | os.PathLike[str]) -> str:
        """The path of a resolved ``path`` relative to the endpoint root, as stored in the catalogue."""
        return self._engine.pfn_of(path)

    # --- copying -------------------------------------------------------------------------------
    async def put_from(
        self,
        source: str | os.PathLike[str],
        relpath: str,
        *,
        expected_size: int | None = None,
        expected_adler32: str | None = None,
        fsync: bool = True,
        expected_sha256: str | None = None,
    ) -> CopyResult:
        """Copy ``source`` to ``relpath`` on this endpoint, verified, atomically; see the module doc.

        The one read of the source computes adler32 and sha256 (the result carries both); each is
        compared with its expected value when given (``Permanent("checksum_mismatch")``).

        An existing file at ``relpath`` is replaced atomically (a redelivered message re-copies).
        ``source`` is an absolute path made of a root's real path and a relative one (ingest's
        ``locate``): it is opened with no symlink followed at any component (``confined``), a
        symlink on it being ``path_outside_area``, a FIFO, socket, device or directory
        ``not_a_file`` (opened non-blocking, never waited on).
        """
        expected: str | None = None
        if expected_adler32 is not None:
            try:
                expected = normalise_adler32(expected_adler32)
            except ValueError as exc:
                raise Permanent("invalid_checksum", str(exc)) from None
        sha = _expected_sha256(expected_sha256)
        path = os.fspath(source)
        if expected_size is not None and self.batches_copy(expected_size, fsync):
            # Small and announced as small: copied with others in one hand-off (see ``_batched``).
            # A file larger than announced fails its size check right after fstat.
            return await self._batched("copy", path, relpath, expected_size, expected, fsync, sha)
        return await self._in_thread(
            self._engine.copy_sync, path, relpath, expected_size, expected, fsync, sha
        )

    # --- replication -------------------------------------------------------------------------
    async def copy_verified(
        self,
        source: Path,
        relpath: str,
        *,
        expected_size: int,
        expected_adler32: str,
        fsync: bool = True,
        expected_sha256: str | None = None,
    ) -> CopyResult:
        """Copy a replica from another disk endpoint to ``relpath`` here, verified, atomically.

        With ``expected_sha256`` (the catalogue's, when recorded) the read-back computes sha256
        in the same pass as adler32 and checks it too: a source altered without changing its size
        or adler32 is ``source_corrupt``.

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
        sha = _expected_sha256(expected_sha256)
        if not isinstance(source, Path):
            source = Path(source)
        if expected_size < 0:
            raise Permanent("invalid_size", f"expected size {expected_size} is negative")
        if self.batches_copy(expected_size, fsync):
            return await self._batched("replicate", source, relpath, expected_size, expected, fsync, sha)
        return await self._in_thread(
            self._engine.replicate_sync, source, relpath, expected_size, expected, fsync, sha
        )

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
            sha = _expected_sha256(c.sha256)
            jobs.append(("replicate_from", (c.source_root, c.source_pfn, c.relpath, c.size, adler32, sha)))
        outcomes = await self._batched_many(jobs)
        return [o.error if isinstance(o, Failed) else o for o in outcomes]  # type: ignore[misc]

    # --- inspection ----------------------------------------------------------------------------
    # exists/size_of/free_bytes are plain calls (a few syscalls each); on a network mount that may
    # hang, call them through asyncio.to_thread.
    def exists(self, relpath: str) -> bool:
        """True when a regular file is present at ``relpath`` (reached without a symlink)."""
        rel = self._engine.below(relpath)
        try:
            return stat_mod.S_ISREG(confined.lstat_beneath(self._engine.real_root, rel).st_mode)
        except OSError:
            return False

    def size_of(self, relpath: str) -> int:
        """Size in bytes of the file at ``relpath`` (``Permanent("file_missing")`` if none)."""
        rel = self._engine.below(relpath)
        path = self._engine.real_root + "/" + rel
        try:
            st = confined.lstat_beneath(self._engine.real_root, rel)
        except (FileNotFoundError, NotADirectoryError):
            raise Permanent("file_missing", f"{path} does not exist on {self.name}") from None
        except OSError as exc:
            if confined.is_refused(exc):
                raise Permanent(
                    "path_outside_area", f"{path} on {self.name}: a symbolic link on the path"
                ) from None
            raise Retryable("storage_io_error", f"stat {path}: {exc.strerror or exc}") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise Permanent("not_a_file", f"{path} on {self.name} is not a regular file")
        return st.st_size

    async def checksum(self, relpath: str) -> str:
        """Adler-32 of the file at ``relpath``, read back from the endpoint."""
        return await self._in_thread(self._engine.checksum_sync, relpath)

    async def verify(
        self, relpath: str, *, expected_size: int, expected_adler32: str, expected_sha256: str | None = None
    ) -> str | None:
        """None when the file at ``relpath`` has the expected size and adler32, else what is wrong.

        The answer is a short description for logs and messages: ``"missing"``, ``"not a regular
        file"``, ``"size 12 != 34"`` (found != expected), ``"adler32 0a1b2c3d != 00000001"``. The
        size is compared first and the file only read when it matches. Used on a redelivered copy
        request to check a replica a previous attempt may already have made. Raises
        ``Retryable("storage_io_error")`` when the file cannot be read (nothing can be concluded)
        and ``Permanent`` for a malformed checksum or a path outside the endpoint.
        """
        expected = _expected_adler32(expected_adler32)
        sha = _expected_sha256(expected_sha256)
        if expected_size <= self.endpoint.batch_copy_bytes:
            return await self._batched("verify", relpath, expected_size, expected, sha)
        return await self._in_thread(self._engine.verify_sync, relpath, expected_size, expected, sha)

    async def delete(self, relpath: str) -> bool:
        """Remove the file at ``relpath``; True if it was there. Deleting a missing file succeeds."""
        return await self._in_thread(self._delete_sync, relpath)

    def _delete_sync(self, cancelled: threading.Event, relpath: str) -> bool:
        """``unlinkat`` in the file's directory, opened beneath the root without a symlink
        (``confined``): a directory swapped for a link never makes a delete land elsewhere. A
        symlink at the name itself is removed (the link, never its target)."""
        rel = self._engine.below(relpath)
        path = self._engine.real_root + "/" + rel
        try:
            with confined.parent_dir(self._engine.real_root, rel) as parent:
                try:
                    os.unlink(parent.name, dir_fd=parent.fd)
                except OSError as exc:
                    # Linux says EISDIR for a directory, POSIX allows EPERM.
                    if exc.errno == errno.EPERM and stat_mod.S_ISDIR(
                        os.stat(parent.name, dir_fd=parent.fd, follow_symlinks=False).st_mode
                    ):
                        raise IsADirectoryError(errno.EISDIR, "is a directory") from None
                    raise
        except (FileNotFoundError, NotADirectoryError):
            return False
        except IsADirectoryError:
            raise Permanent("not_a_file", f"{path} on {self.name} is a directory") from None
        except OSError as exc:
            if confined.is_refused(exc):
                raise Permanent(
                    "path_outside_area", f"{path} on {self.name}: a symbolic link on the path"
                ) from None
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
        try:
            rootfd = confined.open_root(self._engine.real_root)
        except OSError:
            return 0  # no root yet (or not a directory: the configuration check says so)
        deadline = time.time() - older_than
        removed = 0
        try:
            # fwalk: every directory is entered by descriptor, never through a symlink, and each
            # unlink is relative to it: a directory swapped for a link cannot redirect a delete.
            for dirpath, _dirs, files, dirfd in os.fwalk(".", dir_fd=rootfd):
                for name in files:
                    if not is_temp_name(name):
                        continue
                    path = os.path.join(self._engine.real_root, dirpath, name)
                    try:
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                        if stat_mod.S_ISREG(st.st_mode) and st.st_mtime <= deadline:
                            os.unlink(name, dir_fd=dirfd)
                            removed += 1
                    except FileNotFoundError:
                        continue
                    except OSError as exc:  # a read-only endpoint must not stop the daemon starting
                        log.warning("temp_cleanup_failed", storage=self.name, path=path, error=str(exc))
        finally:
            os.close(rootfd)
        return removed

    # --- the StorageBackend interface (common/storage/interface.py) ------------------------------
    # Adapters over the methods above. Every copy made through them is durable when it returns
    # (fsync of the file and its directory): the interface has no ``sync``, so a caller may record
    # the copy at once. Errors are those of the method adapted (``put_from``'s for ``upload``,
    # ``copy_verified``'s for ``download`` and ``copy_from``).
    def local_path(self, relpath: str) -> Path:
        """The file on this node: ``resolve`` (a name below the root; open it through
        ``confined.open_regular``, which follows no symlink)."""
        return self.resolve(relpath)

    def url(self, relpath: str) -> str:
        """``file://`` and the path below the root, folded as written (no file system access);
        ``Permanent("path_outside_area")`` for a path leaving the root, as ``resolve`` says."""
        root = os.fspath(self.root)
        path = os.path.normpath(os.path.join(root, relpath))
        if "\x00" in path or path == root or not is_within(path, root):
            self.resolve(relpath)  # raises, and words the error
        return f"file://{path}"

    async def stat(self, relpath: str, *, checksum: bool = False) -> ObjectStat | None:
        """Size (and adler32, read back, when asked) of the file at ``relpath``; None if none.

        ``Permanent("not_a_file")`` for a directory, a socket or the like;
        ``Retryable("storage_io_error")`` when it cannot be read.
        """
        return await self._in_thread(self._stat_sync, relpath, checksum)

    def _stat_sync(self, cancelled: threading.Event, relpath: str, checksum: bool) -> ObjectStat | None:
        rel = self._engine.below(relpath)
        path = self._engine.real_root + "/" + rel
        try:
            fd, st = confined.open_regular_beneath(self._engine.real_root, rel)
        except confined.NotARegularFile as exc:
            raise Permanent(
                "not_a_file", f"{path} on {self.name} is {exc.what}, not a regular file"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            if confined.is_refused(exc):
                raise Permanent(
                    "path_outside_area", f"{path} on {self.name}: a symbolic link on the path"
                ) from None
            raise Retryable(STORAGE_IO_ERROR, f"stat {path}: {exc.strerror or exc}") from None
        try:
            if not checksum:
                return ObjectStat(st.st_size)
            size, adler = _adler32_fd(fd, _buffer(self.chunk_size), cancelled)  # one open: one file
            return ObjectStat(size, adler)
        except OSError as exc:
            raise Retryable(STORAGE_IO_ERROR, f"reading {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    async def open_replica(self, relpath: str) -> int:
        """A descriptor of the replica at ``relpath``, opened beneath the root with no symlink
        followed, non-blocking, a regular file (``confined``); errors are a *source*'s
        (``source_missing``, ``source_corrupt``, ``source_io_error``): for a remote backend
        uploading from here (``transfer.local_source``). The caller closes it."""
        return await self._in_thread(_plain, self._open_replica_sync, relpath)

    def _open_replica_sync(self, relpath: str) -> int:
        try:
            rel = self._engine.below(relpath)
        except Permanent as err:
            raise Permanent("source_corrupt", f"source replica {relpath!r}: {err.message}") from None
        path = f"{self._engine.real_root}/{rel}"
        try:
            fd, _st = confined.open_regular_beneath(self._engine.real_root, rel)
        except confined.NotARegularFile as exc:
            raise Permanent("source_corrupt", f"source replica {path} is {exc.what}") from None
        except OSError as exc:
            raise _replica_source_error(exc, path) from None
        return fd

    async def upload(self, local: Path, relpath: str, *, size: int, adler32: str) -> CopyDone:
        """``put_from`` of a file of this node, fsync-ed."""
        done = await self.put_from(local, relpath, expected_size=size, expected_adler32=adler32, fsync=True)
        return CopyDone(done.pfn, done.size, done.adler32, "local")

    async def download(self, relpath: str, local: Path, *, size: int, adler32: str) -> CopyDone:
        """Copy ``relpath`` to ``local`` (anywhere on this node) as ``copy_verified`` copies,
        this endpoint being the source (``source_missing``, ``source_corrupt`` ...)."""
        expected = _expected_adler32(adler32)
        if size < 0:
            raise Permanent("invalid_size", f"expected size {size} is negative")
        await self._in_thread(self._engine.download_sync, relpath, os.fspath(local), size, expected)
        return CopyDone(relpath, size, expected, "local")

    def can_pull_from(self, source: StorageBackend) -> bool:
        """Any posix endpoint: both are file systems of this node (the kernel copies)."""
        return isinstance(source, PosixStorage)

    async def copy_from(
        self, source: StorageBackend, source_relpath: str, relpath: str, *, size: int, adler32: str
    ) -> CopyDone:
        """From a posix endpoint: ``copy_verified`` (the kernel copy, read back, fsync-ed), the
        source resolved in the worker. From a remote one: its ``download`` into the file here."""
        expected = _expected_adler32(adler32)
        if size < 0:
            raise Permanent("invalid_size", f"expected size {size} is negative")
        if isinstance(source, PosixStorage):
            root = os.fspath(source.root)
            done = await self._in_thread(
                self._engine.pull_sync, root, source_relpath, relpath, size, expected
            )
            return CopyDone(done.pfn, done.size, done.adler32, "local")
        rel = self._engine.below(relpath)
        # The directory is opened (made where missing) beneath the root with no symlink followed,
        # and the remote backend writes through that descriptor (/proc/self/fd): its temporary
        # file and rename cannot be redirected by a directory swapped for a link meanwhile.
        parent = await self._in_thread(_plain, _destination_parent, self._engine.real_root, rel)
        try:
            local = Path(f"/proc/self/fd/{parent.fd}/{parent.name}")
            got = await source.download(source_relpath, local, size=size, adler32=expected)
        finally:
            parent.close()
        return CopyDone(rel, got.size, got.adler32, got.mode)

    async def free_space(self) -> int:
        """``free_bytes`` (statvfs of the root), from a worker thread."""
        return await self._in_thread(_plain, self.free_bytes)

    async def aclose(self) -> None:
        """``close``, waiting for the worker threads off the event loop."""
        executor = self._release()
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)

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
            self._copiers.append(self._new_copier())
        copier = self._copiers[0]
        try:
            await copier.start()
        except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.warning("copy_process_start_failed", storage=self.name, error=f"{type(exc).__name__}: {exc}")
            copier.close()

    def _new_copier(self) -> CopyProcess:
        return CopyProcess(self.name, self.endpoint, self.chunk_size, self.endpoint.stall_seconds)

    def _least_busy_copier(self) -> CopyProcess:
        """The copy process with the fewest batches in its pipe (a new one while fewer than
        ``copy_processes`` run and every one has work)."""
        idle = min(self._copiers, key=lambda c: c.in_flight, default=None)
        if idle is not None and (idle.in_flight == 0 or len(self._copiers) >= self.endpoint.copy_processes):
            return idle
        copier = self._new_copier()
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
        executor = self._release()
        if executor is not None:
            executor.shutdown(wait=True)

    def _release(self) -> ThreadPoolExecutor | None:
        """Stop the copy processes and forget the batcher and the pool, returned to be shut down."""
        self._small = None  # bound to the event loop that made it
        for copier in self._copiers:
            copier.close()
        self._copiers = []
        executor, self._executor = self._executor, None
        return executor

    # Last in the class: a method named ``list`` shadows the builtin in the annotations after it.
    async def list(self, prefix: str = "", *, temporaries: bool = False) -> AsyncIterator[ListedFile]:
        """Every regular file below ``prefix`` (a directory; "" for the whole endpoint), sorted
        by name within each directory; temporaries of copies in progress (or, with
        ``temporaries``, those alone) and symbolic links are left out. One directory is read per
        hand-off to a worker thread. (``cleanup_temp`` is the posix sweep of temporaries.)"""
        lead = prefix.strip("/").removeprefix("./")
        lead = "" if lead == "." else lead
        top = self._engine.below(lead) if lead else ""
        root = self._engine.real_root
        stack = [top]
        while stack:
            rel = stack.pop()
            files, dirs = await self._in_thread(_plain, _read_dir, root, rel, temporaries)
            lead_rel = rel + "/" if rel else ""
            for name, size, mtime in files:
                yield ListedFile(lead_rel + name, size, mtime)
            stack.extend(f"{lead_rel}{d}" for d in reversed(dirs))


def _destination_parent(root: str, rel: str) -> confined.Parent:
    """The directory of a copy's destination, open (``confined.parent_of``, created where missing);
    a symlink on the way is the destination's ``path_outside_area``."""
    try:
        return confined.parent_of(root, rel, create=True, make_root=True)
    except OSError as exc:
        raise destination_refused(exc, f"{root}/{rel}") from None


def _read_dir(
    root: str, rel: str, temporaries: bool = False
) -> tuple[list[tuple[str, int, float]], list[str]]:
    """(regular files with their sizes and mtimes — temporaries alone with ``temporaries`` —,
    subdirectories) of the directory ``rel`` beneath ``root`` (``""``: the root), each sorted by
    name; a directory gone meanwhile, named as a file, or reached through a symlink (``confined``)
    is empty; ``Retryable("storage_io_error")`` if it cannot be read."""
    files: list[tuple[str, int, float]] = []
    dirs: list[str] = []
    path = f"{root}/{rel}" if rel else root
    try:
        dirfd = confined.open_dir_beneath(root, rel)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as exc:
        if confined.is_refused(exc):
            return [], []
        raise Retryable(STORAGE_IO_ERROR, f"listing {path}: {exc.strerror or exc}") from None
    try:
        with os.scandir(dirfd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    dirs.append(entry.name)
                elif entry.is_file(follow_symlinks=False) and is_temp_name(entry.name) == temporaries:
                    st = entry.stat(follow_symlinks=False)
                    files.append((entry.name, st.st_size, st.st_mtime))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    except OSError as exc:
        raise Retryable(STORAGE_IO_ERROR, f"listing {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dirfd)
    files.sort()
    dirs.sort()
    return files, dirs
