"""Message models: what travels on the bus, with a schema version.

Every model names its routing key (``ROUTING_KEY``); commands go to one daemon, events are facts
anyone may bind. Between daemons the models travel as msgpack (``common.codec``); from outside they
arrive as CloudEvents JSON and are mapped onto the same models.

Decision on unknown fields from outside: the ``data`` of an external event is **strict** — an
unknown field is rejected with reason ``invalid_message`` naming it. A misspelt ``adler32`` must not
silently skip verification. Free-form facts belong in ``data.metadata``. CloudEvents extension
attributes on the envelope (allowed by the spec) are accepted and ignored.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

# Metadata values are scalars so that "find by metadata" can compare them (=, <, >, in).
MetaValue = str | int | float | bool | None


def new_id() -> str:
    return uuid.uuid4().hex


# The namespace of the message ids derived from facts (recall's since it had them first).
_FACT_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-4f5e-9a53-2f0d4b3c9e71")


def fact_id(*parts: str) -> str:
    """The message id of one fact (event type, then what identifies it: file, storage...): the
    same however often, by whichever path, the event is published, so consumers drop duplicates."""
    return uuid.uuid5(_FACT_NAMESPACE, "\x1f".join(parts)).hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    """Common envelope fields. ``id`` is the event id used to drop duplicates."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ROUTING_KEY: ClassVar[str] = ""

    schema_version: int = SCHEMA_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=256)
    source: str = "spool"
    time: datetime = Field(default_factory=utcnow)
    correlation_id: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is newer than this Spool understands ({SCHEMA_VERSION})")
        return v


_ADLER_RE = re.compile(r"[0-9a-fA-F]{1,8}")


def normalise_adler32(v: Any) -> str | None:
    """Adler-32 as 8 lower-case hex digits (external systems drop leading zeros or use upper case)."""
    if v is None:
        return None
    if not isinstance(v, str) or not _ADLER_RE.fullmatch(v):
        raise ValueError("adler32 must be 1-8 hexadecimal digits")
    return v.lower().zfill(8)


class FileReady(Message):
    """Command to ingest: an instrument says a file in a landing area is complete."""

    ROUTING_KEY: ClassVar[str] = "file.ready"

    path: str = Field(min_length=1, max_length=4096)
    dataset: str = Field(min_length=1, max_length=255)
    # Logical file name; defaults to the path relative to its landing area (decided by ingest).
    name: str | None = Field(default=None, min_length=1, max_length=1024)
    size: int | None = Field(default=None, ge=0)
    adler32: str | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list)

    @field_validator("adler32", mode="before")
    @classmethod
    def _norm_adler(cls, v: Any) -> str | None:
        return normalise_adler32(v)

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("path contains a NUL byte")
        if not v.startswith("/"):
            raise ValueError("path must be absolute")
        return v


class FileIngested(Message):
    """Event: a file is registered with a verified replica on its first disk endpoint."""

    ROUTING_KEY: ClassVar[str] = "file.ingested"

    name: str
    dataset: str
    size: int
    adler32: str
    storage: str
    pfn: str


class ReplicaRequest(Message):
    """Command to the replicator: make a copy of ``name`` (or of each of ``names``) on
    ``destination``.

    ``names`` is the bulk form, sent where many copies are wanted at once (an ingest batch, a rule
    applied to existing files, parked copies re-sent): one message carries up to a few hundred
    files, which divides the per-message cost of the bus. A file of a bulk request that cannot be
    copied at once continues as a single-file request of its own (its retries, dead letter and
    reason are then its own).
    """

    ROUTING_KEY: ClassVar[str] = "replica.request"

    name: str | None = Field(default=None, min_length=1)
    names: list[str] = Field(default_factory=list, max_length=10_000)
    # Bulk form: the correlation id of each of ``names`` (same order), so each file's events keep
    # the id its ``file.ready`` had although one message carries files of many events. Empty: the
    # message's own correlation id applies to every file.
    correlation_ids: list[str | None] = Field(default_factory=list, max_length=10_000)
    destination: str
    rule_id: str | None = None
    priority: int = Field(default=3, ge=0, le=9)

    @model_validator(mode="after")
    def _one_form(self) -> ReplicaRequest:
        if (self.name is None) == (not self.names):
            raise ValueError("give either name or names (a non-empty list), not both")
        if self.correlation_ids and len(self.correlation_ids) != len(self.names):
            raise ValueError("correlation_ids must have one entry per name of names")
        if any(c is not None and len(c) > 256 for c in self.correlation_ids):
            raise ValueError("a correlation id is at most 256 characters")
        return self

    def correlation_of(self, index: int, default: str | None) -> str | None:
        """The correlation id of ``names[index]`` (``default``: the message's)."""
        if self.correlation_ids and self.correlation_ids[index] is not None:
            return self.correlation_ids[index]
        return default

    @property
    def files(self) -> list[str]:
        return [self.name] if self.name is not None else list(self.names)


