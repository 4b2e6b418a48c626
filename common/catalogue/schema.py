"""Tables of the catalogue, declared once for the ORM, Core statements and Alembic.

Shape decisions (the *why*):

- Files are keyed by an integer id but addressed by their unique logical ``name``; every daemon and
  every message speaks names, the id only keeps foreign keys small.
- ``file_metadata`` stores each metadata value in typed columns (``value_num`` for every number,
  ``value_int`` for exact integers, ``value_str`` for strings) so that ``=``, ranges and ``in``
  compare like with like and use an index on ``(key, value_*)``. ``files.meta`` keeps the
  original JSON for display.
- ``provenance`` stores the parent by *name*: a parent may be registered after its child (or never
  here at all); ancestors / descendants are resolved by joining names.
- ``requests`` is keyed by the message / event id: it is at once the registry of processed events
  (duplicate detection) and the "last error per file".
- ``events.name`` and ``events.storage`` are plain strings, not foreign keys, so the history of a
  file survives the removal of the file or of an endpoint.
- Timestamps are always timezone-aware UTC in Python (``UTCDateTime``), whatever the backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Explicit constraint names so that migrations can name what they alter, on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Limits that keep every indexed value inside PostgreSQL's b-tree row limit (2704 bytes, UTF-8).
MAX_NAME = 1024
MAX_META_KEY = 128
MAX_META_STR = 512
MAX_HOLDER = 200  # an instance id: daemon@node:pid:random (node <= 128)
MAX_WHO = 255  # who closed / deleted a dataset

# BIGSERIAL on PostgreSQL, the rowid alias ("INTEGER PRIMARY KEY") on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
# Logical names sort and match byte-wise on PostgreSQL too (as on SQLite), whatever the database
# locale: listings look like ``ls`` and ``name LIKE 'prefix%'`` can use the unique index.
Name = String(MAX_NAME).with_variant(String(MAX_NAME, collation="C"), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite stores naive text, PostgreSQL ``timestamptz``."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    # SQLite fast path. A batch binds the same timestamp to thousands of rows; the generic path
    # converts each one twice (this decorator, then SQLite's DATETIME), which was ~10% of ingest
    # time. Same text format as SQLAlchemy's SQLite DATETIME, so either path reads the other's rows.
    def bind_processor(self, dialect: Dialect) -> Any:
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        last: list[Any] = [None, None]

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value is last[0]:
                return last[1]  # type: ignore[no-any-return]
            utc = value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
            text = utc.isoformat(" ", "microseconds")
            last[0], last[1] = value, text
            return text

        return process

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)

        def process(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)

        return process


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    # open | closed | complete | archived | deleting | deleted (``common.catalogue.datasets``)
    state: Mapped[str] = mapped_column(String(16), default="open", index=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    # When its last file was registered (ingest's auto-close measures the idle time from it).
    last_file: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_by: Mapped[str | None] = mapped_column(String(MAX_WHO))  # cli:<user> | event:<source> | auto-close
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set as it completes: its rules want tape copies (the replicator watches it until archived).
    tape_wanted: Mapped[bool | None] = mapped_column(Boolean)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deleted_by: Mapped[str | None] = mapped_column(String(MAX_WHO))


class File(Base):
    __tablename__ = "files"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Name, unique=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    adler32: Mapped[str] = mapped_column(String(8))  # 8 lower-case hex digits
    # 64 lower-case hex digits; None for files registered before migration 0016.
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column(Json)
    created: Mapped[datetime] = mapped_column(UTCDateTime)


class FileMetadata(Base):
    __tablename__ = "file_metadata"
    __table_args__ = (
        Index(None, "key", "value_num"),
        Index(None, "key", "value_int"),
        Index(None, "key", "value_str"),
    )

    file_id: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_META_KEY), primary_key=True)
    value_num: Mapped[float | None] = mapped_column(Double)
    value_int: Mapped[int | None] = mapped_column(BigInteger)
    value_str: Mapped[str | None] = mapped_column(String(MAX_META_STR))


class DatasetMetadata(Base):
    """A dataset's metadata (the fields of its name by the nomenclature, and what operators set
    later), typed like ``file_metadata`` so one filter compares both alike."""

    __tablename__ = "dataset_metadata"
    __table_args__ = (
        Index(None, "key", "value_num"),
        Index(None, "key", "value_int"),
        Index(None, "key", "value_str"),
    )

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(MAX_META_KEY), primary_key=True)
    value_num: Mapped[float | None] = mapped_column(Double)
    value_int: Mapped[int | None] = mapped_column(BigInteger)
    value_str: Mapped[str | None] = mapped_column(String(MAX_META_STR))


class DatasetEvent(Base):
    """The history of a dataset (``spool trace --dataset``), as ``events`` is a file's: by name,
    not a foreign key, so it outlives the dataset. A table of its own: a dataset and a file may
    share a name."""

    __tablename__ = "dataset_events"
    __table_args__ = (Index(None, "dataset", "time"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dataset: Mapped[str] = mapped_column(String(255))
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    daemon: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any] | None] = mapped_column(Json)


class Provenance(Base):
    __tablename__ = "provenance"

    child_id: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    parent_name: Mapped[str] = mapped_column(Name, primary_key=True, index=True)


class StorageEndpointRow(Base):
    __tablename__ = "storage_endpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # disk | tape
    backend: Mapped[str] = mapped_column(String(32))
    root: Mapped[str] = mapped_column(Text)
    attributes: Mapped[dict[str, Any]] = mapped_column(Json)
    state: Mapped[str] = mapped_column(String(16), default="online")  # online | readonly | down
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set by the replicator's circuit breaker (the operator owns ``state``): ok | paused | probing.
    health: Mapped[str] = mapped_column(String(16), default="ok", server_default="ok")
    health_reason: Mapped[str | None] = mapped_column(Text)
    health_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The breaker shared by the replicator's instances (``common.catalogue.transfers``): while
    # ``paused``, when the cool-down ends (a probe copy may go) and the cool-down it waits out
    # (doubled by each failed probe); while ``probing``, the instance making the probe copy.
    health_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    health_cooldown: Mapped[float | None] = mapped_column(Double)
    prober: Mapped[str | None] = mapped_column(String(MAX_HOLDER))


class Replica(Base):
    __tablename__ = "replicas"
    __table_args__ = (
        UniqueConstraint("file_id", "storage_id"),
        Index(None, "tombstone"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"))
    storage_id: Mapped[int] = mapped_column(ForeignKey("storage_endpoints.id"))
    pfn: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))  # available | copying | bad | deleted ...
    cartridge: Mapped[str | None] = mapped_column(String(64))
    fseq: Mapped[int | None] = mapped_column(BigInteger)
    # A tape copy inside an aggregate (``common.tape.aggregate``): where its bytes start within
    # the tape file ``cartridge``/``fseq``; NULL: the copy is a tape file of its own.
    member_offset: Mapped[int | None] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    # From this time the copy may be deleted once no rule lock holds it (and it is not the last
    # one). NULL: never reaped automatically (the copy ingest made).
    tombstone: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Priority of the copy request, kept so parked ("waiting") copies are re-sent in order.
    priority: Mapped[int] = mapped_column(Integer, default=3, server_default="3")
    # The instance (``instances.id``) writing a tape copy ``archiving``; NULL otherwise.
    holder: Mapped[str | None] = mapped_column(String(MAX_HOLDER))


# A tape pool's queue in write order (``catalogue.tape.queue_head``: state, then priority, age):
# read from the index in order, a writer's window stops after its ``LIMIT`` rows. With only
# (storage_id, state), every queued copy was read and sorted in a temporary b-tree at each window
# (a night's backlog: 300,000 rows). Its prefix serves every (storage_id, state) look-up as before.
Index(
    "ix_replicas_queue_order",
    Replica.storage_id, Replica.state, Replica.priority.desc(), Replica.created, Replica.id,
)  # fmt: skip


class Rule(Base):
    """A replication rule: which files (dataset pattern, metadata filters), where, how many."""

    __tablename__ = "rules"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    origin: Mapped[str] = mapped_column(String(16))  # config | cli
    datasets: Mapped[str | None] = mapped_column(Text)  # regular expression, full match
    meta_filters: Mapped[list[str]] = mapped_column(Json)
    endpoints: Mapped[str] = mapped_column(String(255))  # a name or an attribute expression
    copies: Mapped[int] = mapped_column(Integer)
    lifetime: Mapped[float | None] = mapped_column(Double)  # seconds
    priority: Mapped[int] = mapped_column(Integer)
    # new: files that existed before the rule still have to be evaluated (by the replicator).
    state: Mapped[str] = mapped_column(String(16))  # new | active
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)


class RuleDeclaration(Base):
    """A node's configuration file declares a config rule: the rule stays while one does."""

    __tablename__ = "rule_declarations"

    rule_id: Mapped[str] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True)
    node: Mapped[str] = mapped_column(String(128), primary_key=True)  # ``Settings.node``
    declared: Mapped[datetime] = mapped_column(UTCDateTime)


