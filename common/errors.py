"""The two outcomes a handler may raise besides success.

The consumer runner (``common.bus.consumer``) is the one place that turns them into an ack, a
retry tier or a dead letter. Every error carries a short machine-readable ``reason`` code (what the
monitor groups by) and the human message.
"""

from __future__ import annotations


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
