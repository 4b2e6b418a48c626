"""The two outcomes a handler may raise besides success.

The consumer runner (``common.bus.consumer``) is the one place that turns them into an ack, a
retry tier or a dead letter. Every error carries a short machine-readable ``reason`` code (what the
monitor groups by) and the human message.
"""

from __future__ import annotations

from collections.abc import Sequence


class SpoolError(Exception):
    """Base of classified errors: ``reason`` is a stable snake_case code, ``message`` is for humans."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Retryable(SpoolError):
    """Transient: network, endpoint down, timeout, destination not writable. Tried again later."""


class Permanent(SpoolError):
    """Will never succeed as sent: invalid message, checksum mismatch at source, conflict."""


class InvalidMessage(Permanent):
    """The body could not be decoded or validated; it goes straight to the dead-letter queue."""


class ConfigError(Exception):
    """A bad configuration file or environment variable; the text names the bad key."""


UNKNOWN_SAMPLE = 10  # names quoted in the one error of a bulk command with unknown names


def unknown_names(unknown: Sequence[str], total: int) -> Permanent:
    """One permanent failure for all the unknown names of a bulk command (``replica.request``,
    ``tape.archive`` with ``names``).

    Decision: a bulk command naming files the catalogue does not know is one mistake of its
    sender, not one per name. Its known files are served (and announced) first; then the command
    dead-letters once, with one ``file.failed``, reason ``unknown_file``, giving the count and the
    first few names (``spool dead show`` has the whole list in the body). Re-sending each unknown
    name alone made 10,000 dead letters and 10,000 events of one request, and queued them before
    real copies.
    """
    sample = ", ".join(repr(n[:200]) for n in unknown[:UNKNOWN_SAMPLE])
    more = f" and {len(unknown) - UNKNOWN_SAMPLE} more" if len(unknown) > UNKNOWN_SAMPLE else ""
    return Permanent(
        "unknown_file",
        f"{len(unknown)} of the {total} files of this bulk request are not in the catalogue: {sample}{more}",
    )