class CreatedCopy(BaseModel):
    """One verified copy announced by ``replica.created``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pfn: str
    size: int
    adler32: str
    # The file's correlation id (its ``file.ready``'s) when it differs from the event's own: the
    # copies of a bulk request come from many events.
    correlation_id: str | None = Field(default=None, max_length=256)


class ReplicaCreated(Message):
    """Event: verified copies on ``storage``, durable and recorded ``available``.

    One event per ``replica.request``: a bulk request's copies are announced together, so
    ``copies`` lists one entry per file (one entry for a single-file request). One message per
    few hundred copies, not one per copy, is what lets the bus keep up with small files: each
    event is confirmed by the monitor's quorum queue. A redelivered request announces its copies
    again; a consumer keys on (name, storage), not on the event id.
    """

    ROUTING_KEY: ClassVar[str] = "replica.created"

    storage: str
    copies: list[CreatedCopy] = Field(min_length=1, max_length=10_000)

    @property
    def size(self) -> int:
        """Bytes of every copy announced."""
        return sum(c.size for c in self.copies)


class TapeArchive(Message):
    """Command to the tape daemon: write ``name`` to tape endpoint ``destination``."""

    ROUTING_KEY: ClassVar[str] = "tape.archive"

    name: str
    destination: str
    rule_id: str | None = None
    priority: int = Field(default=3, ge=0, le=9)


class FileArchived(Message):
    ROUTING_KEY: ClassVar[str] = "file.archived"

    name: str
    storage: str
    cartridge: str
    fseq: int


class RecallRequest(Message):
    ROUTING_KEY: ClassVar[str] = "recall.request"

    names: list[str] = Field(default_factory=list)
    dataset: str | None = None
    destination: str | None = None
    priority: int = Field(default=3, ge=0, le=9)


class FileRecalled(Message):
    ROUTING_KEY: ClassVar[str] = "file.recalled"

    name: str
    storage: str
    request_id: str


class RecallCompleted(Message):
    ROUTING_KEY: ClassVar[str] = "recall.completed"

    request_id: str
    files: int
    failed: list[str] = Field(default_factory=list)


class FileFailed(Message):
    """Event: handling a message about a file ended in a dead letter (or a failed state)."""

    ROUTING_KEY: ClassVar[str] = "file.failed"

    daemon: str
    reason: str
    error: str
    attempts: int
    name: str | None = None
    path: str | None = None
    dataset: str | None = None
    message_id: str | None = None
    # The storage endpoint the failed work was for (a copy's destination), so the monitor groups
    # failures per endpoint: one full disk must not look like a cause spread over every file.
    endpoint: str | None = None


class EndpointPaused(Message):
    """Event: the replicator's circuit breaker paused an endpoint after consecutive failures."""

    ROUTING_KEY: ClassVar[str] = "endpoint.paused"

    storage: str
    reason: str
    error: str
    failures: int
    cooldown: float  # seconds until one probe copy is let through


class EndpointResumed(Message):
    """Event: a paused endpoint took a probe copy (or an operator set it online); work resumes."""

    ROUTING_KEY: ClassVar[str] = "endpoint.resumed"

    storage: str
    paused_seconds: float
    waiting: int  # parked copies being re-sent


class TapeMounted(Message):
    """Event: a cartridge was loaded into a drive (mounts are what tape scheduling economises)."""

    ROUTING_KEY: ClassVar[str] = "tape.mounted"

    library: str
    drive: str
    cartridge: str
    purpose: str  # archive | recall
    request: str | None = None


class DaemonHeartbeat(Message):
    """Event: who is alive and what it holds right now."""

    ROUTING_KEY: ClassVar[str] = "daemon.heartbeat"

    daemon: str
    instance: str
    host: str
    pid: int
    version: str
    started: datetime
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    details: dict[str, Any] = Field(default_factory=dict)


class AlertRaised(Message):
    """Event: the monitor saw something an operator should hear about once, e.g. a failure reason
    it had not seen before. One alert per new cause, never one per file."""

    ROUTING_KEY: ClassVar[str] = "alert.raised"

    kind: str  # "new_failure_reason"
    severity: str = "warning"
    summary: str
    daemon: str | None = None  # the daemon the alert is about
    reason: str | None = None
    endpoint: str | None = None
    example: str | None = None  # one file (or message id) that failed this way
    error: str | None = None


MODELS: dict[str, type[Message]] = {
    m.ROUTING_KEY: m
    for m in (
        FileReady,
        FileIngested,
        ReplicaRequest,
        ReplicaCreated,
        TapeArchive,
        FileArchived,
        RecallRequest,
        FileRecalled,
        RecallCompleted,
        FileFailed,
        EndpointPaused,
        EndpointResumed,
        TapeMounted,
        DaemonHeartbeat,
        AlertRaised,
    )
}
