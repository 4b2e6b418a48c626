"""Values going into and coming out of the catalogue.

Results are frozen dataclasses (cheap: ingest builds thousands per second). ``IngestRecord`` is a
pydantic model because it is the one input that crosses a trust boundary: its metadata came from an
external event, and anything the catalogue could not store or index faithfully is rejected when the
record is built (with the key named), never truncated or dropped later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.catalogue.schema import MAX_META_KEY, MAX_META_STR, MAX_NAME
from common.messages import SHA256_PATTERN, MetaValue, normalise_adler32

Outcome = Literal["registered", "duplicate", "duplicate_event", "conflict", "dataset_closed"]
RequestState = Literal["done", "retrying", "failed"]

_INT64 = 2**63


def check_metadata(metadata: dict[str, MetaValue]) -> None:
    """Raise ``ValueError`` naming the first key the catalogue cannot store and index as given.

    Exposed so that ingest can reject a ``file.ready`` as ``invalid_message`` before copying.
    """
    for key, value in metadata.items():
        if not key or len(key) > MAX_META_KEY:
            raise ValueError(f"metadata key {key[:40]!r} must be 1-{MAX_META_KEY} characters")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if not -_INT64 <= value < _INT64:
                raise ValueError(f"metadata {key!r}: integer does not fit in 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"metadata {key!r}: number must be finite")
        elif isinstance(value, str):
            if len(value) > MAX_META_STR:
                raise ValueError(f"metadata {key!r}: string longer than {MAX_META_STR} characters")
        else:
            raise ValueError(f"metadata {key!r}: value must be a string, number, boolean or null")


class IngestRecord(BaseModel):
    """One file ingest has copied and verified, ready to be registered."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=MAX_NAME)
    dataset: str = Field(min_length=1, max_length=255)
    size: int = Field(ge=0, lt=_INT64)
    adler32: str
    # 64 lower-case hex digits, computed in the same read pass as adler32; None where the bytes
    # were not read here (a remote first endpoint).
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    # The dataset's metadata (the fields of its name by the nomenclature), stored when this
    # record creates the dataset; an existing dataset keeps its own.
    dataset_metadata: dict[str, MetaValue] = Field(default_factory=dict)
    parents: list[str] = Field(default_factory=list)
    storage: str = Field(min_length=1)
    pfn: str = Field(min_length=1)
    path: str | None = None
    source: str | None = None
    attempt: int = Field(default=1, ge=1)

    @field_validator("adler32", mode="before")
    @classmethod
    def _adler(cls, v: Any) -> str:
        out = normalise_adler32(v)
        if out is None:
            raise ValueError("adler32 is required")
        return out

    @field_validator("metadata", "dataset_metadata", mode="before")
    @classmethod
    def _storable(cls, v: Any) -> Any:
        # Before the type's own (lax) validation, which would take an integer beyond 64 bits as
        # a float and lose its digits.
        if isinstance(v, dict):
            check_metadata(v)
        return v

    @field_validator("metadata", "dataset_metadata")
    @classmethod
    def _meta(cls, v: dict[str, MetaValue]) -> dict[str, MetaValue]:
        check_metadata(v)
        return v

    @field_validator("parents")
    @classmethod
    def _parents(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or len(p) > MAX_NAME:
                raise ValueError(f"parent names must be 1-{MAX_NAME} characters")
        return list(dict.fromkeys(v))  # order kept, repeats dropped


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    dataset: str
    size: int
    adler32: str
    created: datetime
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    """What happened to one ``IngestRecord``.

    ``file`` is the file the catalogue holds under that name: the new one, the one duplicated, or
    for a conflict the one it clashes with (None only for a duplicate event whose file is gone).
    ``pfn`` is that file's available replica on the record's storage, if any, so a redelivered
    event can re-announce ``file.ingested`` without another query.
    """

    event_id: str
    name: str
    outcome: Outcome
    file: FileInfo | None
    pfn: str | None = None


@dataclass(frozen=True, slots=True)
class RequestInfo:
    id: str
    kind: str
    state: str
    name: str | None
    path: str | None
    dataset: str | None
    attempts: int
    reason: str | None
    error: str | None
    created: datetime
    updated: datetime


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    storage: str
    kind: str
    state: str
    pfn: str
    cartridge: str | None
    fseq: int | None
    created: datetime
    updated: datetime
    member_offset: int | None = None  # a tape copy inside an aggregate: where its bytes start


@dataclass(frozen=True, slots=True)
class FileView:
    """Everything ``spool show`` prints about one file."""

    name: str
    dataset: str
    size: int
    adler32: str
    created: datetime
    metadata: dict[str, Any]
    parents: list[str]
    children: list[str]
    replicas: list[ReplicaInfo]
    last_error: RequestInfo | None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    name: str
    state: str
    created: datetime
    files: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Relative:
    """An ancestor or descendant; ``registered`` is False for a parent named but not catalogued."""

    name: str
    depth: int
    registered: bool


@dataclass(frozen=True, slots=True)
class EventInfo:
    id: int
    name: str
    time: datetime
    daemon: str
    type: str
    outcome: str
    attempt: int
    storage: str | None
    detail: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    name: str
    kind: str
    backend: str
    root: str
    attributes: dict[str, Any]
    state: str  # set by the operator: online | readonly | down
    updated: datetime
    health: str = "ok"  # set by the replicator's circuit breaker: ok | paused
    health_reason: str | None = None
    health_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    files: int
    bytes: int
    datasets: int
    replicas: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
