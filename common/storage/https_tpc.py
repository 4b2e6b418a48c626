"""HTTP third-party copy between two ``https`` endpoints configured ``tpc = true``: a WebDAV
``COPY`` makes one server move the file to or from the other, never through this node.

Pull mode by default (``Source:`` on the destination) or push (``Destination:`` on the source),
as the destination endpoint's ``tpc_mode`` says; the remote server gets the other side's bearer
token as ``TransferHeaderAuthorization`` (or ``Credential: none``). The active server answers
with a stream of performance markers read here for progress; a copy whose markers stop moving for
``stall_seconds`` is cancelled (the response closed, which drops the connection: the server
stops), and a ``Failure`` line is classified by ``https_errors.tpc_failure_error`` to the side at
fault. The copy goes into the temporary name and is verified and moved like every copy of the
backend (``HttpsStorage._copy_into`` in ``common.storage.https``). Apart from the backend
because it is its own protocol, with its own stream to read.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Literal

import aiohttp
import structlog

from common.errors import Retryable
from common.storage.https_client import _refuse
from common.storage.https_errors import Side, exception_error, tpc_failure_error
from common.storage.interface import CopyDone
from common.storage.reasons import expected_adler32 as _expected
from common.storage.tempfiles import temp_name_for

if TYPE_CHECKING:
    from common.storage.https import HttpsStorage

log = structlog.get_logger("spool.storage")

TpcMode = Literal["pull", "push"]


async def third_party_copy(
    dest: HttpsStorage, source: HttpsStorage, source_relpath: str, relpath: str, *, size: int, adler32: str
) -> CopyDone:
    source_url = source._url_of(source._components(source_relpath))
    parts = dest._components(relpath)
    want = _expected(adler32)
    final = dest._url_of(parts)
    if await dest._already_there(final, size, want):
        return CopyDone(relpath, size, want, "tpc")
    temp = dest._url_of([*parts[:-1], temp_name_for(parts[-1])])
    remote_side: Side
    if dest.tpc_mode == "pull":
        active, target, remote_side = dest, temp, "source"
        headers = {"Source": source_url}
        remote_token = source._token_or_none()
    else:
        active, target, remote_side = source, source_url, "destination"
        headers = {"Destination": temp}
        remote_token = dest._token_or_none()
    if remote_token is not None:
        headers["TransferHeaderAuthorization"] = f"Bearer {remote_token}"
    else:
        headers["Credential"] = "none"

    async def copy() -> None:
        await _tpc_request(active, target, headers, dest.tpc_mode, remote_side)

    await dest._copy_into(final, temp, parts, size, want, copy)
    log.debug("https_tpc_done", storage=dest.name, mode=dest.tpc_mode, url=dest._public(final), size=size)
    return CopyDone(relpath, size, want, "tpc")


async def _tpc_request(
    active: HttpsStorage, target: str, headers: dict[str, str], mode: TpcMode, remote_side: Side
) -> None:
    """``COPY`` on ``active`` (the server that moves the file); read the marker stream to its result."""
    what = f"COPY ({mode}) {active._public(target)}"
    own_side: Side = "destination" if mode == "pull" else "source"
    resp = await active._send(
        "COPY",
        target,
        side=own_side,
        transfer=True,
        headers=headers,
        client_timeout=aiohttp.ClientTimeout(total=None, sock_connect=active._metadata_timeout),
    )
    loop = asyncio.get_running_loop()
    try:
        if resp.status not in (200, 201, 202):
            raise await _refuse(resp, own_side, what)
        moved, last_move = -1, loop.time()
        while True:
            remaining = last_move + active.stall_seconds - loop.time()
            try:
                line = await asyncio.wait_for(resp.content.readline(), max(remaining, 0.001))
            except TimeoutError:
                raise Retryable(
                    "transfer_timeout", f"{what}: no progress for {active.stall_seconds:.0f} s (stalled)"
                ) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise exception_error(exc, side=own_side, what=what, transfer=True) from None
            if not line:
                raise Retryable("storage_io_error", f"{what}: the marker stream ended without a result")
            text = line.decode("utf-8", errors="replace").strip()
            key, _, rest = text.partition(":")
            key = key.strip().lower()
            if key == "stripe bytes transferred":
                with contextlib.suppress(ValueError):
                    n = int(rest.strip())
                    if n > moved:
                        moved, last_move = n, loop.time()
            elif key == "success":
                return
            elif key == "failure":
                raise tpc_failure_error(rest, remote_side=remote_side, what=what)
    finally:
        resp.close()  # on a stall or the deadline this drops the connection: the server stops
