"""Message models: what travels on the bus, with a schema version.

Every model names its routing key (``ROUTING_KEY``); commands go to one daemon, events are facts
anyone may bind. Between daemons the models travel as msgpack (``common.codec``); from outside they
arrive as CloudEvents JSON and are mapped onto the same models.

Decision on unknown fields from outside: the ``data`` of an external event is **strict** — an
unknown field is rejected with reason ``invalid_message`` naming it. A misspelt ``adler32`` must not
silently skip verification. Free-form facts belong in ``data.metadata``. CloudEvents extension
attributes on the envelope (allowed by the spec) are accepted and ignored.

Every field is bounded (``common.limits``) and, when a message is decoded (``common.codec``),
typed strictly: ``size: "2558"``, ``size: true``, ``priority: "7"``, ``2.0`` for an integer or a
string for a list are refused with ``invalid_message`` naming the field, never coerced. Only
timestamps are parsed from text (ISO 8601: that is how JSON and Spool's msgpack carry them); a
timestamp without a UTC offset is taken as UTC, so no consumer compares naive and aware times.
Models built inside Spool are validated with the same bounds but lax types (a ``Path`` for a name).
Text Spool writes itself (an error message, an alert summary) is truncated, not refused: a long
error must not stop the failure being reported.
"""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from common import limits
from common.storage.checksum import normalise_sha256

SCHEMA_VERSION = 1


def _truncated(v: Any) -> Any:
    return limits.truncate(v) if isinstance(v, str) else v


def _timestamp(v: Any) -> Any:
    """ISO 8601 text -> datetime (strict mode refuses text otherwise); numbers stay refused."""
    if isinstance(v, str):
        if len(v) > limits.MAX_TIMESTAMP:
            raise ValueError(f"timestamp is longer than {limits.MAX_TIMESTAMP} characters")
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            raise ValueError("timestamp is not ISO 8601") from None
    return v


def _utc(v: datetime) -> datetime:
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


# Bounded, non-empty strings without control characters.
_CLEAN = AfterValidator(limits.no_control)
Identifier = Annotated[str, Field(min_length=1, max_length=limits.MAX_ID), _CLEAN]
# Lengths only: whether a name is a clean relative path, with components the file system can
# hold, is ingest's decision (``name_too_long``, ``invalid_name``), recorded against the file.
LogicalName = Annotated[str, Field(min_length=1, max_length=limits.MAX_NAME), _CLEAN]
DatasetName = Annotated[str, Field(min_length=1, max_length=limits.MAX_DATASET), _CLEAN]
EndpointName = Annotated[str, Field(min_length=1, max_length=limits.MAX_ENDPOINT), _CLEAN]
ReasonCode = Annotated[str, Field(min_length=1, max_length=limits.MAX_REASON), _CLEAN]
FreeText = Annotated[str, BeforeValidator(_truncated)]
Timestamp = Annotated[datetime, BeforeValidator(_timestamp), AfterValidator(_utc)]
Bytes = Annotated[int, Field(ge=0, le=limits.MAX_SIZE)]
Count = Annotated[int, Field(ge=0, le=limits.MAX_COUNT)]
Priority = Annotated[int, Field(ge=0, le=9)]
Seconds = Annotated[float, Field(ge=0, le=limits.MAX_SECONDS), AfterValidator(_finite)]
MetaKey = Annotated[str, Field(min_length=1, max_length=limits.MAX_META_KEY), _CLEAN]
MetaInt = Annotated[int, Field(ge=limits.INT64_MIN, le=limits.INT64_MAX)]
MetaFloat = Annotated[float, AfterValidator(_finite)]
MetaStr = Annotated[str, Field(max_length=limits.MAX_META_STR)]
# Metadata values are scalars so that "find by metadata" can compare them (=, <, >, in).
# (``bool`` first: in lax mode ``True`` would otherwise be taken for the integer 1.)
MetaValue = bool | MetaInt | MetaFloat | MetaStr | None
Metadata = dict[MetaKey, MetaValue]
NameList = list[LogicalName]


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


def _bounded_list(v: Any, limit: int, what: str) -> Any:
    """Refuse an over-long list before its items are validated one by one."""
    if isinstance(v, list) and len(v) > limit:
        raise ValueError(f"{what} has {len(v)} entries, at most {limit} allowed")
    return v


