"""Catalogue side of archiving to tape: per-pool queues, batches, what was written where.

A tape copy is a row of ``replicas`` on a tape endpoint (one endpoint = one tape pool). Its states
and who moves them:

    queued     wanted; waits in its pool's queue for a mount        (ingest / rule evaluation, the
                                                                     ``tape.archive`` handler)
    archiving  taken into a write batch; ``cartridge`` names the    (tape scheduler)
               cartridge it is being written to, ``fseq`` is NULL,
               ``holder`` the tape daemon instance writing it
    available  on tape: ``cartridge`` + ``fseq`` say where; in an   (tape writer, start-up
               aggregate, ``member_offset`` is where its bytes       reconciliation)
               start within that tape file (NULL: a plain file)
    failed     no usable disk source (the reason is the file's     (tape writer)
               last error, request kind ``archive``)

Events stating these facts (``file.archived``, a tape ``file.failed``) are written to the outbox
(``common.catalogue.outbox``) in the transaction that records the fact; the tape daemon's relay
publishes them after the commit, so a broker outage or a kill never loses one.

The message that asked for the copy is acked once the row is ``queued``: the wait for a mount,
and the mount itself, are catalogue state, never a message held past the broker's consumer
timeout. The age that the mount policy compares is the row's ``created`` time, i.e. when the copy
was first wanted, so a copy put back into the queue after an interrupted batch keeps its place.

Several tape daemons may share a library and a catalogue (issue 19). A copy ``archiving`` names
its ``holder``, the instance (``common.instance``) whose batch took it; every statement that
records what became of it (``record_archived``, ``requeue``, ``mark_failed``, ``point_to``)
applies only to the rows the caller holds, and clears ``holder`` when the copy leaves
``archiving``. So an instance whose lease ran out while its process went on (paused, cut off
from the catalogue) records nothing over the successor that settled its copies: its statements
match no row. A successor settles only what no live instance holds (``settleable``, taken over
atomically with ``take_over``; ``daemons.tape.reconcile``). Rows left ``archiving`` before the
holder existed have none and are anyone's to settle.

Taking copies uses ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite serialises its writers): two
instances taking the same queue head at once never both get a copy, and never wait for (or
deadlock with) each other: a row the other is taking is skipped, not waited for.

All functions take a synchronous ``Connection`` inside the caller's transaction (``catalogue.tape``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Select, and_, bindparam, func, or_, select, update

from common.catalogue import outbox
from common.catalogue import schema as s
from common.catalogue.instances import held_by_dead
from common.catalogue.replication import Source
from common.catalogue.sql import chunks, insert_ignore_sync, storage_ids_sync, upsert_sync, utcnow
from common.messages import FileArchived, FileFailed, fact_id

f, r, ep = s.files, s.replicas, s.storage_endpoints

# States from which a new ``tape.archive`` puts the copy back into the queue (an explicit ask).
_REQUEUE_FROM = ("failed", "bad", "waiting")


@dataclass(frozen=True, slots=True)
class TapeCopy:
    """The state of one file's copy on one tape endpoint."""

    state: str
    cartridge: str | None
    fseq: int | None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A tape endpoint's queue: what the mount policy looks at."""

    storage: str
    files: int
    bytes: int
    oldest: datetime | None
    priority: int  # the highest priority waiting


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued copy at the head of its queue (before it is taken into a batch)."""

    replica_id: int
    size: int


@dataclass(frozen=True, slots=True)
class BatchFile:
    """A copy taken into a write batch, with the disk copies it may be read from."""

    replica_id: int
    name: str
    size: int
    adler32: str
    sources: tuple[Source, ...]
    sha256: str | None = None  # recorded at ingest: checked as the copy is written to tape


@dataclass(frozen=True, slots=True)
class Archived:
    """A file committed on a cartridge, to be recorded."""

    replica_id: int
    name: str
    storage: str
    cartridge: str
    fseq: int
    # The file's correlation id (its file.ready's), when the writer knows it; else
    # ``record_archived`` takes the file's ingest event id from the catalogue.
    correlation_id: str | None = None
    # A member of an aggregate: where its bytes start within the tape file (None: a plain file).
    member_offset: int | None = None


class Correlations:
    """Correlation id of each tape copy asked for, (name, endpoint) -> id, from ``tape.archive``
    until the writer records the copy: the writer works on catalogue rows, which do not carry it.

    Bounded (oldest forgotten first); a copy whose id was forgotten or never seen here (a restart
    in between) gets its file's ingest event id in ``record_archived``, the file.ready's own id.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._ids: dict[tuple[str, str], str] = {}

    def remember(self, name: str, storage: str, correlation_id: str | None) -> None:
        if correlation_id is None:
            return
        key = (name, storage)
        self._ids.pop(key, None)
        self._ids[key] = correlation_id
        while len(self._ids) > self.limit:
            del self._ids[next(iter(self._ids))]

    def take(self, name: str, storage: str) -> str | None:
        return self._ids.pop((name, storage), None)


