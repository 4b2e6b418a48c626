"""XRootD statuses -> classified ``SpoolError``s: the one table the xrootd backend consults.

An ``XRootDStatus`` says what went wrong at two levels: ``code`` is the client's own (a socket
error, an expired request, an authentication failure, ``errErrorResponse`` = 400 when the server
answered with an error) and, for 400, ``errno`` is the server's ``kXR_*`` code (XProtocol.hh:
3005 kXR_FSError, 3009 kXR_NoSpace, 3010 kXR_NotAuthorized, 3011 kXR_NotFound, 3025
kXR_fsReadOnly ...). The replicator acts on *which side* failed (a source copy that is gone is
marked bad and another source tried; a destination that is full trips its breaker), so the same
status maps to different reasons for a source and for a destination: ``side`` says which.

Servers of the 5.x line answer several write refusals with the catch-all kXR_FSError (3005) and
the errno's text ("file path marked read/only", "no space left on device"): for 3005 the text
decides. kXR_NotAuthorized (3010) is ``auth_failed`` even where the text says "permission
denied": the server answers an authorization library's refusal (a token without the write scope)
and a POSIX EACCES on its own disk (a directory it may not write) with the same code and words,
so they cannot be told apart; either way the endpoint is paused until an operator looks.

Messages are scrubbed of any ``authz=`` CGI before they go into an error (a token must never
reach a log).
"""

from __future__ import annotations

import errno as errno_mod
import re
from typing import Any, Literal

from common.errors import Permanent, Retryable, SpoolError

Side = Literal["source", "destination"]

# Client-side codes (XrdClStatus.hh; the bindings' XRootDStatus.err* constants).
ERR_OS_ERROR = 12
ERR_NOT_SUPPORTED = 13
ERR_DATA_ERROR = 14
ERR_NO_MORE_REPLICAS = 16
ERR_INVALID_ADDR = 101
ERR_SOCKET_ERROR = 102
ERR_SOCKET_TIMEOUT = 103
ERR_SOCKET_DISCONNECTED = 104
ERR_POLLER_ERROR = 105
ERR_SOCKET_OPT_ERROR = 106
ERR_STREAM_DISCONNECT = 107
ERR_CONNECTION_ERROR = 108
ERR_INVALID_SESSION = 109
ERR_TLS_ERROR = 110
ERR_INVALID_MESSAGE = 201
ERR_HANDSHAKE_FAILED = 202
ERR_LOGIN_FAILED = 203
ERR_AUTH_FAILED = 204
ERR_QUERY_NOT_SUPPORTED = 205
ERR_OPERATION_EXPIRED = 206
ERR_OPERATION_INTERRUPTED = 207
ERR_THRESHOLD_EXCEEDED = 208
ERR_INVALID_REDIRECT_URL = 302
ERR_INVALID_RESPONSE = 303
ERR_NOT_FOUND = 304
ERR_CHECKSUM_ERROR = 305
ERR_REDIRECT_LIMIT = 306
ERR_CORRUPTED_HEADER = 307
ERR_ERROR_RESPONSE = 400
ERR_LOCAL_ERROR = 402

# Server codes carried in ``errno`` when ``code == 400`` (XProtocol.hh, XErrorCode).
KXR_ARG_INVALID = 3000
KXR_FS_ERROR = 3005
KXR_IO_ERROR = 3007
KXR_NO_SPACE = 3009
KXR_NOT_AUTHORIZED = 3010
KXR_NOT_FOUND = 3011
KXR_SERVER_ERROR = 3012
KXR_UNSUPPORTED = 3013
KXR_NO_SERVER = 3014
KXR_NOT_FILE = 3015
KXR_IS_DIRECTORY = 3016
KXR_CANCELLED = 3017
KXR_CHKSUM_ERR = 3019
KXR_OVER_QUOTA = 3021
KXR_OVERLOADED = 3024
KXR_FS_READ_ONLY = 3025
KXR_NO_REPLICAS = 3029
KXR_AUTH_FAILED = 3030
KXR_REQ_TIMED_OUT = 3034
KXR_TIMER_EXPIRED = 3035