class Instance(Base):
    """A running daemon process holding a lease (``common.catalogue.instances``): work it holds
    (a tape copy ``archiving``, a recall file ``staging``, an ingest name claim) is its own while
    ``expires`` is in the future; after that, another instance of the daemon settles it."""

    __tablename__ = "instances"
    __table_args__ = (Index(None, "daemon", "expires"),)

    id: Mapped[str] = mapped_column(String(MAX_HOLDER), primary_key=True)  # daemon@node:pid:random
    daemon: Mapped[str] = mapped_column(String(32))
    node: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    started: Mapped[datetime] = mapped_column(UTCDateTime)
    renewed: Mapped[datetime] = mapped_column(UTCDateTime)
    expires: Mapped[datetime] = mapped_column(UTCDateTime)


class IngestClaim(Base):
    """An ingest instance copying a new name: the others leave that name alone while it lives."""

    __tablename__ = "ingest_claims"

    name: Mapped[str] = mapped_column(Name, primary_key=True)
    holder: Mapped[str] = mapped_column(String(MAX_HOLDER))
    claimed: Mapped[datetime] = mapped_column(UTCDateTime)


class RoleLease(Base):
    """One holder of a role at a time (the monitor's active instance), until ``expires``."""

    __tablename__ = "role_leases"

    role: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(MAX_HOLDER))
    expires: Mapped[datetime] = mapped_column(UTCDateTime)