CORRELATIONS = Correlations()  # one tape daemon per process: its handlers and its writer share it


def ingest_correlations(conn: Connection, names: Sequence[str]) -> dict[str, str]:
    """Each file's ingest event id (its file.ready's id, the correlation id it started with)."""
    out: dict[str, str] = {}
    if not names:
        return out
    rq = s.requests
    for part in chunks(sorted(set(names)), 500):
        stmt = (
            select(rq.c.name, rq.c.id)
            .where(rq.c.kind == "ingest", rq.c.name.in_(part))
            .order_by(rq.c.created.desc())  # the first ingest wins: written last below
        )
        for name, event_id in conn.execute(stmt):
            out[name] = event_id
    return out


@dataclass(frozen=True, slots=True)
class InFlight:
    """A copy ``archiving``: the cartridge it is being written to, the instance writing it."""

    replica_id: int
    name: str
    storage: str
    cartridge: str | None
    holder: str | None = None


def archive_request_id(name: str, storage: str) -> str:
    """A stable request id per tape copy, so its failures and success land on one ``requests`` row
    (the file's last error); hashed, as names may be longer than the id column."""
    digest = hashlib.sha1(f"{storage}\x00{name}".encode()).hexdigest()[:24]
    return f"archive-{digest}"


def archived_event(a: Archived, correlation_id: str | None = None) -> FileArchived:
    """``file.archived`` for a copy on tape; its id names the fact (file, endpoint, cartridge,
    fseq), so the writer's outbox row and the handler's re-announcement are one event to consumers."""
    return FileArchived(
        id=fact_id("file.archived", a.storage, a.name, a.cartridge, str(a.fseq)),
        name=a.name,
        storage=a.storage,
        cartridge=a.cartridge,
        fseq=a.fseq,
        correlation_id=correlation_id,
    )


class Wanted(NamedTuple):
    """One ``tape.archive`` request: a copy of ``name`` on the tape endpoint ``storage``."""

    name: str
    storage: str
    priority: int


def ensure_queued(conn: Connection, name: str, storage: str, priority: int) -> TapeCopy | None:
    """Make sure the copy of ``name`` on ``storage`` is wanted; None when the file is unknown.

    Idempotent: a copy already queued, being written or on tape is left as it is (a waiting copy
    takes the higher priority); a failed one is queued again (someone asked again).
    """
    return ensure_queued_many(conn, [Wanted(name, storage, priority)])[0]