# The endpoint cannot be reached or talked to: the connection, not the request, failed.
_UNREACHABLE = frozenset({
    ERR_NO_MORE_REPLICAS, ERR_INVALID_ADDR, ERR_SOCKET_ERROR, ERR_SOCKET_TIMEOUT,
    ERR_SOCKET_DISCONNECTED, ERR_POLLER_ERROR, ERR_SOCKET_OPT_ERROR, ERR_STREAM_DISCONNECT,
    ERR_CONNECTION_ERROR, ERR_INVALID_SESSION, ERR_TLS_ERROR, ERR_INVALID_MESSAGE,
    ERR_HANDSHAKE_FAILED, ERR_OPERATION_EXPIRED, ERR_OPERATION_INTERRUPTED,
    ERR_INVALID_REDIRECT_URL, ERR_INVALID_RESPONSE, ERR_REDIRECT_LIMIT, ERR_CORRUPTED_HEADER,
})  # fmt: skip
_SERVER_UNAVAILABLE = frozenset({KXR_SERVER_ERROR, KXR_NO_SERVER, KXR_OVERLOADED, KXR_NO_REPLICAS})
_SERVER_TIMEOUT = frozenset({KXR_REQ_TIMED_OUT, KXR_TIMER_EXPIRED})
_AUTH = frozenset({ERR_LOGIN_FAILED, ERR_AUTH_FAILED})

_AUTHZ = re.compile(r"(authz=)[^&\s]*", re.IGNORECASE)
_READ_ONLY_TEXT = ("read/only", "read-only", "read only", "permission denied", "not permitted")
_FULL_TEXT = ("no space", "quota")


def scrub(text: str) -> str:
    """``text`` with any ``authz=<token>`` CGI value blanked out."""
    return _AUTHZ.sub(r"\1***", text)


def describe(status: Any) -> str:
    """The status's message on one line, without credentials."""
    message = str(getattr(status, "message", "") or "").replace("[ERROR] ", "").strip()
    return scrub(" ".join(message.split()))


def classify(status: Any, *, side: Side, what: str) -> SpoolError:
    """The classified error for a failed ``status`` met while working on ``what`` (a URL
    without credentials) on the ``side`` of a copy it belongs to."""
    code = int(getattr(status, "code", 0) or 0)
    server = int(getattr(status, "errno", 0) or 0)
    text = f"{what}: {describe(status)}"
    reason = _reason(code, server, describe(status).lower(), side)
    if reason == "source_missing":
        return Permanent(reason, text)
    return Retryable(reason, text)


def _reason(code: int, server: int, message: str, side: Side) -> str:
    source = side == "source"
    if code in _UNREACHABLE:
        return "source_io_error" if source else "endpoint_unavailable"
    if code in _AUTH:
        return "auth_failed"
    if code == ERR_THRESHOLD_EXCEEDED:
        return "transfer_timeout"
    if code == ERR_CHECKSUM_ERROR:
        return "checksum_mismatch"
    if code == ERR_NOT_FOUND:
        return "source_missing" if source else "storage_io_error"
    if code in (ERR_OS_ERROR, ERR_LOCAL_ERROR):
        return local_reason(server, message, side)
    if code != ERR_ERROR_RESPONSE:
        return "source_io_error" if source else "storage_io_error"
    # The server answered with an error: its kXR code says what.
    if server in (KXR_NOT_FOUND, KXR_NOT_FILE, KXR_IS_DIRECTORY):
        return "source_missing" if source else "storage_io_error"
    if server in (KXR_NOT_AUTHORIZED, KXR_AUTH_FAILED):
        return "auth_failed"
    if server in _SERVER_UNAVAILABLE:
        return "source_io_error" if source else "endpoint_unavailable"
    if server in _SERVER_TIMEOUT:
        return "source_io_error" if source else "transfer_timeout"
    if server == KXR_CHKSUM_ERR:
        return "checksum_mismatch"
    if source:
        return "source_io_error"
    if server in (KXR_NO_SPACE, KXR_OVER_QUOTA):
        return "disk_full"
    if server == KXR_FS_READ_ONLY:
        return "destination_not_writable"
    if server in (KXR_FS_ERROR, KXR_CANCELLED):
        # The catch-all: the errno's text tells (5.x servers answer EROFS, ENOSPC this way; a
        # third-party copy's failure arrives as 3005 "... (destination)").
        if any(t in message for t in _FULL_TEXT):
            return "disk_full"
        if any(t in message for t in _READ_ONLY_TEXT):
            return "destination_not_writable"
    return "storage_io_error"


def local_reason(local_errno: int, message: str, side: Side) -> str:
    """A local error of the client (a file on this node): its errno, when it carries one."""
    if side == "source":
        if local_errno in (errno_mod.ENOENT, errno_mod.ENOTDIR, KXR_NOT_FOUND) or "no such file" in message:
            return "source_missing"
        return "source_io_error"
    if local_errno in (errno_mod.ENOSPC, errno_mod.EDQUOT, KXR_NO_SPACE) or "no space" in message:
        return "disk_full"
    if local_errno in (errno_mod.EROFS, errno_mod.EACCES, errno_mod.EPERM):
        return "destination_not_writable"
    return "storage_io_error"
