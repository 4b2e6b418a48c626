"""The ``xrootd`` backend: a disk endpoint reached over ``root://host:port//base`` (EOS, dCache,
XRootD servers), through the XRootD client's Python bindings (``XRootD.client``).

Why the bindings and not ``xrdcp`` processes: one process per file costs more than a small file's
transfer, and the bindings give the server's statuses as numbers (``xrootd_errors`` classifies
them), not as text on stderr.

Never blocking the event loop: every request goes through ``xrootd_client._submit`` (the
bindings' asynchronous form, answered as an asyncio future); local file reads and writes
(``xrootd_local``) go to a worker thread. Third-party copy (``xrootd_tpc``) runs the one call
without an asynchronous form in threads of its own.

Uploads are written with ``File.write``, 8 MiB requests, 4 in flight: faster than ``xrdcp`` and
the bindings' ``CopyProcess`` in ``bench/remote.py`` (figures: docs/benchmarks.md).

Atomicity (the interface's promise): a copy is written under a hidden temporary name beside its
final one (``.<name>.spool-tmp-<hex>``, the posix backend's convention, so ``is_temp_name``
recognises it and ``list`` skips it), opened with ``POSC`` (the server removes it if this client
vanishes before closing it), its adler32 asked of the server and compared with the catalogue's,
then renamed (``mv``) onto the final name. Any failure, the deadline included, removes the
temporary. A final file already holding the expected checksum and size is left as it is
(redelivered requests succeed without a second transfer).

Credentials (``xrootd_auth``): a bearer token as the ``authz`` CGI of every request, never in
``url()``, errors or logs; X.509 through the client library's ``X509_*`` environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from XRootD import client as xrd
from XRootD.client.flags import AccessMode, DirListFlags, OpenFlags, QueryCode, StatInfoFlags

from common.config import StorageEndpoint
from common.errors import Permanent, Retryable, SpoolError
from common.storage.checksum import format_adler32
from common.storage.interface import CopyDone, ListedFile, ObjectStat, StorageBackend, deadline_for
from common.storage.reasons import expected_adler32 as _expected
from common.storage.tempfiles import is_temp_name, temp_name_for
from common.storage.transfer import local_source, stream_via_node
from common.storage.xrootd_auth import _Token, _x509_environment
from common.storage.xrootd_client import (
    _Clock,
    _configure_client,
    _is,
    _not_found,
    _parse_adler32,
    _submit,
    _unanswered,
)
from common.storage.xrootd_errors import ERR_OPERATION_EXPIRED, Side, classify
from common.storage.xrootd_local import _LocalReader, _LocalWriter
from common.storage.xrootd_tpc import third_party_copy

# Uploads and downloads: requests of CHUNK bytes, IN_FLIGHT of them outstanding (see above).
CHUNK = 8 * 1024 * 1024
IN_FLIGHT = 4
# Cleanup (removing a temporary) after a failure: bounded, the error being reported matters more.
CLEANUP_SECONDS = 10.0

_FILE_MODE = AccessMode.UR | AccessMode.UW | AccessMode.GR | AccessMode.OR
_FREE_RE = re.compile(r"oss\.free=(\d+)")


def _confine(relpath: str) -> str:
    """``relpath`` checked to stay below the endpoint's base, purely lexically (there is no local
    file system to resolve against): no absolute path, no ``..`` / ``.`` / empty component, no
    NUL or control character, and no ``?`` (the start of CGI in an XRootD URL: a path could
    otherwise smuggle options, or a token, into a request)."""
    if (
        not relpath
        or relpath.startswith("/")
        or "?" in relpath
        or any(ord(c) < 0x20 or c == "\x7f" for c in relpath)
        or any(part in ("", ".", "..") for part in relpath.split("/"))
    ):
        raise Permanent("path_outside_area", f"path {relpath!r} does not name a file below the endpoint")
    return relpath


class XrootdStorage:
    """One ``backend = "xrootd"`` endpoint (see the module docstring)."""

    scheme = "root"

    def __init__(self, name: str, endpoint: StorageEndpoint) -> None:
        _configure_client()
        _x509_environment(endpoint)
        assert endpoint.url is not None  # the config validator insists
        self.name = name
        self.kind: str = endpoint.kind
        self.endpoint = endpoint
        scheme, rest = endpoint.url.split("://", 1)
        host, _, base = rest.partition("/")
        self.server = f"{scheme}://{host}"
        # "root://h:p//base/dir/" -> "/base/dir"; the base is the endpoint's root, never written.
        self.base = "/" + "/".join(p for p in base.split("/") if p)
        self._fs = xrd.FileSystem(self.server)
        self._token = _Token(endpoint.token_file)
        self._tpc_pool: ThreadPoolExecutor | None = None

    # -- names ----------------------------------------------------------------------------------
    def _path(self, relpath: str) -> str:
        return f"{self.base.rstrip('/')}/{_confine(relpath)}"

    def _arg(self, path: str) -> str:
        """A server path with the credentials' CGI, for FileSystem requests. Never logged."""
        cgi = self._token.cgi()
        return f"{path}?{cgi}" if cgi else path

    def _transfer_url(self, path: str) -> str:
        """The full URL of a server path with credentials, for File / CopyProcess. Never logged."""
        return f"{self.server}/{self._arg(path)}"

    def _where(self, path: str) -> str:
        return f"{self.server}/{path}"

    def url(self, relpath: str) -> str:
        return self._where(self._path(relpath))

    def local_path(self, relpath: str) -> Path | None:
        return None

    def _limit(self, size: int) -> float:
        return deadline_for(size, self.endpoint.min_rate, self.endpoint.transfer_timeout_floor)

    # -- metadata -------------------------------------------------------------------------------
    async def stat(self, relpath: str, *, checksum: bool = False) -> ObjectStat | None:
        return await self._stat(self._path(relpath), checksum=checksum, side="destination")

    async def _stat(self, path: str, *, checksum: bool, side: Side) -> ObjectStat | None:
        clock = _Clock(self.endpoint.transfer_timeout_floor)
        status, info = await _submit(self._fs.stat, self._arg(path), timeout=clock.left())
        if not status.ok:
            if _not_found(status):
                return None
            raise classify(status, side=side, what=self._where(path))
        if info.flags & StatInfoFlags.IS_DIR:
            return None
        adler = None
        if checksum:
            # The server reads the whole file unless it has the value cached: time by its size.
            adler = await self._server_adler32(path, _Clock(self._limit(info.size)), side=side)
        return ObjectStat(size=int(info.size), adler32=adler)

    async def _server_adler32(self, path: str, clock: _Clock, *, side: Side) -> str | None:
        """The server's adler32 of ``path`` (``query checksum``); None when there is no file.

        A server limits the checksums it computes at once and answers the others "wait N
        seconds" (kXR_wait); when N goes past the request's timeout the client gives up at once
        with "Operation expired" (seen under load on the test server). Such an
        answer, come back well before the deadline, is asked again after a short pause (the
        server's N is advice for the slowest case: a slot frees when any checksum ends).
        """
        pause = 0.1
        while True:
            started = clock.loop.time()
            status, response = await _submit(
                self._fs.query, QueryCode.CHECKSUM, self._arg(path), timeout=clock.left()
            )
            expired_early = _is(status, ERR_OPERATION_EXPIRED, -1) and clock.loop.time() - started < 1.0
            if not expired_early or clock.at - clock.loop.time() < pause + 1.0:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        if not status.ok:
            if _not_found(status):
                return None
            raise classify(status, side=side, what=self._where(path))
        adler = _parse_adler32(response)
        if adler is None:
            raise Retryable("storage_io_error", f"{self._where(path)}: no adler32 in the server's answer")
        return adler

    async def _already_there(self, path: str, size: int, expected: str, clock: _Clock) -> bool:
        """Whether the final file exists with the expected checksum and size (a redelivery)."""
        if await self._server_adler32(path, clock, side="destination") != expected:
            return False
        found = await self._stat(path, checksum=False, side="destination")
        return found is not None and found.size == size

    async def _discard(self, path: str) -> None:
        """Remove a temporary, best effort (the error being reported matters more)."""
        with contextlib.suppress(Exception):
            fut = _submit(self._fs.rm, self._arg(path), timeout=int(CLEANUP_SECONDS))
            await asyncio.wait_for(asyncio.shield(fut), CLEANUP_SECONDS)

    async def _commit(self, tmp: str, path: str, clock: _Clock) -> None:
        status, _ = await _submit(self._fs.mv, self._arg(tmp), self._arg(path), timeout=clock.left())
        if not status.ok:
            raise classify(status, side="destination", what=self._where(path))

    async def _verify(
        self, tmp: str, path: str, size: int, expected: str, clock: _Clock, note: str = ""
    ) -> None:
        """The server's checksum of the written temporary against the catalogue's."""
        got = await self._server_adler32(tmp, clock, side="destination")
        if got != expected:
            raise Retryable(
                "checksum_mismatch",
                f"copy to {self._where(path)}: the server reports adler32 {got}, expected {expected}{note}",
            )

    # -- upload ---------------------------------------------------------------------------------
    async def upload(self, local: Path, relpath: str, *, size: int, adler32: str) -> CopyDone:
        path = self._path(relpath)
        expected = _expected(adler32)
        await self._within_deadline(
            f"upload to {self._where(path)}",
            size,
            lambda clock: self._upload(local, path, size, expected, clock),
        )
        return CopyDone(relpath, size, expected, "local")

    async def _within_deadline(
        self, what: str, size: int, transfer: Callable[[_Clock], Awaitable[None]]
    ) -> None:
        """Run a transfer under its deadline (``deadline_for``); past it, ``transfer_timeout``."""
        limit = self._limit(size)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                await transfer(_Clock(limit))
        except TimeoutError:
            if not deadline.expired():
                raise
            raise Retryable("transfer_timeout", f"{what} did not finish within {limit:.0f} s") from None

    async def _upload(self, local: Path, path: str, size: int, expected: str, clock: _Clock) -> None:
        if await self._already_there(path, size, expected, clock):
            return
        reader = _LocalReader(local)
        try:
            # The source's first bytes before anything is created there: a missing or unreadable
            # local file is reported as the source's fault with nothing to clean up.
            first = await asyncio.to_thread(reader.read, CHUNK)
            await self._upload_from(reader, first, local, path, size, expected, clock)
        finally:
            reader.close()

    async def _upload_from(
        self,
        reader: _LocalReader,
        first: bytes,
        local: Path,
        path: str,
        size: int,
        expected: str,
        clock: _Clock,
    ) -> None:
        tmp = f"{path.rsplit('/', 1)[0]}/{temp_name_for(path.rsplit('/', 1)[1])}"
        f = xrd.File()
        opened = False
        try:
            flags = OpenFlags.NEW | OpenFlags.MAKEPATH | OpenFlags.POSC
            status, _ = await _submit(
                f.open, self._transfer_url(tmp), flags, _FILE_MODE, timeout=clock.left()
            )
            if not status.ok:
                raise classify(status, side="destination", what=self._where(path))
            opened = True
            sent = await self._send(f, reader, first, path, clock)
            opened = False
            status, _ = await _submit(f.close, timeout=clock.left())
            if not status.ok:
                raise classify(status, side="destination", what=self._where(path))
            if sent != size:
                raise Permanent("source_corrupt", f"{local} has {sent} bytes, expected {size}")
            local_adler = format_adler32(reader.adler)
            note = (
                ""
                if local_adler == expected
                else f" (the bytes sent from {local} have adler32 {local_adler})"
            )
            await self._verify(tmp, path, size, expected, clock, note)
            await self._commit(tmp, path, clock)
        except BaseException:
            if opened:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(_submit(f.close, timeout=5)), 5)
            await self._discard(tmp)
            raise

    async def _send(self, f: Any, reader: _LocalReader, data: bytes, path: str, clock: _Clock) -> int:
        """Write the rest of ``reader``'s file (``data`` read already) into the open file,
        IN_FLIGHT requests outstanding; the number of bytes written. The reader keeps the adler32
        of what it read (for the error message of a mismatch)."""
        pending: deque[asyncio.Future[tuple[Any, Any]]] = deque()
        offset = 0
        while data:
            while len(pending) >= IN_FLIGHT:
                await self._written(pending.popleft(), path)
            pending.append(_submit(f.write, data, offset, len(data), timeout=clock.left(), keep=data))
            offset += len(data)
            data = await asyncio.to_thread(reader.read, CHUNK)
        while pending:
            await self._written(pending.popleft(), path)
        return offset

    async def _written(self, fut: asyncio.Future[tuple[Any, Any]], path: str) -> None:
        status, _ = await fut
        if not status.ok:
            raise classify(status, side="destination", what=self._where(path))

    # -- download -------------------------------------------------------------------------------
    async def download(self, relpath: str, local: Path, *, size: int, adler32: str) -> CopyDone:
        path = self._path(relpath)
        expected = _expected(adler32)
        await self._within_deadline(
            f"download of {self._where(path)}",
            size,
            lambda clock: self._download(path, local, size, expected, clock),
        )
        return CopyDone(relpath, size, expected, "local")

    async def _download(self, path: str, local: Path, size: int, expected: str, clock: _Clock) -> None:
        f = xrd.File()
        status, _ = await _submit(f.open, self._transfer_url(path), OpenFlags.READ, 0, timeout=clock.left())
        if not status.ok:
            raise classify(status, side="source", what=self._where(path))
        writer: _LocalWriter | None = None
        try:
            writer = await asyncio.to_thread(_LocalWriter, local)
            pending: deque[asyncio.Future[tuple[Any, Any]]] = deque()
            asked = 0
            while asked < size or pending:
                while asked < size and len(pending) < IN_FLIGHT:
                    n = min(CHUNK, size - asked)
                    pending.append(_submit(f.read, asked, n, timeout=clock.left()))
                    asked += n
                status, data = await pending.popleft()
                if not status.ok:
                    raise classify(status, side="source", what=self._where(path))
                if not data:
                    break  # shorter than expected: caught below
                await asyncio.to_thread(writer.write, data)
            # One byte more than expected must not exist (a longer file is not the catalogue's).
            status, extra = await _submit(f.read, size, 1, timeout=clock.left())
            got_size = writer.size + (len(extra) if status.ok and extra else 0)
            got = format_adler32(writer.adler)
            if got_size != size or got != expected:
                received = (
                    f"download of {self._where(path)}: {'at least ' if got_size > size else ''}{got_size} "
                    f"bytes with adler32 {got}, expected {size} bytes with adler32 {expected}"
                )
                raise await self._bad_download(path, received, size, expected, clock)
            await asyncio.to_thread(writer.commit)
        except BaseException:
            if writer is not None:
                writer.discard()
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(_submit(f.close, timeout=5)), 5)

    # -- copies between endpoints ---------------------------------------------------------------
    async def _bad_download(
        self, path: str, received: str, size: int, expected: str, clock: _Clock
    ) -> SpoolError:
        """The bytes received are not the expected file: is the server's copy bad (``source_corrupt``:
        that copy is marked bad, another source read) or was it the transfer (``source_io_error``:
        tried again)? The server's own size and adler32 decide. (A copy corrupted behind the
        server's back with its mtime kept still shows the server's cached checksum: retried, not
        condemned — the safe side.)"""
        try:
            held = await self._stat(path, checksum=True, side="source")
        except SpoolError:
            held = None
        if held is not None and held.size == size and held.adler32 == expected:
            return Retryable("source_io_error", f"{received}; the server holds the expected file")
        what = f"{held.size} bytes adler32 {held.adler32}" if held is not None else "no such file"
        return Permanent("source_corrupt", f"{received}; the server's copy has {what}")

    def can_pull_from(self, source: StorageBackend) -> bool:
        """XRootD third-party copy from another XRootD endpoint, when this (the destination)
        endpoint is configured ``tpc = true``."""
        return self.endpoint.tpc and isinstance(source, XrootdStorage)

    async def copy_from(
        self, source: StorageBackend, source_relpath: str, relpath: str, *, size: int, adler32: str
    ) -> CopyDone:
        if self.can_pull_from(source):
            assert isinstance(source, XrootdStorage)
            return await third_party_copy(self, source, source_relpath, relpath, size, _expected(adler32))
        self._path(relpath)  # refused before anything moves
        async with local_source(source, source_relpath) as local:  # confined (issue 16)
            if local is not None:
                return await self.upload(local, relpath, size=size, adler32=adler32)
        return await stream_via_node(source, source_relpath, self, relpath, size=size, adler32=adler32)

    # -- the rest -------------------------------------------------------------------------------
    async def delete(self, relpath: str) -> bool:
        path = self._path(relpath)
        clock = _Clock(self.endpoint.transfer_timeout_floor)
        status, _ = await _submit(self._fs.rm, self._arg(path), timeout=clock.left())
        if status.ok:
            return True
        if _not_found(status):
            return False
        raise classify(status, side="destination", what=self._where(path))

    async def free_space(self) -> int | None:
        """``query space`` of the base (``oss.free=<bytes>``); None when the server does not say."""
        clock = _Clock(self.endpoint.transfer_timeout_floor)
        status, response = await _submit(
            self._fs.query, QueryCode.SPACE, self._arg(self.base), timeout=clock.left()
        )
        if not status.ok:
            if _unanswered(status):
                return None  # this server does not tell
            raise classify(status, side="destination", what=self._where(self.base))
        text = response.decode(errors="replace") if isinstance(response, bytes) else str(response or "")
        m = _FREE_RE.search(text)
        if m is None:
            return None
        # XRootD answers "oss.space=0&oss.free=0" for a path that does not exist yet (a new
        # endpoint's base): that is "not told", not "full" (a recall would wait for room for ever).
        if int(m.group(1)) == 0 and re.search(r"oss\.space=0\b", text):
            return None
        return int(m.group(1))

    async def list(  # type: ignore[override]
        self, prefix: str = "", *, temporaries: bool = False
    ) -> AsyncIterator[ListedFile]:
        top = self.base.rstrip("/") + ("/" + _confine(prefix.strip("/")) if prefix.strip("/") else "")
        lead = prefix.strip("/")
        clock = _Clock(self.endpoint.transfer_timeout_floor * 10)
        flags = DirListFlags.STAT | DirListFlags.RECURSIVE
        status, listing = await _submit(self._fs.dirlist, self._arg(top), flags, timeout=clock.left())
        if not status.ok:
            if _not_found(status):
                return
            raise classify(status, side="destination", what=self._where(top))
        for entry in listing or ():
            info = entry.statinfo
            if info is None or info.flags & StatInfoFlags.IS_DIR:
                continue
            if is_temp_name(entry.name.rsplit("/", 1)[-1]) != temporaries:
                continue
            mtime = float(info.modtime) if getattr(info, "modtime", None) else None
            yield ListedFile(f"{lead}/{entry.name}" if lead else entry.name, int(info.size), mtime)

    async def aclose(self) -> None:
        """Stop the third-party copy threads (after the copies in them end). The client library's
        connections belong to the process (shared by every FileSystem / File of a server) and
        close when it exits."""
        pool, self._tpc_pool = self._tpc_pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True)

    def __repr__(self) -> str:
        return f"XrootdStorage({self.name!r}, {self.server}/{self.base})"