def ensure_queued_many(conn: Connection, wanted: Sequence[Wanted]) -> list[TapeCopy | None]:
    """``ensure_queued`` of many requests in one transaction and a few statements (the tape
    handler's group commit: a transaction and three statements per file were most of the daemon's
    catalogue cost during a night). Each request is answered as ``ensure_queued`` answers it, in
    order; a copy asked for twice in one batch is decided on once, at the higher priority.

    Race (PostgreSQL, READ COMMITTED): read unlocked, a copy could be re-queued by another handler
    and taken into a batch (``archiving``) between our read and our update, which then put it back
    to ``queued``: the batch's ``record_archived`` matched nothing and the file was written to tape
    a second time. The rows are locked (``FOR UPDATE``, as ``recall.deliver`` locks its copy):
    another handler waits for our commit (``take_batch`` skips the row until then), and the state
    decided on (and returned: the handler announces a copy already on tape) is the one written
    over. Not a
    compare-and-set on the updates: a lost race would then need a re-read and a second decision,
    and the returned state could still be one that no longer holds.
    """
    ids: dict[str, int] = {}
    for part in chunks(sorted({w.name for w in wanted})):
        # (a Result has ``keys()``: ``dict.update`` would take it for a mapping)
        ids.update((n, i) for n, i in conn.execute(select(f.c.name, f.c.id).where(f.c.name.in_(part))))
    sids = storage_ids_sync(conn, {w.storage for w in wanted})
    # The copies asked for, each once, with the highest priority asked and the name it was asked by.
    asked: dict[tuple[int, int], tuple[int, str]] = {}
    for w in wanted:
        fid = ids.get(w.name)
        if fid is not None:
            key = (fid, sids[w.storage])
            asked[key] = (max(w.priority, asked.get(key, (w.priority, w.name))[0]), w.name)
    rows = _locked_copies(conn, asked)
    now = utcnow()
    missing = sorted(key for key in asked if key not in rows)  # one insertion order: no deadlock
    if missing:
        insert_ignore_sync(
            conn, r,
            [{"file_id": fid, "storage_id": sid, "pfn": asked[fid, sid][1], "state": "queued",
              "cartridge": None, "fseq": None, "member_offset": None, "created": now, "updated": now,
              "tombstone": None, "priority": asked[fid, sid][0]} for fid, sid in missing],
            ["file_id", "storage_id"],
        )  # fmt: skip
        # Ours, or a concurrent creator's (the insert waited for it, then kept its row): decide on
        # what is there, as if it had been read above. A file removed meanwhile has no row.
        rows.update(_locked_copies(conn, {key: asked[key] for key in missing}))
    decided: dict[tuple[int, int], TapeCopy] = {}
    requeue: list[dict[str, Any]] = []
    raise_priority: list[dict[str, Any]] = []
    for key, row in rows.items():
        priority = asked[key][0]
        if row.state in _REQUEUE_FROM:
            requeue.append({"fid": key[0], "sid": key[1], "prio": priority})
            decided[key] = TapeCopy("queued", None, None)
            continue
        if row.state == "queued" and priority > row.priority:
            raise_priority.append({"fid": key[0], "sid": key[1], "prio": priority})
        decided[key] = TapeCopy(row.state, row.cartridge, row.fseq)
    where = (r.c.file_id == bindparam("fid"), r.c.storage_id == bindparam("sid"))
    if requeue:
        conn.execute(
            update(r).where(*where).values(state="queued", cartridge=None, fseq=None, member_offset=None,
                                           priority=bindparam("prio"), created=now, updated=now),
            requeue,
        )  # fmt: skip
    if raise_priority:
        conn.execute(update(r).where(*where).values(priority=bindparam("prio")), raise_priority)
    answers: list[TapeCopy | None] = []
    for w in wanted:
        fid = ids.get(w.name)
        answers.append(None if fid is None else decided.get((fid, sids[w.storage])))
    return answers


def _locked_copies(conn: Connection, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Any]:
    """The tape copies ``(file_id, storage_id)`` that exist, locked until the transaction ends."""
    wanted = set(keys)
    found: dict[tuple[int, int], Any] = {}  # rows: state, cartridge, fseq, priority
    for part in chunks(sorted({fid for fid, _ in wanted})):
        stmt = (
            select(r.c.file_id, r.c.storage_id, r.c.state, r.c.cartridge, r.c.fseq, r.c.priority)
            .where(r.c.file_id.in_(part), r.c.storage_id.in_(sorted({sid for _, sid in wanted})))
            .order_by(r.c.id)  # one lock order for every locker: no deadlock between handlers
            .with_for_update()
        )
        for row in conn.execute(stmt):
            if (row.file_id, row.storage_id) in wanted:
                found[row.file_id, row.storage_id] = row
    return found