def _names_within_bytes(names: list[str]) -> list[str]:
    total = sum(len(n.encode()) for n in names)
    if total > limits.MAX_NAMES_BYTES:
        raise ValueError(f"names total {total} bytes, at most {limits.MAX_NAMES_BYTES} allowed")
    return names


# The names a command may carry (a bulk replica.request, a recall.request): at most MAX_NAMES
# entries, refused before each is validated, and MAX_NAMES_BYTES in all.
BoundedNames = Annotated[
    NameList,
    BeforeValidator(lambda v: _bounded_list(v, limits.MAX_NAMES, "names")),
    AfterValidator(_names_within_bytes),
]


class Message(BaseModel):
    """Common envelope fields. ``id`` is the event id used to drop duplicates."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ROUTING_KEY: ClassVar[str] = ""

    schema_version: Annotated[int, Field(ge=0)] = SCHEMA_VERSION
    id: Identifier = Field(default_factory=new_id)
    source: Identifier = "spool"
    time: Timestamp = Field(default_factory=utcnow)
    # Bounded, not checked for control characters: it is copied from the AMQP property of a
    # request (at most 255 bytes) into the events answering it, which must never fail to build.
    correlation_id: Annotated[str, Field(max_length=limits.MAX_ID)] | None = None

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


Adler32 = Annotated[str, BeforeValidator(normalise_adler32)]

# sha256 as 64 lower-case hex digits, the catalogue's form (``files.sha256``).
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, BeforeValidator(normalise_sha256)]


def check_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The whole of a file's metadata: key count and encoded size (each key and value is bounded
    by its own type). Also used by ingest before any byte moves."""
    if len(meta) > limits.MAX_META_KEYS:
        raise ValueError(f"has {len(meta)} keys, at most {limits.MAX_META_KEYS} allowed")
    size = limits.json_size(meta)
    if size > limits.MAX_META_BYTES:
        raise ValueError(f"is {size} bytes as JSON, at most {limits.MAX_META_BYTES} allowed")
    return meta


def _metadata_before(v: Any) -> Any:
    """Metadata refused before its values are validated one by one: too many keys, or an integer
    out of int64 (which would otherwise pass as a float, losing digits)."""
    if isinstance(v, dict):
        if len(v) > limits.MAX_META_KEYS:
            raise ValueError(f"has {len(v)} keys, at most {limits.MAX_META_KEYS} allowed")
        for value in v.values():
            out = not limits.INT64_MIN <= value <= limits.INT64_MAX if type(value) is int else False
            if out:
                raise ValueError("an integer value is outside the 64-bit range")
    return v


class FileReady(Message):
    """Command to ingest: an instrument says a file in a landing area is complete."""

    ROUTING_KEY: ClassVar[str] = "file.ready"

    path: str = Field(min_length=1, max_length=limits.MAX_PATH_BYTES)
    dataset: DatasetName
    # Logical file name; defaults to the path relative to its landing area (decided by ingest).
    name: LogicalName | None = None
    size: Bytes | None = None
    adler32: Adler32 | None = None
    # Verified against what ingest reads (same pass as adler32) when given; recorded either way.
    sha256: Sha256 | None = None
    metadata: Metadata = Field(default_factory=dict)
    parents: NameList = Field(default_factory=list)

    @field_validator("metadata", mode="before")
    @classmethod
    def _few_keys(cls, v: Any) -> Any:
        return _metadata_before(v)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(v)

    @field_validator("parents", mode="before")
    @classmethod
    def _few_parents(cls, v: Any) -> Any:
        return _bounded_list(v, limits.MAX_PARENTS, "parents")

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("path contains a NUL byte")
        if not v.startswith("/"):
            raise ValueError("path must be absolute")
        limits.no_control(v)
        total = limits.utf8_bytes(v)
        if total > limits.MAX_PATH_BYTES:
            raise ValueError(f"path is {total} bytes long, at most {limits.MAX_PATH_BYTES} allowed")
        return v