class TransferSlot(Base):
    """One of an endpoint's ``max_transfers`` slots: a copy into the endpoint runs while its
    replicator instance holds one (``common.catalogue.transfers``). Free: no live holder."""

    __tablename__ = "transfer_slots"

    storage: Mapped[str] = mapped_column(String(64), primary_key=True)  # the endpoint's name
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 .. max_transfers - 1
    holder: Mapped[str | None] = mapped_column(String(MAX_HOLDER))
    taken: Mapped[datetime | None] = mapped_column(UTCDateTime)


class TransferWaiter(Base):
    """A replicator instance waiting for a slot of an endpoint: the others then keep to their
    share of its slots (``common.catalogue.transfers.claim_slots``)."""

    __tablename__ = "transfer_waiters"

    storage: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(MAX_HOLDER), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime)


class SavedMonitorState(Base):
    """The active monitor's counts, failure groups and alerts, saved every few seconds for the
    instance that takes over (``common.catalogue.monitor_state``). One row per name."""

    __tablename__ = "monitor_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    doc: Mapped[dict[str, Any]] = mapped_column(Json)
    saved_by: Mapped[str] = mapped_column(String(MAX_HOLDER))
    saved_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RecallCartridge(Base):
    """A recall instance reading a cartridge (``recall.claim_cartridge``): the other instances
    leave it alone while the holder's lease stands (``instances``); after that, anyone takes it.
    The row outlives a mount only when its release failed: a live holder takes it again."""

    __tablename__ = "recall_cartridges"

    library: Mapped[str] = mapped_column(String(64), primary_key=True)
    vid: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(MAX_HOLDER))
    claimed: Mapped[datetime] = mapped_column(UTCDateTime)