def queue_stats(conn: Connection, storages: Sequence[str]) -> list[QueueStats]:
    """Queued copies per tape endpoint: count, bytes, oldest, highest priority (empty ones left out)."""
    if not storages:
        return []
    stmt = (
        select(ep.c.name, func.count(), func.coalesce(func.sum(f.c.size), 0), func.min(r.c.created),
               func.max(r.c.priority))
        .select_from(r.join(f, f.c.id == r.c.file_id).join(ep, ep.c.id == r.c.storage_id))
        .where(ep.c.name.in_(list(storages)), r.c.state == "queued")
        .group_by(ep.c.name)
    )  # fmt: skip
    return [QueueStats(name, int(n), int(b), oldest, int(p)) for name, n, b, oldest, p in conn.execute(stmt)]


def queue_head_statement(storage: str, limit: int) -> Select[Any]:
    """The next ``limit`` queued copies of ``storage`` in write order: priority, then age (read in
    that order from ``ix_replicas_queue_order``, not sorted)."""
    # The endpoint's id as a scalar subquery, not a join: joined, PostgreSQL read the index per
    # endpoint row and sorted after (it does not carry the order through the join).
    storage_id = select(ep.c.id).where(ep.c.name == storage).scalar_subquery()
    return (
        select(r.c.id, f.c.size)
        .join(f, f.c.id == r.c.file_id)
        .where(r.c.storage_id == storage_id, r.c.state == "queued")
        .order_by(r.c.priority.desc(), r.c.created, r.c.id)
        .limit(limit)
    )


def queue_head(conn: Connection, storage: str, limit: int) -> list[Candidate]:
    """The next ``limit`` queued copies of ``storage`` in write order (``queue_head_statement``)."""
    return [Candidate(rid, int(size)) for rid, size in conn.execute(queue_head_statement(storage, limit))]


