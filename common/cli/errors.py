"""Which failures are the operator's to fix, and the one line that says so.

``spool`` commands and ``spool run <daemon>`` end on an operator mistake (a bad catalogue URL, a
closed database port, an unwritable ``state_dir``, a broker that is down, queues that do not exist
yet, a config file that is not TOML or has a key of the wrong type) with one line and a non-zero
exit code, never a traceback. ``classify`` is the one mapping from exception to that line; it
knows the exception *classes* (not the examples), so a mistake nobody listed gets a line too.

Exit codes: 1 a mistake in the command line (``UserError``), 2 the configuration, 3 something the
command needs is unavailable or refused (broker, catalogue, file system), 70 a bug (an exception of
no known class: one line too, ``SPOOL_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Any

from common.cli._util import UserError, one_line
from common.errors import ConfigError, SpoolError

EXIT_USAGE, EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_BUG = 1, 2, 3, 70


@dataclass(frozen=True)
class OperatorError:
    reason: str | None  # stable snake_case code; None for usage and config mistakes
    message: str
    exit_code: int

    def line(self) -> str:
        label = "error" if self.reason is None else f"error ({self.reason})"
        return f"{label}: {self.message}"


def classify(exc: BaseException) -> OperatorError | None:
    """The operator-facing line for ``exc``, or None when it is of no known class (a bug)."""
    if isinstance(exc, UserError):
        return OperatorError(None, one_line(exc), EXIT_USAGE)
    if isinstance(exc, ConfigError):
        return OperatorError(None, one_line(exc), EXIT_CONFIG)
    if isinstance(exc, SpoolError):
        return OperatorError(exc.reason, one_line(exc.message), EXIT_UNAVAILABLE)
    # Libraries are looked up only if already imported: a command that never loaded SQLAlchemy or
    # aiormq cannot fail with their errors, and importing them costs start-up time.
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(exc, pydantic.ValidationError):
        # Values given to a command that a message may not carry (bounds of common.limits).
        return OperatorError("invalid_message", _validation_text(exc), EXIT_USAGE)
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.SQLAlchemyError):
        return OperatorError("catalogue", _first_line(exc), EXIT_UNAVAILABLE)
    amqp_exc = sys.modules.get("aiormq.exceptions")
    if amqp_exc is not None:
        if isinstance(exc, amqp_exc.ChannelNotFoundEntity):
            return OperatorError(
                "queue_missing",
                f"{_first_line(exc)} (queues are declared when a daemon first starts: `spool run ...`)",
                EXIT_UNAVAILABLE,
            )
        if isinstance(exc, amqp_exc.AMQPError):
            return OperatorError("broker_error", _first_line(exc), EXIT_UNAVAILABLE)
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return OperatorError("unreachable", _first_line(exc), EXIT_UNAVAILABLE)
    if isinstance(exc, OSError):
        return OperatorError("os_error", _os_text(exc), EXIT_UNAVAILABLE)
    return None


def _validation_text(exc: Any) -> str:
    """``metadata: at most 64 keys; names: ...`` from a pydantic ``ValidationError`` (3 at most)."""
    parts = [
        f"{'.'.join(str(p) for p in e.get('loc', ()))[:64] or 'value'}: {e.get('msg', '')}"
        for e in exc.errors()[:3]
    ]
    return one_line("; ".join(parts))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return one_line(text.splitlines()[0]) if text else type(exc).__name__


def _os_text(exc: OSError) -> str:
    """``No such file or directory: /proc/nope`` (``[Errno 2]`` and quotes only add noise)."""
    what = exc.strerror or _first_line(exc)
    if exc.filename is not None:
        what += f": {exc.filename}"
        if exc.filename2 is not None:
            what += f" -> {exc.filename2}"
    return one_line(what)


def bug(exc: BaseException) -> OperatorError:
    return OperatorError(
        "internal_error",
        f"{type(exc).__name__}: {_first_line(exc)} (a bug; SPOOL_DEBUG=1 shows the traceback)",
        EXIT_BUG,
    )