class Lock(Base):
    """A rule's claim on one file's copy at one endpoint: while a live lock exists, the copy stays."""

    __tablename__ = "locks"
    __table_args__ = (Index(None, "file_id", "storage_id"), Index(None, "expires"))

    rule_id: Mapped[str] = mapped_column(ForeignKey("rules.id", ondelete="CASCADE"), primary_key=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    storage_id: Mapped[int] = mapped_column(ForeignKey("storage_endpoints.id"), primary_key=True)
    expires: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: for the rule's life
    created: Mapped[datetime] = mapped_column(UTCDateTime)


class Recall(Base):
    """A ``recall.request``: bring files back from tape to a disk endpoint (id = the message id)."""

    __tablename__ = "recalls"
    __table_args__ = (Index(None, "state", "priority"),)

    id: Mapped[str] = mapped_column(String(256), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # active | done | failed (done, some files failed)
    destination: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str | None] = mapped_column(String(255))  # when the request named a dataset
    priority: Mapped[int] = mapped_column(Integer)
    reply_to: Mapped[str | None] = mapped_column(String(255))
    correlation_id: Mapped[str | None] = mapped_column(String(256))
    files: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    completed: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # recall.completed was published (an outbox flag: set after the publish, so a kill in between
    # re-publishes it at restart, under the same message id, rather than losing it).
    announced: Mapped[bool] = mapped_column(Boolean, default=False)


class RecallFile(Base):
    """One file of a recall; names are kept even when unknown (the file fails, the rest goes on)."""

    __tablename__ = "recall_files"
    # file_id: a delivery settles the files waiting for its copy (``recall.deliver_many``).
    __table_args__ = (Index(None, "state", "cartridge", "fseq"), Index(None, "file_id"))

    recall_id: Mapped[str] = mapped_column(ForeignKey("recalls.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Name, primary_key=True)
    file_id: Mapped[int | None] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))  # queued | staging | done | failed
    storage: Mapped[str | None] = mapped_column(String(64))  # tape endpoint of the copy chosen
    cartridge: Mapped[str | None] = mapped_column(String(64))  # the tape copy chosen to read
    fseq: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    # file.recalled was published (outbox flag, as ``Recall.announced``).
    announced: Mapped[bool] = mapped_column(Boolean, default=False)
    # The instance (``instances.id``) reading a file ``staging``; NULL otherwise.
    holder: Mapped[str | None] = mapped_column(String(MAX_HOLDER))


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (Index(None, "name", "updated"), Index(None, "state", "updated"))

    id: Mapped[str] = mapped_column(String(256), primary_key=True)  # message / event id
    kind: Mapped[str] = mapped_column(String(32))  # ingest | replica | archive | recall ...
    name: Mapped[str | None] = mapped_column(String(MAX_NAME))
    path: Mapped[str | None] = mapped_column(Text)
    dataset: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))  # done | retrying | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index(None, "name", "time"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text)  # logical name, or the source path before one exists
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    daemon: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    storage: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(Json)


class OutboxRow(Base):
    """An event stating a fact, written in the transaction that records the fact and published
    after the commit (``common.catalogue.outbox``); ``sent`` is set once the broker confirmed it."""

    __tablename__ = "outbox"
    __table_args__ = (Index(None, "sent", "seq"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)  # publish order
    id: Mapped[str] = mapped_column(String(256), unique=True)  # the message id (derived from the fact)
    routing_key: Mapped[str] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)  # msgpack, as published (``common.codec``)
    correlation_id: Mapped[str | None] = mapped_column(String(256))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    sent: Mapped[datetime | None] = mapped_column(UTCDateTime)  # NULL: not confirmed yet
    # The relay publishing it now, and until when (``outbox.claim_unsent``): other relays leave it.
    claimed_by: Mapped[str | None] = mapped_column(String(MAX_HOLDER))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Core handles on the tables: the hot paths use Core statements (bulk, no unit of work).
metadata = Base.metadata
datasets = cast(Table, Dataset.__table__)
files = cast(Table, File.__table__)
file_metadata = cast(Table, FileMetadata.__table__)
dataset_metadata = cast(Table, DatasetMetadata.__table__)
dataset_events = cast(Table, DatasetEvent.__table__)
provenance = cast(Table, Provenance.__table__)
storage_endpoints = cast(Table, StorageEndpointRow.__table__)
replicas = cast(Table, Replica.__table__)
requests = cast(Table, Request.__table__)
events = cast(Table, Event.__table__)
rules = cast(Table, Rule.__table__)
rule_declarations = cast(Table, RuleDeclaration.__table__)
recalls = cast(Table, Recall.__table__)
recall_files = cast(Table, RecallFile.__table__)
locks = cast(Table, Lock.__table__)
instances = cast(Table, Instance.__table__)
ingest_claims = cast(Table, IngestClaim.__table__)
role_leases = cast(Table, RoleLease.__table__)
transfer_slots = cast(Table, TransferSlot.__table__)
transfer_waiters = cast(Table, TransferWaiter.__table__)

monitor_state = cast(Table, SavedMonitorState.__table__)
recall_cartridges = cast(Table, RecallCartridge.__table__)
outbox = cast(Table, OutboxRow.__table__)