def take_batch(
    conn: Connection, replica_ids: Sequence[int], cartridge: str, *, holder: str
) -> list[BatchFile]:
    """Move the given queued copies to ``archiving`` on ``cartridge``, held by ``holder``; returns
    those this call got (another writer may have taken some meanwhile), in the order given, with
    their disk sources.

    Race (PostgreSQL, READ COMMITTED): two instances read the same queue head and take it at
    once. A plain ``UPDATE ... WHERE state = 'queued'`` gave each copy to one of them (the second
    waits for the first's row locks, then sees ``archiving``), but waiting in two different row
    orders is a deadlock, and the rows this call got were found again by ``updated`` (equal for
    two takers within a clock tick). The copies are locked ``FOR UPDATE SKIP LOCKED``: a row
    another taker (or a handler's ``ensure_queued``) holds is skipped, not waited for, and the
    copies taken are those the update returns.

    Sources are available copies on disk endpoints an operator has not set ``down``."""
    now = utcnow()
    ids = list(replica_ids)
    taken: set[int] = set()
    for part in chunks(ids):
        free = (
            select(r.c.id)
            .where(r.c.id.in_(part), r.c.state == "queued")
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        take = (
            update(r)
            .where(r.c.id.in_(free), r.c.state == "queued")
            .values(state="archiving", cartridge=cartridge, fseq=None, member_offset=None, holder=holder,
                    updated=now)
            .returning(r.c.id)
        )  # fmt: skip
        taken.update(conn.scalars(take))
    got: dict[int, Any] = {}
    stmt = select(r.c.id, r.c.file_id, f.c.name, f.c.size, f.c.adler32, f.c.sha256).join(
        f, f.c.id == r.c.file_id
    )
    for part in chunks(sorted(taken)):
        for row in conn.execute(stmt.where(r.c.id.in_(part))):
            got[row.id] = row
    sources: dict[int, list[Source]] = {}
    src = (
        select(r.c.file_id, ep.c.name, r.c.pfn)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(r.c.state == "available", ep.c.kind == "disk", ep.c.state != "down")
        .order_by(ep.c.name)
    )
    for part in chunks([row.file_id for row in got.values()]):
        for fid, storage, pfn in conn.execute(src.where(r.c.file_id.in_(part))):
            sources.setdefault(fid, []).append(Source(storage, pfn))
    return [
        BatchFile(rid, got[rid].name, int(got[rid].size), got[rid].adler32,
                  tuple(sources.get(got[rid].file_id, ())), got[rid].sha256)
        for rid in ids
        if rid in got
    ]  # fmt: skip


def point_to(conn: Connection, replica_ids: Sequence[int], cartridge: str, *, holder: str) -> None:
    """The batch moved on to another cartridge (the previous one is full or would not load)."""
    for part in chunks(list(replica_ids)):
        conn.execute(
            update(r)
            .where(r.c.id.in_(part), r.c.state == "archiving", r.c.holder == holder)
            .values(cartridge=cartridge, updated=utcnow())
        )


def requeue(conn: Connection, replica_ids: Sequence[int], *, holder: str) -> int:
    """Copies of a batch that ended early go back to their queue (keeping their age)."""
    n = 0
    for part in chunks(list(replica_ids)):
        res = conn.execute(
            update(r)
            .where(r.c.id.in_(part), r.c.state == "archiving", r.c.holder == holder)
            .values(state="queued", cartridge=None, fseq=None, member_offset=None, holder=None,
                    updated=utcnow())
        )  # fmt: skip
        n += int(res.rowcount)
    return n


def mark_failed(conn: Connection, replica_id: int, event: FileFailed | None = None, *, holder: str) -> bool:
    """The copy failed for good; ``event`` (its ``file.failed``) goes to the outbox with it.
    False, recording nothing, when the copy is no longer ``archiving`` held by ``holder``."""
    res = conn.execute(
        update(r)
        .where(r.c.id == replica_id, r.c.state == "archiving", r.c.holder == holder)
        .values(state="failed", cartridge=None, fseq=None, member_offset=None, holder=None, updated=utcnow())
    )
    if res.rowcount and event is not None:
        outbox.add(conn, [event])
    return bool(res.rowcount)


def record_archived(conn: Connection, records: Sequence[Archived], *, holder: str) -> list[Archived]:
    """Record files written on tape: the copy ``available`` at its cartridge and fseq, the copy's
    request done, one ``file.archived`` history row and outbox event each. Returns the records
    applied: a copy that is no longer ``archiving`` held by ``holder`` (cancelled meanwhile, or
    settled by a successor once this instance's lease ran out) is left alone. An aggregate's
    members (``member_offset`` set) are recorded like any flush group: one select and one
    ``executemany`` whatever their number."""
    now = utcnow()
    # Which copies are still ``archiving`` and ours, locked (PostgreSQL) so none leaves that
    # state or changes hands before the update below: one select and one executemany for the
    # whole flush group.
    archiving: set[int] = set()
    for part in chunks(sorted({a.replica_id for a in records})):
        stmt = (
            select(r.c.id)
            .where(r.c.id.in_(part), r.c.state == "archiving", r.c.holder == holder)
            .order_by(r.c.id)
        )
        archiving.update(conn.scalars(stmt.with_for_update()))
    applied = [a for a in records if a.replica_id in archiving]
    if not applied:
        return applied
    conn.execute(
        update(r)
        .where(r.c.id == bindparam("rid"))
        .values(state="available", cartridge=bindparam("vid"), fseq=bindparam("at"),
                member_offset=bindparam("offset"), holder=None, updated=now),
        [{"rid": a.replica_id, "vid": a.cartridge, "at": a.fseq, "offset": a.member_offset} for a in applied],
    )  # fmt: skip
    # Each file's correlation id: the writer's, else its ingest event id (the records returned are
    # those given, as applied).
    found = ingest_correlations(conn, [a.name for a in applied if a.correlation_id is None])
    correlated = [a if a.correlation_id else replace(a, correlation_id=found.get(a.name)) for a in applied]
    upsert_sync(
        conn, s.requests,
        [{"id": archive_request_id(a.name, a.storage), "kind": "archive", "name": a.name, "path": None,
          "dataset": None, "state": "done", "attempts": 1, "reason": None, "error": None,
          "created": now, "updated": now} for a in applied],
        ["id"], ["state", "updated"],
    )  # fmt: skip
    conn.execute(
        s.events.insert(),
        [{"name": a.name, "time": now, "daemon": "tape", "type": "file.archived", "outcome": "ok",
          "attempt": 1, "storage": a.storage,
          "detail": {"cartridge": a.cartridge, "fseq": a.fseq, "correlation_id": a.correlation_id}}
         for a in correlated],
    )  # fmt: skip
    outbox.add(conn, [archived_event(a, a.correlation_id) for a in correlated])
    return applied


def in_flight(conn: Connection, storages: Sequence[str]) -> list[InFlight]:
    """Copies in state ``archiving`` on the given endpoints, whoever holds them."""
    return _archiving(conn, storages)


def settleable(
    conn: Connection, storages: Sequence[str], holder: str, idle: Sequence[str], now: datetime
) -> list[InFlight]:
    """The copies ``archiving`` on ``storages`` that ``holder`` may settle: those no live instance
    holds (``held_by_dead``: their writer's lease ran out or it stopped; no holder at all: left
    before holders existed), and its own on the endpoints ``idle`` (no batch of its own runs
    there: what a batch could neither record nor requeue when it ended)."""
    mine = and_(r.c.holder == holder, ep.c.name.in_(list(idle)))
    return _archiving(conn, storages, or_(held_by_dead(r.c.holder, now), mine))


def _archiving(conn: Connection, storages: Sequence[str], *where: Any) -> list[InFlight]:
    if not storages:
        return []
    stmt = (
        select(r.c.id, f.c.name, ep.c.name, r.c.cartridge, r.c.holder)
        .join(f, f.c.id == r.c.file_id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name.in_(list(storages)), r.c.state == "archiving", *where)
        .order_by(r.c.id)
    )
    return [InFlight(*row) for row in conn.execute(stmt)]


def take_over(conn: Connection, replica_ids: Sequence[int], holder: str, now: datetime) -> list[int]:
    """Make ``holder`` the holder of those given copies that are still ``archiving`` and held by no
    live instance but ``holder`` (``settleable``'s condition, checked again at the update);
    returns the copies taken, the ones ``holder`` goes on to settle.

    Two survivors settling a dead instance's copies at once: each row goes to one of them. The
    rows are locked ``FOR UPDATE SKIP LOCKED`` (PostgreSQL): a row the other survivor is taking
    is skipped, not waited for (two takers waiting for each other's rows in different orders
    would deadlock), and a row it has taken has a live holder when the condition is checked
    again. A row a stale writer is recording right now is skipped too, and found ``available``
    next time. SQLite serialises the takers."""
    taken: list[int] = []
    for part in chunks(sorted(replica_ids)):
        free = (
            select(r.c.id)
            .where(
                r.c.id.in_(part), r.c.state == "archiving",
                or_(r.c.holder == holder, held_by_dead(r.c.holder, now)),
            )
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )  # fmt: skip
        stmt = update(r).where(r.c.id.in_(free)).values(holder=holder).returning(r.c.id)
        taken += conn.scalars(stmt)
    return sorted(taken)


def files_per_cartridge(conn: Connection) -> dict[str, int]:
    """Available tape copies recorded per cartridge (``spool tape list`` sets it beside the
    library's own count: the two agree unless something is amiss). Counted in tape files: the
    members of an aggregate share one fseq and count once."""
    stmt = (
        select(r.c.cartridge, func.count(r.c.fseq.distinct()))
        .where(r.c.cartridge.is_not(None), r.c.state == "available")
        .group_by(r.c.cartridge)
    )
    return {vid: int(n) for vid, n in conn.execute(stmt)}