class MetadataSet(Message):
    """Command to ingest (external): set and / or remove metadata of one file or one dataset
    after ingest. ``set`` keys and values are bounded like ``file.ready``'s metadata; ``unset``
    names keys to remove (removing a key the target lacks is no error). A key may not be both set
    and unset, and at least one of the two is given."""

    ROUTING_KEY: ClassVar[str] = "metadata.set"

    file: LogicalName | None = None
    dataset: DatasetName | None = None
    set: Metadata = Field(default_factory=dict)
    unset: list[MetaKey] = Field(default_factory=list)

    @field_validator("set", mode="before")
    @classmethod
    def _few_keys(cls, v: Any) -> Any:
        return _metadata_before(v)

    @field_validator("set")
    @classmethod
    def _bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_metadata(v)

    @field_validator("unset", mode="before")
    @classmethod
    def _few_unset(cls, v: Any) -> Any:
        return _bounded_list(v, limits.MAX_META_KEYS, "unset")

    @model_validator(mode="after")
    def _one_target_some_change(self) -> Self:
        if (self.file is None) == (self.dataset is None):
            raise ValueError("give either file or dataset (one target), not both")
        if not self.set and not self.unset:
            raise ValueError("nothing to change: give set and / or unset")
        both = sorted(k for k in self.unset if k in self.set)
        if both:
            raise ValueError(f"keys both set and unset: {', '.join(both)}")
        return self


class MetadataChanged(Message):
    """Event: the metadata of one file or one dataset changed after ingest (``metadata.set`` or
    ``spool meta set|unset``), stated through the outbox in the change's transaction; its id is
    derived from the change's request id. ``keys``: the keys set or removed. The replicator places
    a file again by the rules when its metadata changed (a rule's metadata filters may select it
    now)."""

    ROUTING_KEY: ClassVar[str] = "metadata.changed"

    file: LogicalName | None = None
    dataset: DatasetName  # the file's dataset, or the dataset changed
    keys: list[MetaKey]
    request_id: Identifier

    @field_validator("keys", mode="before")
    @classmethod
    def _few_keys(cls, v: Any) -> Any:
        return _bounded_list(v, 2 * limits.MAX_META_KEYS, "keys")


class FileIngested(Message):
    """Event: a file is registered with a verified replica on its first disk endpoint."""

    ROUTING_KEY: ClassVar[str] = "file.ingested"

    name: LogicalName
    dataset: DatasetName
    size: Bytes
    adler32: Adler32
    storage: EndpointName
    pfn: str = Field(min_length=1, max_length=limits.MAX_PATH_BYTES)
    # None when ingest did not read the bytes itself (a remote first endpoint).
    sha256: Sha256 | None = None


class FilesCommand(Message):
    """A command about one file (``name``) or many (``names``, the bulk form).

    The bulk form is sent where many copies are wanted at once (an ingest batch, a rule applied to
    existing files, parked copies re-sent): one message carries up to a few hundred files, which
    divides the per-message cost of the bus. A file of a bulk command that cannot be served at once
    continues as a single-file command of its own (its retries, dead letter and reason are then its
    own). ``names`` holds at most ``limits.MAX_NAMES`` entries and ``limits.MAX_NAMES_BYTES`` in all.
    """

    name: LogicalName | None = None
    names: BoundedNames = Field(default_factory=list)
    # Bulk form: the correlation id of each of ``names`` (same order), so each file's events keep
    # the id its ``file.ready`` had although one message carries files of many events. Empty: the
    # message's own correlation id applies to every file.
    correlation_ids: list[Annotated[str, Field(max_length=limits.MAX_ID)] | None] = Field(
        default_factory=list
    )
    destination: EndpointName
    rule_id: Identifier | None = None
    priority: Priority = 3

    @field_validator("correlation_ids", mode="before")
    @classmethod
    def _few_correlation_ids(cls, v: Any) -> Any:
        return _bounded_list(v, limits.MAX_NAMES, "correlation_ids")

    @model_validator(mode="after")
    def _one_form(self) -> Self:
        if (self.name is None) == (not self.names):
            raise ValueError("give either name or names (a non-empty list), not both")
        if self.correlation_ids and len(self.correlation_ids) != len(self.names):
            raise ValueError("correlation_ids must have one entry per name of names")
        return self

    def correlation_of(self, index: int, default: str | None) -> str | None:
        """The correlation id of ``names[index]`` (``default``: the message's)."""
        if self.correlation_ids and self.correlation_ids[index] is not None:
            return self.correlation_ids[index]
        return default

    @property
    def files(self) -> list[str]:
        return [self.name] if self.name is not None else list(self.names)


