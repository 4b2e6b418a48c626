"""The XRootD client library seen from asyncio: requests issued in the bindings' asynchronous form,
their answers as futures, a deadline clock, the library's process-wide settings, and the status
tests the backend branches on.

Why a bridge of our own: the bindings (``XRootD.client``) call a callback on one of the client's
own threads; the daemons run on an event loop that must never block. Every request is issued with
``callback=``; the callback hands the answer to an asyncio future with ``call_soon_threadsafe``
(``_submit``). XRootD wants its timeouts in whole seconds: ``_Clock`` turns one operation's
deadline into the seconds left for each request. Kept apart from the backend
(``common.storage.xrootd``) so the thread-to-loop handover, the one subtle part (buffers held until
the client is done with them), is read and changed in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
from collections.abc import Callable
from typing import Any

from XRootD import client as xrd

from common.storage.checksum import normalise_adler32
from common.storage.xrootd_errors import (
    ERR_CHECKSUM_ERROR,
    ERR_ERROR_RESPONSE,
    ERR_NOT_FOUND,
    ERR_NOT_SUPPORTED,
    ERR_QUERY_NOT_SUPPORTED,
    KXR_ARG_INVALID,
    KXR_CHKSUM_ERR,
    KXR_NOT_FOUND,
    KXR_UNSUPPORTED,
)

_CKSUM_RE = re.compile(r"adler32[\s:]+([0-9a-fA-F]{1,8})\b")


# -- the client library's process-wide settings ---------------------------------------------------
_configured = False


def _configure_client() -> None:
    """Fail fast on a dead endpoint and notice soon that it is back: the client's defaults retry
    a connection for minutes (``ConnectionWindow`` 120 s x ``ConnectionRetry`` 5) and, once a
    connection broke, fail every request to that server at once for ``StreamErrorWindow``
    (1800 s) before trying again. The replicator has its own retry tiers and breaker. Explicit
    ``XRD_*`` environment variables win."""
    global _configured
    if _configured:
        return
    _configured = True
    for key, value in (("ConnectionWindow", 10), ("ConnectionRetry", 2), ("StreamErrorWindow", 10)):
        if f"XRD_{key.upper()}" not in os.environ:
            xrd.EnvPutInt(key, value)


# -- callbacks to futures ---------------------------------------------------------------------------
def _settle(fut: asyncio.Future[tuple[Any, Any]], value: tuple[Any, Any]) -> None:
    if not fut.done():  # cancelled (deadline) before the server answered
        fut.set_result(value)


def _submit(
    method: Callable[..., Any], *args: Any, timeout: int, keep: object = None
) -> asyncio.Future[tuple[Any, Any]]:
    """Issue ``method(*args, timeout=..., callback=...)`` and return a future of its
    ``(status, response)``. The callback runs on a client thread; the future is settled on the
    event loop. A request the client refuses to send settles at once with that status.

    ``keep``: an object the request uses without a copy (``File.write`` sends straight from the
    bytes' own buffer), held by the callback until the client is done with the request, even if
    the caller stopped waiting (a deadline): freed earlier, the socket sends freed memory (seen
    as EINVAL socket errors).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[tuple[Any, Any]] = loop.create_future()

    def done(status: Any, response: Any, _hosts: Any = None, _keep: object = keep) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(_settle, fut, (status, response))

    sent = method(*args, timeout=timeout, callback=done)
    if not sent.ok:
        fut.set_result((sent, None))
    return fut


class _Clock:
    """The deadline of one operation, in the event loop's time; XRootD wants whole seconds."""

    __slots__ = ("at", "loop")

    def __init__(self, seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.at = self.loop.time() + seconds

    def left(self) -> int:
        return max(1, min(65535, math.ceil(self.at - self.loop.time())))


def _is(status: Any, client_code: int, server_code: int) -> bool:
    """Whether ``status`` is the client's ``client_code`` or the server's ``server_code``."""
    code = int(getattr(status, "code", 0) or 0)
    return code == client_code or (code == ERR_ERROR_RESPONSE and getattr(status, "errno", 0) == server_code)


def _not_found(status: Any) -> bool:
    return _is(status, ERR_NOT_FOUND, KXR_NOT_FOUND)


def _checksum_error(status: Any) -> bool:
    return _is(status, ERR_CHECKSUM_ERROR, KXR_CHKSUM_ERR)


def _unanswered(status: Any) -> bool:
    """A query this server does not answer (rather than one that failed)."""
    code = int(getattr(status, "code", 0) or 0)
    server = getattr(status, "errno", 0)
    return code in (ERR_NOT_SUPPORTED, ERR_QUERY_NOT_SUPPORTED) or (
        code == ERR_ERROR_RESPONSE and server in (KXR_UNSUPPORTED, KXR_NOT_FOUND, KXR_ARG_INVALID)
    )


def _parse_adler32(response: Any) -> str | None:
    text = response.decode(errors="replace") if isinstance(response, bytes) else str(response or "")
    m = _CKSUM_RE.search(text.replace("\x00", " "))
    return normalise_adler32(m.group(1)) if m else None
