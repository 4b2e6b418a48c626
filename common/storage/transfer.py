"""A copy between two endpoints that cannot copy server to server: through this node.

The order of preference for a copy of ``source:relpath`` to ``dest``, decided by the destination
backend's ``copy_from``:

1. third-party copy, when ``dest.can_pull_from(source)`` (XRootD TPC between two XRootD endpoints,
   HTTP-TPC where both ends are configured ``tpc = true``): no byte crosses this node;
2. straight from / to this node's file system when one side is mounted here (``local_path``):
   ``dest.upload(local)`` from a posix source, ``source.download(relpath, local)`` into a posix
   destination;
3. otherwise ``stream_via_node`` (here): downloaded into a temporary file of this node, verified,
   then uploaded and verified by the destination's server. The temporary is removed whatever
   happens. A node-local file rather than a pipe between the two protocols keeps each side's
   verification, retry and deadline its own, at the cost of one local write and read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from common.errors import Permanent, SpoolError
from common.logging import get_logger
from common.storage import confined
from common.storage.interface import CopyDone, StorageBackend
from common.storage.kernel import _buffer, _sums_fd
from common.storage.posix import PosixStorage
from common.storage.reasons import _source_error
from common.storage.reasons import expected_adler32 as expected_adler32_of
from common.storage.reasons import expected_sha256 as expected_sha256_of

log = get_logger("spool.storage")


async def stream_via_node(
    source: StorageBackend,
    source_relpath: str,
    dest: StorageBackend,
    relpath: str,
    *,
    size: int,
    adler32: str,
    scratch: Path | None = None,
) -> CopyDone:
    """Copy through a temporary file in ``scratch`` (default: the system's temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="spool-stream-", dir=scratch) as tmp:
        local = Path(tmp) / "copy"
        await source.download(source_relpath, local, size=size, adler32=adler32)
        done = await dest.upload(local, relpath, size=size, adler32=adler32)
    return CopyDone(done.relpath, done.size, done.adler32, "streamed")


async def verify_stored(
    storage: StorageBackend, relpath: str, *, size: int, adler32: str, sha256: str | None = None
) -> str | None:
    """None when the copy at ``relpath`` is the expected file, else what is wrong (for logs).

    Mounted here: read back (``PosixStorage.verify``; sha256 too when recorded, in the same
    pass). Remote: the server's size and adler32 (never the bytes over the network). A server
    that cannot tell a checksum is trusted on the size: a good copy is not destroyed for want of
    an answer.
    """
    if isinstance(storage, PosixStorage):
        return await storage.verify(
            relpath, expected_size=size, expected_adler32=adler32, expected_sha256=sha256
        )
    found = await storage.stat(relpath, checksum=True)
    if found is None:
        return "missing"
    if found.size != size:
        return f"{found.size} bytes, expected {size}"
    if found.adler32 is not None and found.adler32 != adler32.lower().rjust(8, "0"):
        return f"adler32 {found.adler32}, expected {adler32}"
    return None


@contextlib.asynccontextmanager
async def local_source(source: StorageBackend, relpath: str) -> AsyncIterator[Path | None]:
    """The file of a mounted (posix) ``source`` for a remote backend to upload, or None.

    Opened beneath its root with no symlink followed, non-blocking, and only if a regular file
    (``PosixStorage.open_replica``), then handed over as ``/proc/self/fd/<n>``: the backend's
    own open reopens exactly that file, so no name is looked up again between the check and the
    read (issue 16). Errors are the source's (``source_missing``, ``source_corrupt``).
    """
    if not isinstance(source, PosixStorage):
        yield None
        return
    fd = await source.open_replica(relpath)
    try:
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


async def upload_checked(
    storage: StorageBackend,
    source: str | os.PathLike[str],
    relpath: str,
    *,
    expected_size: int | None,
    expected_adler32: str | None,
    expected_sha256: str | None = None,
) -> CopyDone:
    """Ingest's copy of a landing-area file into a remote endpoint: the file's size, adler32 and
    sha256 (one pass) read here first (checked against what the event announced, as the posix
    copy checks them: ``size_mismatch`` / ``checksum_mismatch``, permanent), then ``upload``,
    which the server's checksum verifies. Reading the file once more than a local copy does is
    the price of knowing the checksum before any byte leaves the node; the second read comes
    from the page cache. A file changed between the two reads fails the server's check and is
    retried. The sha256 returned is this node's (the server is asked for adler32 only).
    """
    expected = expected_adler32_of(expected_adler32) if expected_adler32 is not None else None
    expected_sha = expected_sha256_of(expected_sha256)
    fd = await asyncio.to_thread(_open_landing, source)
    try:
        size, adler32, sha256 = await asyncio.to_thread(_landing_checksum, fd, source)
        if expected_size is not None and size != expected_size:
            raise Permanent("size_mismatch", f"source {source} has {size} bytes, expected {expected_size}")
        if expected is not None and adler32 != expected:
            raise Permanent(
                "checksum_mismatch", f"source {source} has adler32 {adler32}, expected {expected}"
            )
        if expected_sha is not None and sha256 != expected_sha:
            raise Permanent(
                "checksum_mismatch", f"source {source} has sha256 {sha256}, expected {expected_sha}"
            )
        # The backend reopens the file it is given: the one checked above, through its descriptor
        # (issue 16), so no name is looked up again between the check and the upload.
        done = await storage.upload(Path(f"/proc/self/fd/{fd}"), relpath, size=size, adler32=adler32)
        return dataclasses.replace(done, sha256=sha256)
    finally:
        os.close(fd)


def _open_landing(source: str | os.PathLike[str]) -> int:
    """A landing file, opened as every untrusted path is (``confined.open_regular``): no symlink
    followed at any component, never blocking (a FIFO), a regular file only."""
    try:
        fd, _st = confined.open_regular(os.path.abspath(source))
    except confined.NotARegularFile as exc:
        raise Permanent("not_a_file", f"source {source} is {exc.what}, not a regular file") from None
    except OSError as exc:
        raise _source_error(exc, source) from None
    return fd


def _landing_checksum(fd: int, source: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Size, adler32 and sha256 of an open landing file, in one read."""
    try:
        size, adler, sha = _sums_fd(fd, _buffer(1 << 20), threading.Event(), True)
        assert sha is not None
        return size, adler, sha
    except OSError as exc:
        raise _source_error(exc, source) from None


async def remove_stale_temporaries(storage: StorageBackend, before: float) -> int:
    """Delete the temporaries of copies a killed process left on a remote endpoint: those last
    modified before ``before`` (seconds since the epoch). Returns how many were deleted.

    Run by the replicator and ingest at start, in the background, with ``before`` = the process's
    start minus the endpoint's ``stale_temp_age`` — so a copy this process has begun is never
    touched, nor (with the age raised) one of another node writing to the same endpoint. One
    listing of the endpoint: the same walk the posix endpoints' ``cleanup_temp`` makes.
    A temporary whose age the server does not tell is left alone.
    """
    removed = 0
    async for found in storage.list(temporaries=True):
        if found.mtime is not None and found.mtime < before and await storage.delete(found.relpath):
            removed += 1
    return removed


async def sweep_stale_temporaries(name: str, storage: StorageBackend, stale_temp_age: float) -> None:
    """``remove_stale_temporaries`` of the temporaries older than now minus ``stale_temp_age``,
    logged; an endpoint that cannot be listed now is logged and left for the next start."""
    before = time.time() - stale_temp_age
    try:
        removed = await remove_stale_temporaries(storage, before)
    except SpoolError as err:
        log.warning("temp_sweep_failed", storage=name, reason=err.reason, error=err.message)
        return
    if removed:
        log.info("removed_stale_temp_files", storage=name, count=removed)
