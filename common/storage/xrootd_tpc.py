"""XRootD third-party copy between two ``xrootd`` endpoints: the destination's server pulls the
file from the source's server (``CopyProcess`` with ``thirdparty="only"``), never through this
node.

The one request of the bindings without an asynchronous form, ``CopyProcess.run``, blocks: it
runs in the destination backend's own thread pool (``_tpc_threads``: as many threads as copies it
takes at once) and is stopped at the deadline through its progress handler (``_Cancel``). As for
every copy of the backend (``common.storage.xrootd``): the file is written under a temporary name,
checked by the servers' adler32 (``end2end``), renamed onto its final name; the temporary removed
on any failure. ``_tpc_error`` decides which side a failure is to blame on, which the replicator
needs to pick another source or wait for the destination. Apart from the backend because it is
its own protocol with its own failure analysis.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from XRootD import client as xrd

from common.errors import Permanent, Retryable, SpoolError
from common.storage.interface import CopyDone
from common.storage.tempfiles import temp_name_for
from common.storage.xrootd_client import _checksum_error, _Clock, _not_found, _parse_adler32
from common.storage.xrootd_errors import Side, classify, describe

if TYPE_CHECKING:
    from common.storage.xrootd import XrootdStorage

# After a third-party copy is told to stop, how long its worker thread may take to notice.
CANCEL_GRACE_SECONDS = 30.0


class _Cancel(xrd.utils.CopyProgressHandler):  # type: ignore[misc]
    """Progress handler of a third-party copy: says stop once ``stop`` is set (the deadline)."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def should_cancel(self, job_id: int) -> bool:
        return self.stop.is_set()


async def third_party_copy(
    dest: XrootdStorage, source: XrootdStorage, source_relpath: str, relpath: str, size: int, expected: str
) -> CopyDone:
    path = dest._path(relpath)
    src = source._path(source_relpath)
    limit = dest._limit(size)
    clock = _Clock(limit)
    done = CopyDone(relpath, size, expected, "tpc")
    if await dest._already_there(path, size, expected, clock):
        return done
    found = await source._stat(src, checksum=False, side="source")
    if found is None:
        raise Permanent("source_missing", f"source {source._where(src)} does not exist")
    if found.size != size:
        raise Permanent(
            "source_corrupt", f"source {source._where(src)} has {found.size} bytes, expected {size}"
        )
    tmp = f"{path.rsplit('/', 1)[0]}/{temp_name_for(path.rsplit('/', 1)[1])}"
    process = xrd.CopyProcess()
    process.add_job(
        source._transfer_url(src), dest._transfer_url(tmp),
        force=False, mkdir=True, thirdparty="only",
        checksummode="end2end", checksumtype="adler32", checksumpreset=expected,
        tpctimeout=clock.left(), inittimeout=min(clock.left(), 60), retry=0,
    )  # fmt: skip
    cancel = _Cancel()
    loop = asyncio.get_running_loop()
    run = loop.run_in_executor(_tpc_threads(dest), _run_copy, process, cancel)
    try:
        try:
            status, results = await asyncio.wait_for(asyncio.shield(run), max(0.0, clock.at - loop.time()))
        except TimeoutError:
            cancel.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run, CANCEL_GRACE_SECONDS)
            raise Retryable(
                "transfer_timeout",
                f"third-party copy {source._where(src)} -> {dest._where(path)} did not finish "
                f"within {limit:.0f} s",
            ) from None
        except asyncio.CancelledError:
            cancel.stop.set()
            raise
        job = results[0] if results else {}
        job_status = job.get("status", status)
        if not status.ok or not job_status.ok:
            failed = job_status if not job_status.ok else status
            raise await _tpc_error(dest, failed, source, src, tmp, path, size, expected)
        target = job.get("targetCheckSum", "")
        if not target or _parse_adler32(target) != expected:
            # end2end compared it already; a client that skipped the comparison is caught here.
            await dest._verify(tmp, path, size, expected, clock)
        await dest._commit(tmp, path, clock)
    except BaseException:
        await dest._discard(tmp)
        raise
    return done


async def _tpc_error(
    dest: XrootdStorage,
    status: Any,
    source: XrootdStorage,
    src: str,
    tmp: str,
    path: str,
    size: int,
    expected: str,
) -> SpoolError:
    """Which side a failed third-party copy is to blame on.

    A checksum that is not the expected one: if the temporary is short, the copy did not
    finish (a destination that filled up is reported so by some servers: the pulling
    ``xrdcp --server`` dies of ENOSPC and the client only sees the checksum differ); if the
    source's own server reports another checksum, the source is corrupt (Permanent);
    otherwise the copy here went wrong.
    """
    text = describe(status)
    if _checksum_error(status):
        floor = dest.endpoint.transfer_timeout_floor
        with contextlib.suppress(SpoolError):
            written = await dest._stat(tmp, checksum=False, side="destination")
            if written is not None and written.size < size:
                free = await dest.free_space()
                full = free is not None and free < size - written.size
                return Retryable(
                    "disk_full" if full else "storage_io_error",
                    f"third-party copy to {dest._where(path)} stopped after {written.size} of {size} "
                    f"bytes{' (no space left)' if full else ''}: {text}",
                )
        with contextlib.suppress(SpoolError):
            at_source = await source._server_adler32(src, _Clock(floor), side="source")
            if at_source is not None and at_source != expected:
                return Permanent(
                    "source_corrupt",
                    f"source {source._where(src)}: its server reports adler32 {at_source}, "
                    f"expected {expected}",
                )
        return Retryable(
            "checksum_mismatch",
            f"third-party copy to {dest._where(path)}: {text} (expected adler32 {expected})",
        )
    lowered = text.lower()
    side: Side = "destination"
    if "(source)" in lowered or ("(destination)" not in lowered and _not_found(status)):
        side = "source"
    where = source._where(src) if side == "source" else dest._where(path)
    return classify(status, side=side, what=where)


def _tpc_threads(dest: XrootdStorage) -> ThreadPoolExecutor:
    """Threads for ``CopyProcess.run`` (it blocks, waiting on the servers, GIL released): as
    many as copies this endpoint takes at once. The loop's default executor (cores + 4
    threads) would cap third-party copies below ``max_transfers`` on a small node."""
    if dest._tpc_pool is None:
        dest._tpc_pool = ThreadPoolExecutor(
            max_workers=max(dest.endpoint.max_transfers, 1), thread_name_prefix=f"xrootd-tpc-{dest.name}"
        )
    return dest._tpc_pool


def _run_copy(process: Any, cancel: _Cancel) -> tuple[Any, list[dict[str, Any]]]:
    """``CopyProcess.prepare`` + ``run`` (blocking: in a worker thread)."""
    status = process.prepare()
    if not status.ok:
        return status, []
    status, results = process.run(cancel)
    return status, list(results or [])