class ReplicaRequest(FilesCommand):
    """Command to the replicator: make a copy of ``name`` (or of each of ``names``) on
    ``destination`` (a disk endpoint)."""

    ROUTING_KEY: ClassVar[str] = "replica.request"


class CreatedCopy(BaseModel):
    """One verified copy announced by ``replica.created``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: LogicalName
    pfn: str = Field(min_length=1, max_length=limits.MAX_PATH_BYTES)
    size: Bytes
    adler32: Adler32
    # The file's correlation id (its ``file.ready``'s) when it differs from the event's own: the
    # copies of a bulk request come from many events.
    correlation_id: Annotated[str, Field(max_length=limits.MAX_ID)] | None = None


class ReplicaCreated(Message):
    """Event: verified copies on ``storage``, durable and recorded ``available``.

    One event per ``replica.request``: a bulk request's copies are announced together, so
    ``copies`` lists one entry per file (one entry for a single-file request). One message per
    few hundred copies, not one per copy, is what lets the bus keep up with small files: each
    event is confirmed by the monitor's quorum queue. A redelivered request announces its copies
    again; a consumer keys on (name, storage), not on the event id.
    """

    ROUTING_KEY: ClassVar[str] = "replica.created"

    storage: EndpointName
    copies: list[CreatedCopy] = Field(min_length=1, max_length=limits.MAX_NAMES)

    @field_validator("copies", mode="before")
    @classmethod
    def _few_copies(cls, v: Any) -> Any:
        return _bounded_list(v, limits.MAX_NAMES, "copies")

    @property
    def size(self) -> int:
        """Bytes of every copy announced."""
        return sum(c.size for c in self.copies)


class TapeArchive(FilesCommand):
    """Command to the tape daemon: write ``name`` (or each of ``names``) to tape endpoint
    ``destination``."""

    ROUTING_KEY: ClassVar[str] = "tape.archive"


class FileArchived(Message):
    ROUTING_KEY: ClassVar[str] = "file.archived"

    name: LogicalName
    storage: EndpointName
    cartridge: EndpointName
    fseq: Count


class RecallRequest(Message):
    """Command to recall: bring ``names`` (or a ``dataset``) back to a disk endpoint.

    ``names`` holds at most ``limits.MAX_NAMES`` entries and ``limits.MAX_NAMES_BYTES`` in all: a
    bigger request is one dead letter (``invalid_message``), before anything reaches the catalogue.
    """

    ROUTING_KEY: ClassVar[str] = "recall.request"

    names: BoundedNames = Field(default_factory=list)
    dataset: DatasetName | None = None
    destination: EndpointName | None = None
    priority: Priority = 3


class FileRecalled(Message):
    ROUTING_KEY: ClassVar[str] = "file.recalled"

    name: LogicalName
    storage: EndpointName
    request_id: Identifier


class RecallCompleted(Message):
    """Event (and reply on ``reply_to``): a recall request is settled.

    ``reason`` / ``error`` are set when the request itself was refused after it reached the recall
    daemon (``id_conflict``: its id was already used by a request with other content); ``failed``
    then lists the names it asked for.
    """

    ROUTING_KEY: ClassVar[str] = "recall.completed"

    request_id: Identifier
    files: Count
    failed: NameList = Field(default_factory=list)
    reason: ReasonCode | None = None
    error: FreeText | None = None

    @field_validator("failed", mode="before")
    @classmethod
    def _few_failed(cls, v: Any) -> Any:
        # Spool writes this list (a dataset recall may fail more files than any request names):
        # the first ``MAX_FAILED_NAMES`` are listed, ``spool recall status`` has them all.
        return v[: limits.MAX_FAILED_NAMES] if isinstance(v, list) else v


class DatasetClose(Message):
    """Command to ingest, from outside too: no more files will be announced into ``dataset``.

    Closing a dataset already closed (or complete, archived, deleted) is a success that changes
    nothing; an unknown dataset is a dead letter (``unknown_dataset``)."""

    ROUTING_KEY: ClassVar[str] = "dataset.close"

    dataset: DatasetName


class DatasetCompleted(Message):
    """Event: a closed dataset has every copy its rules want on disk (what a pipeline waits for).
    Sent once per dataset, through the outbox; its id is derived from the dataset's name."""

    ROUTING_KEY: ClassVar[str] = "dataset.completed"

    dataset: DatasetName
    files: Count
    bytes: Count  # a dataset's total may pass one file's bound
    closed: Timestamp
    completed: Timestamp


