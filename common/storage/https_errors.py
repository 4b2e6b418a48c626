"""HTTP / WebDAV answers and client exceptions -> classified ``SpoolError`` (the https backend).

One table, one function per kind of failure, so the replicator, the breaker and the monitor see
the same reasons whichever server answered. Which *side* asked matters:

- ``destination``: a write to this endpoint (PUT, MKCOL, MOVE, DELETE, COPY into it). Failures are
  ``Retryable`` and the breaker counts them (``disk_full``, ``destination_not_writable``, ...);
- ``source``: reading a file this endpoint holds in order to copy it elsewhere (GET, the source of
  a third-party copy). ``404`` is ``Permanent("source_missing")`` (that copy is bad, another source
  is tried); a server problem is ``source_io_error`` (not the destination's fault);
- ``metadata``: HEAD / PROPFIND (the callers handle 404 themselves).

What servers answer (the bodies are matched because the statuses alone do not say enough):

- local XrdHttp 5.5 (tests/test_storage_https.py): PUT into a ``r/o`` export -> ``500`` "file path
  marked read/only"; COPY into it -> ``400`` with the same text; a PUT that runs out of space
  (ENOSPC) -> the connection is closed without an answer (the backend then asks whether the
  server is still up: ``storage_io_error`` if so, ``endpoint_unavailable`` if not); a third-party
  copy that runs out of space -> ``failure: ... no space left on device (code=28)`` in the marker
  stream; MKCOL into ``r/o`` -> ``500``;
- dCache (WebDAV door): ``507 Insufficient Storage`` when the pools are full (since 2.16,
  dCache PR #3716; also on GET when a pool-to-pool copy or stage finds no space, PR #6098), but
  ``500`` with "No write pools online" (dCache issue #7912) or "user quota exceeded" (#7747);
  ``401`` without / ``403`` with insufficient credentials; ``405`` for MKCOL on an existing
  directory.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from typing import Literal

import aiohttp

from common.errors import Permanent, Retryable, SpoolError

Side = Literal["source", "destination", "metadata"]

# Body texts (lower case) that say more than the status: checked first, on writes.
_FULL_TEXTS = (
    "no write pools online",
    "all pools full",
    "quota exceeded",
    "no space left",
    "code=28",
    "enospc",
    "insufficient storage",
)
_READ_ONLY_TEXTS = ("read/only", "read-only", "read only file system", "permission denied")

# (statuses, side or None for any) -> (class, reason). The first matching row wins.
_Row = tuple[frozenset[int], Side | None, type[SpoolError], str]
_TABLE: tuple[_Row, ...] = (
    (frozenset({401, 403}), None, Retryable, "auth_failed"),
    (frozenset({507}), None, Retryable, "disk_full"),
    (frozenset({413}), "destination", Retryable, "disk_full"),  # "payload too large": a quota
    (frozenset({404, 410}), "source", Permanent, "source_missing"),
    (frozenset({405, 409}), "destination", Retryable, "destination_not_writable"),
    (frozenset({408, 504}), "source", Retryable, "transfer_timeout"),
    (frozenset({408, 504}), "destination", Retryable, "transfer_timeout"),
    (frozenset({408, 504}), "metadata", Retryable, "endpoint_unavailable"),
    (frozenset({429, 500, 502, 503}), "source", Retryable, "source_io_error"),
    (frozenset({429, 500, 502, 503}), None, Retryable, "endpoint_unavailable"),
)
# Anything else: by side (a 4xx we did not foresee, another 5xx).
_OTHER: dict[Side, str] = {
    "source": "source_io_error",
    "destination": "storage_io_error",
    "metadata": "storage_io_error",
}
_SERVER_ERROR: dict[Side, str] = {
    "source": "source_io_error",
    "destination": "endpoint_unavailable",
    "metadata": "endpoint_unavailable",
}

_BEARER = re.compile(r"\b(bearer)\s+[^\s\"',;)]+", re.IGNORECASE)
# A URL's query: dCache's redirects to pool nodes carry a token there, XrdHttp's "authz=".
_QUERY = re.compile(r"(\w+://[^\s'\"?]+)\?[^\s'\"]*")


def redact(text: str, limit: int = 300) -> str:
    """A server's or a client library's text fit for a message: one line, bounded, bearer
    tokens and URL queries blanked."""
    flat = " ".join(text.split())
    flat = _BEARER.sub(r"\1 <redacted>", flat)
    flat = _QUERY.sub(r"\1?<redacted>", flat)
    return flat[:limit] + ("..." if len(flat) > limit else "")


def status_error(status: int, body: str, *, side: Side, what: str) -> SpoolError:
    """The error for an HTTP answer ``status`` with ``body`` to ``what`` (method and URL)."""
    text = body.lower()
    detail = f"{what}: HTTP {status}" + (f" ({redact(body)})" if body.strip() else "")
    if side == "destination" and status >= 400 and status not in (401, 403):
        if any(t in text for t in _FULL_TEXTS):
            return Retryable("disk_full", detail)
        if any(t in text for t in _READ_ONLY_TEXTS):
            return Retryable("destination_not_writable", detail)
    if side == "source" and 400 <= status < 500 and "no such file" in text:
        # XrdHttp answers a push-mode COPY of a missing file 400 "Unable to open ...; no such file".
        return Permanent("source_missing", detail)
    for statuses, row_side, cls, reason in _TABLE:
        if status in statuses and (row_side is None or row_side == side):
            return cls(reason, detail)
    if status >= 500:
        return Retryable(_SERVER_ERROR[side], detail)
    return Retryable(_OTHER[side], detail)


class NoAnswer(Retryable):
    """A request that got no HTTP answer (refused, reset, closed, timed out): the reason alone
    does not say whether the server is down or closed one connection on a write error."""


def exception_error(exc: BaseException, *, side: Side, what: str, transfer: bool) -> SpoolError:
    """The error for a client exception (no answer): refused, reset, timed out, TLS refused."""
    if isinstance(exc, SpoolError):
        return exc
    detail = f"{what}: {type(exc).__name__}: {redact(str(exc))}".rstrip(": ")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        # The server's certificate is not trusted (ca_path) or ours is refused: an operator's job.
        return Retryable("auth_failed", detail)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        if transfer:
            return NoAnswer("transfer_timeout", detail)
        return NoAnswer("source_io_error" if side == "source" else "endpoint_unavailable", detail)
    if side == "source":
        return NoAnswer("source_io_error", detail)
    return NoAnswer("endpoint_unavailable", detail)


_CODE = re.compile(r"status code (\d{3})")


def tpc_failure_error(text: str, *, remote_side: Side, what: str) -> SpoolError:
    """The error for a third-party copy's final ``failure: ...`` line.

    ``remote_side`` is the side of the server the active one talked to (in pull mode the source,
    in push mode the destination). XrdHttp words a remote problem "Remote side failed with status
    code 404"; a local one names the file system error ("no space left on device (code=28)").
    """
    lower = text.lower()
    if "remote side" in lower and (m := _CODE.search(lower)):
        return status_error(int(m.group(1)), text, side=remote_side, what=what)
    if any(t in lower for t in _FULL_TEXTS):
        return Retryable("disk_full", f"{what}: {redact(text)}")
    if any(t in lower for t in _READ_ONLY_TEXTS):
        return Retryable("destination_not_writable", f"{what}: {redact(text)}")
    if remote_side == "destination" and ("no such file" in lower or "not found" in lower):
        # Push mode: the active server is the source, and it could not open its own file.
        return Permanent("source_missing", f"{what}: {redact(text)}")
    if "timeout" in lower or "timed out" in lower:
        return Retryable("transfer_timeout", f"{what}: {redact(text)}")
    return Retryable("storage_io_error", f"{what}: {redact(text)}")
