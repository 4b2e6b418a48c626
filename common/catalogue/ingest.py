"""Registering a batch of ingested files in one transaction.

Why a batch: on SQLite every commit is an fsync-bound write of the WAL, so committing once per
file caps ingest at a few hundred files per second; one transaction for ~256 files, with each
table written by a single multi-row statement, lifts it into the thousands.

Decisions are taken in Python against a snapshot read at the start of the (write-locked on SQLite)
transaction, and the snapshot is updated as records are decided, so two records of the same batch
with the same name or event id behave exactly as if they had come one after the other.
On PostgreSQL a concurrent registration of the same name surfaces as an ``IntegrityError`` (see
``is_transient_conflict``); the caller retries the whole batch, which then sees the other
transaction's rows and reports a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Column, Connection, select, text, update
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from common.catalogue import ingest_claims
from common.catalogue import schema as s
from common.catalogue.filters import typed_value
from common.catalogue.metadata import add_dataset_metadata
from common.catalogue.models import FileInfo, IngestRecord, Outcome, RegisterOutcome
from common.catalogue.sql import (
    bind_processor,
    chunks,
    insert_ignore_sync,
    insert_rows,
    json_processor,
    result_processor,
    returning_tail,
    select_in,
    storage_ids_sync,
    upsert_tail,
    utcnow,
)

DAEMON = "ingest"

# Every statement of a batch goes to the driver as SQL text (see ``sql.insert_rows``): for 256
# files SQLAlchemy Core's compilation and per-row bind processing cost more CPU than SQLite's own
# work. Values are converted by the columns' own bind processors where they have one (datetimes;
# JSON through ``json_processor``, the same text sooner; ``value_num``'s float() gets floats from
# ``typed_value`` already), so the rows are the ones the Core statements wrote (a test compares).

# The state is tested in Python, not in SQL: given ``state = 'done' AND id IN (...)`` SQLite
# (no statistics) walks the (state, updated) index, every done request, instead of probing the
# primary key: at 20,000 files a quarter of the CPU ingest spent per file, and growing with the table.
_REQUEST_STATE_SQL = "SELECT id, state FROM requests WHERE id IN ({})"
_PRIOR_SQL = "SELECT id, kind, state, name, path, dataset FROM requests WHERE id IN ({})"
_LOOKUP_SQL = (
    "SELECT files.id, files.name, datasets.name, files.size, files.adler32, files.created"
    " FROM files JOIN datasets ON datasets.id = files.dataset_id WHERE files.name IN ({})"
)
_DATASET_IDS_SQL = "SELECT name, id FROM datasets WHERE name IN ({})"
# How stale a dataset's ``last_file`` may get (see ``_closed_datasets``): auto-close's precision.
LAST_FILE_GRAIN = timedelta(seconds=60)
_REPLICA_PFNS_SQL = (
    "SELECT files.name, storage_endpoints.name, replicas.pfn FROM files"
    " JOIN replicas ON replicas.file_id = files.id"
    " JOIN storage_endpoints ON storage_endpoints.id = replicas.storage_id"
    " WHERE replicas.state = 'available' AND files.id IN ({})"
)


def _scalar_default(column: Column[Any]) -> Any:
    default = column.default
    if not isinstance(default, ScalarElementColumnDefault):
        raise TypeError(f"{column} has no scalar default")
    return default.arg


# Columns bound per row; with the batch's timestamps (bound once) and the code's constants (SQL
# literals) they name every column but the autoincrement id (a test holds them to the schema): SQL
# text gets no Python-side column default, so ``priority`` is spelled out.
FILE_COLUMNS = ("name", "dataset_id", "size", "adler32", "meta")
METADATA_COLUMNS = ("file_id", "key", "value_num", "value_int", "value_str")
REPLICA_COLUMNS = ("file_id", "storage_id", "pfn")
REPLICA_CONSTANTS: Mapping[str, Any] = {
    "state": "available",
    "cartridge": None,
    "fseq": None,
    "member_offset": None,
    "tombstone": None,
    "priority": _scalar_default(s.replicas.c.priority),
    "holder": None,
}
REQUEST_COLUMNS = ("id", "name", "path", "dataset", "attempts")
REQUEST_CONSTANTS: Mapping[str, Any] = {"kind": "ingest", "state": "done", "reason": None, "error": None}
# A request that failed before keeps its last reason / error for the record; only state moves.
REQUEST_UPDATE = ("state", "attempts", "name", "path", "dataset", "updated")
EVENT_COLUMNS = ("name", "outcome", "attempt", "storage", "detail")
EVENT_CONSTANTS: Mapping[str, Any] = {"daemon": DAEMON, "type": "file.ingested"}


@dataclass(slots=True)
class _Decision:
    record: IngestRecord
    outcome: Outcome
    file: FileInfo | None


def lookup(conn: Connection, names: Sequence[str]) -> dict[str, tuple[int, FileInfo]]:
    """Name -> (file id, info) for the names that are registered."""
    created = result_processor(s.files.c.created, conn.dialect)
    out: dict[str, tuple[int, FileInfo]] = {}
    for fid, name, ds, size, adler, ts in select_in(conn, _LOOKUP_SQL, list(dict.fromkeys(names))):
        out[name] = (fid, FileInfo(name, ds, size, adler, created(ts)))
    return out


def _done_events(conn: Connection, ids: Sequence[str]) -> set[str]:
    rows = select_in(conn, _REQUEST_STATE_SQL, list(dict.fromkeys(ids)))
    return {eid for eid, state in rows if state == "done"}


def known(conn: Connection, ids: Sequence[str], names: Sequence[str]) -> tuple[set[str], dict[str, FileInfo]]:
    """What ingest asks before copying: which event ids are done, which names are registered."""
    return _done_events(conn, ids), {n: info for n, (_, info) in lookup(conn, names).items()}


@dataclass(frozen=True, slots=True)
class PriorRequest:
    """What the catalogue recorded under an event id before: its kind, state and what it was
    about. ``name`` / ``path`` / ``dataset`` may be None (a failure recorded before they were
    known)."""

    kind: str
    state: str
    name: str | None
    path: str | None
    dataset: str | None

    def differs(self, *, name: str | None, paths: Sequence[str], dataset: str) -> str | None:
        """What makes an event with this id another event than the recorded one, or None.

        Same id, same file (name, path, dataset) is a redelivery or a duplicate: idempotent. Any
        difference means the id names two events (``id_conflict``). Paths are compared with every
        spelling the caller knows (as sent and as resolved): the catalogue has recorded both.
        """
        if self.kind != "ingest":
            return f"kind {self.kind}"
        if name is not None and self.name is not None and self.name != name:
            return f"name {self.name!r}"
        if self.path is not None and self.path not in paths:
            return f"path {self.path!r}"
        if self.dataset is not None and self.dataset != dataset:
            return f"dataset {self.dataset!r}"
        return None


def prior_requests(
    conn: Connection, ids: Sequence[str], names: Sequence[str]
) -> tuple[dict[str, PriorRequest], dict[str, FileInfo]]:
    """What ingest asks before copying, in one round trip: what each event id was recorded as
    (any state: a failed event's id is taken too), and which names are registered."""
    rows = select_in(conn, _PRIOR_SQL, list(dict.fromkeys(ids)))
    prior = {rid: PriorRequest(kind, state, name, path, ds) for rid, kind, state, name, path, ds in rows}
    return prior, {n: info for n, (_, info) in lookup(conn, names).items()}


_DATASET_STATES_SQL = "SELECT name, state FROM datasets WHERE name IN ({})"


def before_copy(
    conn: Connection, ids: Sequence[str], names: Sequence[str], datasets: Sequence[str]
) -> tuple[dict[str, PriorRequest], dict[str, FileInfo], dict[str, str]]:
    """``prior_requests``, and the state of each named dataset that exists (a new file is
    refused unless it is open: ``common.catalogue.datasets``), in one read."""
    prior, files = prior_requests(conn, ids, names)
    states: dict[str, str] = (
        dict(select_in(conn, _DATASET_STATES_SQL, sorted(set(datasets)))) if datasets else {}
    )
    return prior, files, states


_REPLICA_AT_SQL = (
    "SELECT 1 FROM replicas JOIN files ON files.id = replicas.file_id"
    " JOIN storage_endpoints ON storage_endpoints.id = replicas.storage_id"
    " WHERE files.name = :name AND storage_endpoints.name = :storage AND replicas.pfn = :name"
)


def replica_recorded(conn: Connection, name: str, storage: str) -> bool:
    """Whether the catalogue records a replica of ``name`` on ``storage`` at pfn ``name`` (in any
    state): a copy there belongs to the catalogue and is not ingest's to remove."""
    return conn.execute(text(_REPLICA_AT_SQL), {"name": name, "storage": storage}).first() is not None


def _decide(
    records: Sequence[IngestRecord],
    done: set[str],
    known: dict[str, FileInfo],
    now: datetime,
    closed: set[str] = frozenset(),  # type: ignore[assignment]
) -> list[_Decision]:
    """Classify each record in order; ``done`` and ``known`` are updated as if each were committed.
    A new name in a dataset of ``closed`` (any state but open) is refused."""
    out: list[_Decision] = []
    for r in records:
        info = known.get(r.name)
        if r.event_id in done:
            out.append(_Decision(r, "duplicate_event", info))
        elif info is None and r.dataset in closed:
            out.append(_Decision(r, "dataset_closed", None))
        elif info is None:
            info = FileInfo(r.name, r.dataset, r.size, r.adler32, now)
            known[r.name] = info
            done.add(r.event_id)
            out.append(_Decision(r, "registered", info))
        elif info.size == r.size and info.adler32 == r.adler32:
            done.add(r.event_id)
            out.append(_Decision(r, "duplicate", info))
        else:
            out.append(_Decision(r, "conflict", info))
    return out


def _dataset_ids(conn: Connection, records: Sequence[IngestRecord], now: datetime) -> dict[str, int]:
    """Dataset name -> id, creating the missing datasets with their metadata (their names' fields)."""
    names = {r.dataset for r in records}
    ids: dict[str, int] = {n: i for n, i in select_in(conn, _DATASET_IDS_SQL, sorted(names))}
    missing = names - ids.keys()
    if missing:
        rows = [{"name": n, "state": "open", "created": now, "last_file": now} for n in sorted(missing)]
        insert_ignore_sync(conn, s.datasets, rows, ["name"])
        ids.update({n: i for n, i in select_in(conn, _DATASET_IDS_SQL, sorted(missing))})
        given = {
            r.dataset: r.dataset_metadata for r in records if r.dataset in missing and r.dataset_metadata
        }
        add_dataset_metadata(conn, {ids[n]: meta for n, meta in given.items()})
    return ids


def _closed_datasets(conn: Connection, records: Sequence[IngestRecord], now: datetime) -> set[str]:
    """The datasets of ``records`` that take no new file (``common.catalogue.datasets``).

    The race with a close: on PostgreSQL the datasets' rows are read ``FOR SHARE``, so a close
    committed meanwhile is waited for and seen here, and a close (or an auto-close: updates)
    arriving after waits for this registration to commit; registrations into one dataset share the
    lock and do not wait for each other. SQLite's write lock serialises all of them. The datasets
    are created first (open) when new, so every row exists to be locked.

    ``last_file`` (auto-close's idle time) is moved only when it is ``LAST_FILE_GRAIN`` old: an
    exclusive row lock once a minute per dataset, not one every batch."""
    names = {r.dataset for r in records}
    if not names:
        return set()
    _dataset_ids(conn, records, now)  # with the metadata the records give new datasets
    ds = s.datasets
    states: dict[str, str] = {}
    for part in chunks(sorted(names)):  # Core statements: once per batch, off the per-file path
        stmt = select(ds.c.name, ds.c.state).where(ds.c.name.in_(part)).order_by(ds.c.name)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update(read=True)
        states.update((name, state) for name, state in conn.execute(stmt))
    still_open = sorted(n for n, st in states.items() if st == "open")
    for part in chunks(still_open):
        stale = ds.c.last_file.is_(None) | (ds.c.last_file < now - LAST_FILE_GRAIN)
        conn.execute(update(ds).where(ds.c.name.in_(part), stale).values(last_file=now))
    return {n for n, st in states.items() if st != "open"}


def register(conn: Connection, records: Sequence[IngestRecord]) -> list[RegisterOutcome]:
    now = utcnow()
    done = _done_events(conn, [r.event_id for r in records])
    existing = lookup(conn, [r.name for r in records])
    closed = _closed_datasets(conn, [r for r in records if r.name not in existing], now)
    decisions = _decide(records, done, {n: info for n, (_, info) in existing.items()}, now, closed)
    file_ids = {n: fid for n, (fid, _) in existing.items()}

    # Rows go in in key order so that concurrent batches lock unique keys in the same order
    # (PostgreSQL would otherwise deadlock two batches holding the same names in reverse order).
    new = sorted((d.record for d in decisions if d.outcome == "registered"), key=lambda r: r.name)
    dups = [d.record for d in decisions if d.outcome == "duplicate"]
    if new:
        file_ids.update(_insert_files(conn, new, now))
        ingest_claims.drop_registered(conn, [r.name for r in new])
    if new or dups:
        _record_requests_and_events(conn, new, dups, now)
    pfns = _replica_pfns(conn, decisions, file_ids)
    return [
        RegisterOutcome(
            d.record.event_id,
            d.record.name,
            d.outcome,
            d.file,
            d.record.pfn if d.outcome == "registered" else pfns.get((d.record.name, d.record.storage)),
        )
        for d in decisions
    ]


def _insert_files(conn: Connection, new: list[IngestRecord], now: datetime) -> dict[str, int]:
    ds_ids = _dataset_ids(conn, new, now)
    endpoint_ids = storage_ids_sync(conn, {r.storage for r in new})
    dialect = conn.dialect
    meta = json_processor(s.files.c.meta, dialect)
    file_rows = [(r.name, ds_ids[r.dataset], r.size, r.adler32, meta(r.metadata)) for r in new]
    created = {"created": bind_processor(s.files.c.created, dialect)(now)}
    returning = returning_tail(dialect, ("name", "id"))
    inserted = insert_rows(conn, s.files, FILE_COLUMNS, file_rows, shared=created, tail=returning)
    ids: dict[str, int] = {name: fid for name, fid in inserted}

    meta_rows: list[tuple[Any, ...]] = []
    prov_rows: list[tuple[int, str]] = []
    for r in new:  # plain loops: two generators per file cost more than the rows they yield
        fid = ids[r.name]
        for key, value in r.metadata.items():
            meta_rows.append((fid, key, *typed_value(value)))
        for parent in r.parents:
            prov_rows.append((fid, parent))
    insert_rows(conn, s.file_metadata, METADATA_COLUMNS, meta_rows)
    insert_rows(conn, s.provenance, ("child_id", "parent_name"), prov_rows)

    stamp = bind_processor(s.replicas.c.created, dialect)(now)
    replica_rows = [(ids[r.name], endpoint_ids[r.storage], r.pfn) for r in new]
    shared = {"created": stamp, "updated": stamp}
    insert_rows(conn, s.replicas, REPLICA_COLUMNS, replica_rows, shared=shared, constants=REPLICA_CONSTANTS)
    return ids


def _record_requests_and_events(
    conn: Connection, new: list[IngestRecord], dups: list[IngestRecord], now: datetime
) -> None:
    dialect = conn.dialect
    stamp = bind_processor(s.requests.c.created, dialect)(now)
    request_rows = [
        (r.event_id, r.name, r.path, r.dataset, r.attempt)
        for r in sorted(new + dups, key=lambda r: r.event_id)
    ]
    upsert = upsert_tail(dialect, ["id"], REQUEST_UPDATE)
    shared = {"created": stamp, "updated": stamp}
    insert_rows(
        conn,
        s.requests,
        REQUEST_COLUMNS,
        request_rows,
        shared=shared,
        constants=REQUEST_CONSTANTS,
        tail=upsert,
    )

    detail, time = json_processor(s.events.c.detail, dialect), bind_processor(s.events.c.time, dialect)(now)
    event_rows = [
        (r.name, outcome, r.attempt, r.storage, detail(_detail(r)))
        for rs, outcome in ((new, "ok"), (dups, "duplicate"))
        for r in rs
    ]
    insert_rows(conn, s.events, EVENT_COLUMNS, event_rows, shared={"time": time}, constants=EVENT_CONSTANTS)


def _detail(r: IngestRecord) -> dict[str, Any]:
    return {"event_id": r.event_id, "path": r.path, "source": r.source, "pfn": r.pfn}


def _replica_pfns(
    conn: Connection, decisions: list[_Decision], file_ids: dict[str, int]
) -> dict[tuple[str, str], str]:
    """(name, storage) -> pfn for the files a duplicate refers to, so the caller can re-announce."""
    wanted = {
        file_ids[d.record.name]
        for d in decisions
        if d.outcome in ("duplicate", "duplicate_event") and d.record.name in file_ids
    }
    rows = select_in(conn, _REPLICA_PFNS_SQL, sorted(wanted))
    return {(name, storage): pfn for name, storage, pfn in rows}