class DatasetArchived(Message):
    """Event: a complete dataset has every copy its rules want on tape as well (sent once; a
    dataset whose rules want no tape copy is never archived: it stays complete)."""

    ROUTING_KEY: ClassVar[str] = "dataset.archived"

    dataset: DatasetName
    files: Count
    bytes: Count
    archived: Timestamp


class DatasetDeleted(Message):
    """Event: a dataset being deleted (``spool dataset delete``) has no copy left anywhere (tape
    copies marked deleted, disk copies removed); its rows stay as tombstones. Sent once."""

    ROUTING_KEY: ClassVar[str] = "dataset.deleted"

    dataset: DatasetName
    files: Count
    deleted: Timestamp


class FileFailed(Message):
    """Event: handling a message about a file ended in a dead letter (or a failed state)."""

    ROUTING_KEY: ClassVar[str] = "file.failed"

    daemon: ReasonCode
    reason: ReasonCode
    error: FreeText
    attempts: Count
    name: FreeText | None = None
    path: FreeText | None = None
    dataset: FreeText | None = None
    message_id: FreeText | None = None
    # The storage endpoint the failed work was for (a copy's destination), so the monitor groups
    # failures per endpoint: one full disk must not look like a cause spread over every file.
    endpoint: EndpointName | None = None


class EndpointPaused(Message):
    """Event: the replicator's circuit breaker paused an endpoint after consecutive failures."""

    ROUTING_KEY: ClassVar[str] = "endpoint.paused"

    storage: EndpointName
    reason: ReasonCode
    error: FreeText
    failures: Count
    cooldown: Seconds  # seconds until one probe copy is let through


class EndpointResumed(Message):
    """Event: a paused endpoint took a probe copy (or an operator set it online); work resumes."""

    ROUTING_KEY: ClassVar[str] = "endpoint.resumed"

    storage: EndpointName
    paused_seconds: Seconds
    waiting: Count  # parked copies being re-sent


class TapeMounted(Message):
    """Event: a cartridge was loaded into a drive (mounts are what tape scheduling economises)."""

    ROUTING_KEY: ClassVar[str] = "tape.mounted"

    library: EndpointName
    drive: EndpointName
    cartridge: EndpointName
    purpose: ReasonCode  # archive | recall
    request: Identifier | None = None


class DaemonHeartbeat(Message):
    """Event: who is alive and what it holds right now. ``details`` is at most
    ``limits.MAX_DETAILS_BYTES`` as JSON."""

    ROUTING_KEY: ClassVar[str] = "daemon.heartbeat"

    daemon: ReasonCode
    instance: Identifier
    host: Identifier
    pid: Count
    version: Identifier
    started: Timestamp
    in_flight: Count = 0
    processed: Count = 0
    failed: Count = 0
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def _small_details(cls, v: dict[str, Any]) -> dict[str, Any]:
        size = limits.json_size(v)
        if size > limits.MAX_DETAILS_BYTES:
            raise ValueError(f"is {size} bytes as JSON, at most {limits.MAX_DETAILS_BYTES} allowed")
        return v


class AlertRaised(Message):
    """Event: the monitor saw something an operator should hear about once, e.g. a failure reason
    it had not seen before. One alert per new cause, never one per file."""

    ROUTING_KEY: ClassVar[str] = "alert.raised"

    kind: ReasonCode  # "new_failure_reason"
    severity: ReasonCode = "warning"
    summary: FreeText
    daemon: ReasonCode | None = None  # the daemon the alert is about
    reason: ReasonCode | None = None
    endpoint: EndpointName | None = None
    example: FreeText | None = None  # one file (or message id) that failed this way
    error: FreeText | None = None


MODELS: dict[str, type[Message]] = {
    m.ROUTING_KEY: m
    for m in (
        FileReady,
        MetadataSet,
        MetadataChanged,
        FileIngested,
        ReplicaRequest,
        ReplicaCreated,
        TapeArchive,
        FileArchived,
        RecallRequest,
        FileRecalled,
        RecallCompleted,
        DatasetClose,
        DatasetCompleted,
        DatasetArchived,
        DatasetDeleted,
        FileFailed,
        EndpointPaused,
        EndpointResumed,
        TapeMounted,
        DaemonHeartbeat,
        AlertRaised,
    )
}
