"""The ``https`` backend: a WebDAV endpoint (dCache, StoRM, XrdHttp) at ``davs://`` / ``https://``.

Built on ``_WebDavClient`` (``common.storage.https_client``: one pooled session per endpoint, the
credentials of ``common.storage.https_auth``, redirects followed to trusted hosts only over https,
paths confined and percent-encoded before any request); this module makes the copies.

Every copy is atomic and verified by the *server's* checksum, never by reading the copy back:

- upload: ``MKCOL`` of missing parents (cached), ``PUT`` to a hidden temporary name beside the
  final one (``common.storage.tempfiles``' convention, so ``list`` and cleanups skip it), ``HEAD``
  with ``Want-Digest: adler32`` (RFC 3230), ``MOVE`` with ``Overwrite: T``, one ``HEAD`` that the
  file is there. A copy already under its final name with the right checksum is a success
  (files from ``precheck_bytes`` up are looked for first and not sent again);
- download: ``GET`` into a local temporary, adler32 computed on the way, renamed when it matches;
- third-party copy between two endpoints configured ``tpc = true`` (``common.storage.https_tpc``):
  ``COPY`` into the temporary name, pull mode by default (``Source:`` on the destination) or push
  (``Destination:`` on the source), the performance-marker stream read for progress; a copy whose
  markers stop moving for ``stall_seconds`` or that passes its deadline is cancelled (the response
  closed) and the temporary deleted.

A bad copy is deleted before ``checksum_mismatch`` is raised; on any failure the temporary is
removed, so no partial file ever has a final name. Errors are classified in
``common.storage.https_errors`` (one table for the statuses).

``tpc_mode`` ("pull" or "push": how third-party copies *into* this endpoint are made) and
``stall_seconds`` (no progress for this long cancels a transfer) come from the endpoint's settings;
the constructor may override them (tests), and takes ``precheck_bytes``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import os
import stat
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp
import structlog

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import ADLER32_START, format_adler32
from common.storage.https_client import (
    MAX_REDIRECTS,
    _refuse,
    _WebDavClient,
    parse_adler32_digest,
)
from common.storage.https_errors import NoAnswer, exception_error
from common.storage.https_tpc import TpcMode, third_party_copy
from common.storage.interface import CopyDone, ListedFile, ObjectStat, StorageBackend, deadline_for
from common.storage.reasons import expected_adler32 as _expected
from common.storage.tempfiles import is_temp_name, temp_name_for
from common.storage.transfer import local_source, stream_via_node
from common.storage.webdav_xml import LIST_REQUEST, QUOTA_REQUEST

log = structlog.get_logger("spool.storage")

# Files this large are looked for under their final name before a copy (see _already_there).
PRECHECK_BYTES = 4 * 1024 * 1024
_WRITE_CHUNK = 4 * 1024 * 1024


def _local_write_error(exc: OSError, path: Path) -> SpoolError:
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Retryable("disk_full", f"writing {path}: {text}")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return Retryable("destination_not_writable", f"writing {path}: {text}")
    return Retryable("storage_io_error", f"writing {path}: {text}")


def _open_source(local: Path, size: int) -> IO[bytes]:
    """The local file to upload, checked to have the announced size (blocking, small)."""
    try:
        # Non-blocking, and a regular file only (issue 16): a FIFO must not hang the thread.
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Permanent("source_corrupt", f"source {local} is not a regular file")
        f = open(fd, "rb")  # noqa: SIM115  (handed to aiohttp, closed by the caller)
    except FileNotFoundError:
        raise Permanent("source_missing", f"source {local} does not exist") from None
    except OSError as exc:
        raise Retryable("source_io_error", f"reading source {local}: {exc.strerror or exc}") from None
    actual = os.fstat(f.fileno()).st_size
    if actual != size:
        f.close()
        raise Permanent("source_corrupt", f"source {local} has {actual} bytes, expected {size}")
    return f


def _write_summed(f: IO[bytes], pieces: builtins.list[bytes], value: int) -> int:
    """Append ``pieces`` to ``f``; the adler32 carried on over them (a worker thread's job)."""
    for piece in pieces:
        value = zlib.adler32(piece, value)
    f.write(b"".join(pieces))
    return value


class HttpsStorage(_WebDavClient):
    """One WebDAV endpoint. Construct with the endpoint's settings; ``aclose`` when done."""

    kind = "disk"
    scheme = "https"

    def __init__(
        self,
        name: str,
        endpoint: StorageEndpoint,
        *,
        tpc_mode: TpcMode | None = None,
        stall_seconds: float | None = None,
        metadata_timeout: float | None = None,
        max_redirects: int = MAX_REDIRECTS,
        precheck_bytes: int = PRECHECK_BYTES,
    ) -> None:
        super().__init__(name, endpoint, metadata_timeout=metadata_timeout, max_redirects=max_redirects)
        # The endpoint's settings unless a caller (a test) overrides them.
        self.tpc_mode: TpcMode = tpc_mode or endpoint.tpc_mode
        self.stall_seconds = stall_seconds or endpoint.stall_seconds
        self.precheck_bytes = precheck_bytes
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"HttpsStorage({self.name!r}, {self._public_base!r})"

    async def _discard(self, url: str) -> bool:
        """Remove a temporary after a failure; True when the server answered (it is up)."""
        try:
            await self._delete_url(url)
            return True
        except SpoolError as err:
            if err.reason not in ("endpoint_unavailable", "transfer_timeout", "source_io_error"):
                return True
            log.warning("https_temp_left", storage=self.name, url=self._public(url), error=err.message)
            return False

    def _discard_in_background(self, url: str) -> None:
        task = asyncio.get_running_loop().create_task(self._discard(url))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- StorageBackend -------------------------------------------------------------------------
    async def stat(self, relpath: str, *, checksum: bool = False) -> ObjectStat | None:
        return await self._head(self._url_of(self._components(relpath)), checksum=checksum)

    async def delete(self, relpath: str) -> bool:
        return await self._delete_url(self._url_of(self._components(relpath)))

    async def free_space(self) -> int | None:
        """RFC 4331 ``quota-available-bytes`` of the base when the server tells it."""
        entries = await self._propfind(self._base + "/", 0, QUOTA_REQUEST)
        return entries[0].quota_available if entries else None

    async def list(self, prefix: str = "", *, temporaries: bool = False) -> AsyncIterator[ListedFile]:
        start = self._components(prefix, allow_root=True)
        pending = [start]
        seen: set[tuple[str, ...]] = set()
        while pending:
            here = pending.pop()
            if tuple(here) in seen:
                continue
            seen.add(tuple(here))
            # The prefix may name a file (no slash then); what was found below it are directories.
            url = self._url_of(here) + ("/" if here != start or not here else "")
            entries = await self._propfind(url, 1, LIST_REQUEST)
            for entry in entries or []:
                rel = self._relative(entry.path)
                if rel is None:
                    continue
                parts = rel.split("/") if rel else []
                if parts == here:
                    if not entry.is_dir and is_temp_name(parts[-1]) == temporaries:
                        yield ListedFile(rel, entry.size or 0, entry.mtime)  # the prefix names a file
                    continue
                if parts[: len(here)] != here or len(parts) <= len(here):
                    continue  # not below what was asked: ignored, never followed
                if entry.is_dir:
                    pending.append(parts)
                elif is_temp_name(parts[-1]) == temporaries:
                    yield ListedFile(rel, entry.size or 0, entry.mtime)

    async def upload(self, local: Path, relpath: str, *, size: int, adler32: str) -> CopyDone:
        parts = self._components(relpath)
        want = _expected(adler32)
        final = self._url_of(parts)
        if await self._already_there(final, size, want):
            return CopyDone(relpath, size, want, "local")
        temp = self._url_of([*parts[:-1], temp_name_for(parts[-1])])

        async def put() -> None:
            opened: builtins.list[IO[bytes]] = []

            def body() -> IO[bytes]:
                f = _open_source(Path(local), size)
                opened.append(f)
                return f

            try:
                resp = await self._send(
                    "PUT",
                    temp,
                    side="destination",
                    transfer=True,
                    headers={"Content-Type": "application/octet-stream"},
                    body=body,
                    client_timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._metadata_timeout),
                )
                async with resp:
                    if resp.status not in (200, 201, 204):
                        raise await _refuse(resp, "destination", f"PUT {self._public(temp)}")
            finally:
                for f in opened:
                    f.close()

        await self._copy_into(final, temp, parts, size, want, put)
        return CopyDone(relpath, size, want, "local")

    async def download(self, relpath: str, local: Path, *, size: int, adler32: str) -> CopyDone:
        parts = self._components(relpath)
        want = _expected(adler32)
        url = self._url_of(parts)
        local = Path(local)
        tmp = local.parent / temp_name_for(local.name)
        what = f"GET {self._public(url)}"
        deadline = deadline_for(size, self.endpoint.min_rate, self.endpoint.transfer_timeout_floor)
        try:
            await asyncio.to_thread(local.parent.mkdir, parents=True, exist_ok=True)
            async with asyncio.timeout(deadline):
                got, value = await self._get_into(url, tmp, what)
            if got != size or value != want:
                await self._bad_download(url, what, got, size, value, want)
            await asyncio.to_thread(os.replace, tmp, local)
        except TimeoutError:
            raise Retryable("transfer_timeout", f"{what}: not done within {deadline:.0f} s") from None
        except OSError as exc:
            raise _local_write_error(exc, local) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return CopyDone(relpath, size, want, "local")

    async def _get_into(self, url: str, tmp: Path, what: str) -> tuple[int, str]:
        resp = await self._send(
            "GET",
            url,
            side="source",
            transfer=True,
            client_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._metadata_timeout, sock_read=self.stall_seconds
            ),
        )
        async with resp:
            if resp.status != 200:
                raise await _refuse(resp, "source", what)
            f = await asyncio.to_thread(open, tmp, "wb")
            # Written and checksummed in a worker thread while the next piece arrives: the
            # network and the local disk work at the same time (one piece in flight at most).
            pending: asyncio.Future[int] | None = None
            value, got, pieces, held = ADLER32_START, 0, [], 0
            try:
                try:
                    async for chunk in resp.content.iter_chunked(1024 * 1024):
                        got += len(chunk)
                        pieces.append(chunk)
                        held += len(chunk)
                        if held >= _WRITE_CHUNK:
                            if pending is not None:
                                value = await pending
                            pending = asyncio.ensure_future(
                                asyncio.to_thread(_write_summed, f, pieces, value)
                            )
                            pieces, held = [], 0
                except aiohttp.ClientError as exc:  # a local write's OSError is the caller's
                    raise exception_error(exc, side="source", what=what, transfer=True) from None
                if pending is not None:
                    value, pending = await pending, None
                value = await asyncio.to_thread(_write_summed, f, pieces, value)
                await asyncio.to_thread(f.flush)
                await asyncio.to_thread(os.fsync, f.fileno())
            finally:
                if pending is not None:  # the thread still holds the file: let it finish first
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pending)
                await asyncio.to_thread(f.close)
        return got, format_adler32(value)

    async def _bad_download(self, url: str, what: str, got: int, size: int, value: str, want: str) -> None:
        """Bytes received are not the expected file: is the server's copy bad, or the transfer?"""
        server = await self._head(url, checksum=True, side="source")
        if server is not None and server.size == size and server.adler32 == want:
            raise Retryable(
                "source_io_error", f"{what}: received {got} bytes adler32 {value}, the server holds {want}"
            )
        raise Permanent(
            "source_corrupt",
            f"{what}: the server's copy has {server.size if server else '?'} bytes adler32 "
            f"{server.adler32 if server else '?'}, expected {size} bytes {want}",
        )

    def can_pull_from(self, source: StorageBackend) -> bool:
        return isinstance(source, HttpsStorage) and self.endpoint.tpc and source.endpoint.tpc

    async def copy_from(
        self, source: StorageBackend, source_relpath: str, relpath: str, *, size: int, adler32: str
    ) -> CopyDone:
        if isinstance(source, HttpsStorage) and self.can_pull_from(source):
            return await third_party_copy(self, source, source_relpath, relpath, size=size, adler32=adler32)
        async with local_source(source, source_relpath) as local:  # confined (issue 16)
            if local is not None:
                done = await self.upload(local, relpath, size=size, adler32=adler32)
                return CopyDone(done.relpath, done.size, done.adler32, "local")
        return await stream_via_node(source, source_relpath, self, relpath, size=size, adler32=adler32)

    async def aclose(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for retired in self._retired:
            await retired.close()
        self._retired.clear()
        if self._session_obj is not None:
            await self._session_obj.close()
            self._session_obj = None

    # -- copies ---------------------------------------------------------------------------------
    async def _already_there(self, final: str, size: int, want: str) -> bool:
        """An earlier delivery of this very copy completed: nothing to do (idempotent).

        Asked only for files of ``precheck_bytes`` or more. A smaller file is simply written
        again (the verified MOVE over an identical file is the same success): the HEAD that
        finds nothing, the usual case, makes XrdHttp close the connection, and the next request
        pays a new TLS handshake, which costs more than writing a small file again
        (docs/decisions.md#storage-batch-sizes-and-early-writeback).
        """
        if size < self.precheck_bytes:
            return False
        st = await self._head(final, checksum=True)
        return st is not None and st.size == size and st.adler32 == want

    async def _copy_into(
        self,
        final: str,
        temp: str,
        parts: builtins.list[str],
        size: int,
        want: str,
        write: Callable[[], Awaitable[None]],
    ) -> None:
        """Make the parents, ``write`` the temporary (within the deadline), verify it by the
        server's checksum, then ``MOVE`` it to ``final``; the temporary removed on any failure."""
        deadline = deadline_for(size, self.endpoint.min_rate, self.endpoint.transfer_timeout_floor)
        written = False
        try:
            await self._make_dirs(parts[:-1])
            async with asyncio.timeout(deadline):
                await write()
            written = True
            await self._verify(temp, size, want)
            await self._move(temp, final)
            await self._check_moved(final, size)
        except asyncio.CancelledError:
            self._discard_in_background(temp)
            raise
        except TimeoutError:
            await self._discard(temp)
            raise Retryable(
                "transfer_timeout", f"copy to {self._public(final)}: not done within {deadline:.0f} s"
            ) from None
        except SpoolError as err:
            self._known_dirs.difference_update({tuple(parts[:i]) for i in range(1, len(parts))})
            alive = await self._discard(temp)
            if not written and alive and isinstance(err, NoAnswer) and err.reason == "endpoint_unavailable":
                # The connection broke mid-write but the server answers: a write error on its side
                # (XrdHttp closes the connection on ENOSPC), not an outage.
                raise Retryable(
                    "storage_io_error", f"{err.message}; the server is up: it failed to store the file"
                ) from None
            raise
        except Exception:
            await self._discard(temp)  # unforeseen: still nothing left behind
            raise

    async def _server_checksum(self, url: str) -> ObjectStat | None:
        """HEAD with ``Want-Digest``, asked again (twice at most) when the server fails to answer.

        XrdHttp answers ``500 Failed to create initial checksum request`` (with a body, which a
        HEAD must not have: aiohttp reports a protocol error) when its checksum jobs are busy;
        seen here with 8 uploads at once. Losing a whole copy to that would be a waste.
        """
        for delay in (0.2, 1.0, None):
            try:
                return await self._head(url, checksum=True, side="destination")
            except SpoolError as err:
                if delay is None or err.reason not in ("endpoint_unavailable", "storage_io_error"):
                    raise
                log.info("https_checksum_retry", storage=self.name, url=self._public(url), error=err.message)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _verify(self, temp: str, size: int, want: str) -> None:
        st = await self._server_checksum(temp)
        where = self._public(temp)
        if st is None:
            raise Retryable("storage_io_error", f"{where} vanished after it was written")
        if st.size != size:
            raise Retryable(
                "storage_io_error", f"{where} holds {st.size} bytes after the copy, expected {size}"
            )
        if st.adler32 is None:
            raise Retryable("storage_io_error", f"{where}: the server gives no adler32 (Want-Digest)")
        if st.adler32 != want:
            raise Retryable("checksum_mismatch", f"{where}: server adler32 {st.adler32}, expected {want}")

    async def _move(self, temp: str, final: str) -> None:
        resp = await self._send(
            "MOVE", temp, side="destination", headers={"Destination": final, "Overwrite": "T"}
        )
        async with resp:
            if resp.status not in (200, 201, 204):
                raise await _refuse(resp, "destination", f"MOVE {self._public(temp)}")

    async def _check_moved(self, final: str, size: int) -> None:
        """The file is under its final name: one HEAD. XrdHttp 5.5 does not percent-decode a
        MOVE's ``Destination`` (a name with a space lands under ``a%20b``) while it decodes the
        request path: a success that put the file elsewhere must not be reported as a copy."""
        st = await self._head(final, checksum=False, side="destination")
        if st is None or st.size != size:
            raise Retryable(
                "storage_io_error",
                f"MOVE to {self._public(final)} answered success but the file is not there "
                "(a server that does not decode Destination?)",
            )


def open_https(name: str, endpoint: StorageEndpoint) -> HttpsStorage:
    """The backend for a ``backend = "https"`` endpoint (for ``open_storage``)."""
    return HttpsStorage(name, endpoint)


__all__ = ["HttpsStorage", "open_https", "parse_adler32_digest", "temp_name_for"]
