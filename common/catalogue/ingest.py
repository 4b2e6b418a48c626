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

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from common.catalogue import schema as s
from common.catalogue.filters import typed_value
from common.catalogue.models import FileInfo, IngestRecord, Outcome, RegisterOutcome
from common.catalogue.sql import chunks, insert_ignore_sync, storage_ids_sync, upsert_sync, utcnow

DAEMON = "ingest"


@dataclass(slots=True)
class _Decision:
    record: IngestRecord
    outcome: Outcome
    file: FileInfo | None


def lookup(conn: Connection, names: Sequence[str]) -> dict[str, tuple[int, FileInfo]]:
    """Name -> (file id, info) for the names that are registered."""
    out: dict[str, tuple[int, FileInfo]] = {}
    stmt = select(
        s.files.c.id, s.files.c.name, s.datasets.c.name, s.files.c.size, s.files.c.adler32, s.files.c.created
    ).join(s.datasets, s.datasets.c.id == s.files.c.dataset_id)
    for part in chunks(list(dict.fromkeys(names))):
        for fid, name, ds, size, adler, created in conn.execute(stmt.where(s.files.c.name.in_(part))):
            out[name] = (fid, FileInfo(name, ds, size, adler, created))
    return out


def _done_events(conn: Connection, ids: Sequence[str]) -> set[str]:
    done: set[str] = set()
    for part in chunks(list(dict.fromkeys(ids))):
        stmt = select(s.requests.c.id).where(s.requests.c.id.in_(part), s.requests.c.state == "done")
        done.update(conn.scalars(stmt).all())
    return done


def known(conn: Connection, ids: Sequence[str], names: Sequence[str]) -> tuple[set[str], dict[str, FileInfo]]:
    """What ingest asks before copying: which event ids are done, which names are registered."""
    return _done_events(conn, ids), {n: info for n, (_, info) in lookup(conn, names).items()}


def _decide(
    records: Sequence[IngestRecord], done: set[str], known: dict[str, FileInfo], now: datetime
) -> list[_Decision]:
    """Classify each record in order; ``done`` and ``known`` are updated as if each were committed."""
    out: list[_Decision] = []
    for r in records:
        info = known.get(r.name)
        if r.event_id in done:
            out.append(_Decision(r, "duplicate_event", info))
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


def _dataset_ids(conn: Connection, names: set[str], now: datetime) -> dict[str, int]:
    stmt = select(s.datasets.c.name, s.datasets.c.id)
    ids: dict[str, int] = {n: i for n, i in conn.execute(stmt.where(s.datasets.c.name.in_(names)))}
    missing = names - ids.keys()
    if missing:
        rows = [{"name": n, "state": "open", "created": now} for n in sorted(missing)]
        insert_ignore_sync(conn, s.datasets, rows, ["name"])
        ids.update({n: i for n, i in conn.execute(stmt.where(s.datasets.c.name.in_(missing)))})
    return ids


def register(conn: Connection, records: Sequence[IngestRecord]) -> list[RegisterOutcome]:
    now = utcnow()
    done = _done_events(conn, [r.event_id for r in records])
    existing = lookup(conn, [r.name for r in records])
    decisions = _decide(records, done, {n: info for n, (_, info) in existing.items()}, now)
    file_ids = {n: fid for n, (fid, _) in existing.items()}

    # Rows go in in key order so that concurrent batches lock unique keys in the same order
    # (PostgreSQL would otherwise deadlock two batches holding the same names in reverse order).
    new = sorted((d.record for d in decisions if d.outcome == "registered"), key=lambda r: r.name)
    dups = [d.record for d in decisions if d.outcome == "duplicate"]
    if new:
        file_ids.update(_insert_files(conn, new, now))
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
    ds_ids = _dataset_ids(conn, {r.dataset for r in new}, now)
    endpoint_ids = storage_ids_sync(conn, {r.storage for r in new})
    file_rows = [
        {
            "name": r.name,
            "dataset_id": ds_ids[r.dataset],
            "size": r.size,
            "adler32": r.adler32,
            "meta": r.metadata,
            "created": now,
        }
        for r in new
    ]
    ins = s.files.insert().returning(s.files.c.name, s.files.c.id)
    ids: dict[str, int] = {name: fid for name, fid in conn.execute(ins, file_rows)}

    meta_rows: list[dict[str, Any]] = []
    prov_rows: list[dict[str, Any]] = []
    for r in new:
        fid = ids[r.name]
        for key, value in r.metadata.items():
            num, integer, text = typed_value(value)
            meta_rows.append(
                {"file_id": fid, "key": key, "value_num": num, "value_int": integer, "value_str": text}
            )
        prov_rows.extend({"child_id": fid, "parent_name": p} for p in r.parents)
    if meta_rows:
        conn.execute(s.file_metadata.insert(), meta_rows)
    if prov_rows:
        conn.execute(s.provenance.insert(), prov_rows)
    replica_rows = [
        {
            "file_id": ids[r.name],
            "storage_id": endpoint_ids[r.storage],
            "pfn": r.pfn,
            "state": "available",
            "cartridge": None,
            "fseq": None,
            "created": now,
            "updated": now,
        }
        for r in new
    ]
    conn.execute(s.replicas.insert(), replica_rows)
    return ids


def _record_requests_and_events(
    conn: Connection, new: list[IngestRecord], dups: list[IngestRecord], now: datetime
) -> None:
    both = sorted(new + dups, key=lambda r: r.event_id)
    request_rows = [
        {
            "id": r.event_id,
            "kind": "ingest",
            "name": r.name,
            "path": r.path,
            "dataset": r.dataset,
            "state": "done",
            "attempts": r.attempt,
            "reason": None,
            "error": None,
            "created": now,
            "updated": now,
        }
        for r in both
    ]
    # A request that failed before keeps its last reason / error for the record; only state moves.
    upsert_sync(
        conn, s.requests, request_rows, ["id"], ["state", "attempts", "name", "path", "dataset", "updated"]
    )
    event_rows = [
        {
            "name": r.name,
            "time": now,
            "daemon": DAEMON,
            "type": "file.ingested",
            "outcome": outcome,
            "attempt": r.attempt,
            "storage": r.storage,
            "detail": {"event_id": r.event_id, "path": r.path, "source": r.source, "pfn": r.pfn},
        }
        for rs, outcome in ((new, "ok"), (dups, "duplicate"))
        for r in rs
    ]
    conn.execute(s.events.insert(), event_rows)


def _replica_pfns(
    conn: Connection, decisions: list[_Decision], file_ids: dict[str, int]
) -> dict[tuple[str, str], str]:
    """(name, storage) -> pfn for the files a duplicate refers to, so the caller can re-announce."""
    wanted = {
        file_ids[d.record.name]
        for d in decisions
        if d.outcome in ("duplicate", "duplicate_event") and d.record.name in file_ids
    }
    stmt = (
        select(s.files.c.name, s.storage_endpoints.c.name, s.replicas.c.pfn)
        .join(s.replicas, s.replicas.c.file_id == s.files.c.id)
        .join(s.storage_endpoints, s.storage_endpoints.c.id == s.replicas.c.storage_id)
        .where(s.replicas.c.state == "available")
    )
    out: dict[tuple[str, str], str] = {}
    for part in chunks(sorted(wanted)):
        rows = conn.execute(stmt.where(s.files.c.id.in_(part)))
        out.update({(name, storage): pfn for name, storage, pfn in rows})
    return out
