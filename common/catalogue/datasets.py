"""A dataset's lifecycle, from the first file to its deletion (issue 20, parts 1 and 8).

    state      entered when                                              by
    open       its first file is registered                              ingest (registration)
    closed     ``dataset.close`` event, ``spool dataset close``, or      ingest (event, auto-close),
               idle ``[datasets] auto_close_after`` since its last file  the CLI
    complete   closed, and every copy its rules want on disk endpoints   replicator (``advance``)
               is available (every file has at least one available copy)
    archived   complete, its rules want copies on tape endpoints, and     replicator (``advance``)
               every one of them is available (a dataset whose rules
               want no tape copy stays complete)
    deleting   ``spool dataset delete``: its copies are being removed    the CLI (``request_delete``)
    deleted    every copy of every file is gone (rows kept: tombstones)  replicator (``settle``)

A file is refused (``dataset_closed``) in every state but ``open``. The refusal is decided twice:
by ingest before any byte moves, and again in the registration transaction
(``common.catalogue.ingest``), which locks the dataset's row on PostgreSQL, so a close that lands
between the two still refuses the file.

"The copies its rules want" are the live locks on the dataset's files (rule x file x endpoint,
``common.catalogue.replication``). Ingest writes a file's locks just after its registration, in
another transaction; a dataset is therefore judged only once it has been closed for a settle time
(the caller's), and not while a rule is ``new`` (its walk may still lock more copies).

Transitions are conditional updates (``WHERE state = <old>``): with several replicator instances
running ``advance`` at once, one of them moves a dataset and adds its ``dataset.completed`` /
``dataset.archived`` to the outbox in that same transaction, so each event is sent once per
dataset (and its message id is derived from the dataset's name: a duplicate is dropped by id).

Deletion keeps the history: files stay (a file of a ``deleting`` / ``deleted`` dataset is a
tombstone), replicas go to state ``deleted`` once their bytes are gone (tape copies at once: their
cartridge space is reclaimed by repacking, outside Spool), events stay. A deleted dataset's name
is not reused: its files' names stay taken and a ``file.ready`` naming it is refused.

Every function takes a synchronous ``Connection`` inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, and_, case, exists, func, insert, literal, or_, select, update

from common.catalogue import outbox
from common.catalogue import schema as s
from common.messages import DatasetArchived, DatasetCompleted, DatasetDeleted, Message, fact_id

d, f, r, ep, lk, ru, rq = (
    s.datasets, s.files, s.replicas, s.storage_endpoints, s.locks, s.rules, s.requests
)  # fmt: skip

OPEN = "open"
CLOSED = ("closed", "complete", "archived")
GONE = ("deleting", "deleted")
STATES = (OPEN, *CLOSED, *GONE)

CloseOutcome = Literal["closed", "already", "deleted", "unknown"]
DeleteOutcome = Literal["deleting", "already", "held", "unknown"]


def _live(now: datetime) -> Any:
    return or_(lk.c.expires.is_(None), lk.c.expires > now)


# --- closing ------------------------------------------------------------------------------------
def close(conn: Connection, name: str, by: str, now: datetime) -> CloseOutcome:
    """Close an open dataset. Closing one already closed (or further on) changes nothing."""
    done = conn.execute(
        update(d)
        .where(d.c.name == name, d.c.state == OPEN)
        .values(state="closed", closed_at=now, closed_by=by)
    ).rowcount
    if done:
        return "closed"
    state = conn.scalar(select(d.c.state).where(d.c.name == name))
    if state is None:
        return "unknown"
    return "deleted" if state in GONE else "already"


def auto_close(conn: Connection, idle_since: datetime, now: datetime) -> list[str]:
    """Close every open dataset whose last file was registered before ``idle_since``.

    PostgreSQL: a registration into the dataset updates its ``last_file`` (row lock); this update
    waits for it and re-checks the condition on the row as committed, so a dataset that just got
    a file stays open."""
    idle = and_(d.c.state == OPEN, d.c.last_file < idle_since)
    stmt = (
        update(d)
        .where(idle)
        .values(state="closed", closed_at=now, closed_by="auto-close")
        .returning(d.c.name)
    )
    return sorted(conn.scalars(stmt).all())


# --- complete / archived --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Progress:
    files: int
    bytes: int
    without_copy: int  # files with no available copy anywhere
    missing_disk: int  # wanted copies on disk endpoints not available
    wanted_tape: int  # copies wanted on tape endpoints (locks; one per rule holding a copy)
    missing_tape: int  # wanted copies on tape endpoints not available

    @property
    def archived(self) -> bool:
        """Its rules want tape copies, and all of them are there."""
        return self.wanted_tape > 0 and self.missing_tape == 0


def progress(conn: Connection, dataset_id: int, now: datetime) -> Progress:
    files, size = conn.execute(
        select(func.count(), func.coalesce(func.sum(f.c.size), 0)).where(f.c.dataset_id == dataset_id)
    ).one()
    available = exists().where(r.c.file_id == f.c.id, r.c.state == "available")
    without = conn.scalar(select(func.count()).where(f.c.dataset_id == dataset_id, ~available))
    wanted_there = exists().where(
        r.c.file_id == lk.c.file_id, r.c.storage_id == lk.c.storage_id, r.c.state == "available"
    )
    counts = conn.execute(
        select(ep.c.kind, func.count(), func.sum(case((wanted_there, 0), else_=1)))
        .select_from(lk.join(f, f.c.id == lk.c.file_id).join(ep, ep.c.id == lk.c.storage_id))
        .where(f.c.dataset_id == dataset_id, _live(now))
        .group_by(ep.c.kind)
    ).all()
    wanted = {kind: (int(n), int(lacking or 0)) for kind, n, lacking in counts}
    disk, tape = wanted.get("disk", (0, 0)), wanted.get("tape", (0, 0))
    return Progress(int(files), int(size), int(without or 0), disk[1], tape[0], tape[1])


def _lacking(conn: Connection, dataset_id: int, now: datetime, kind: str) -> bool:
    """Whether a wanted copy on a ``kind`` endpoint is not available (for disk, also: a file
    without any available copy). EXISTS, which stops at the first such file: a dataset is judged
    every round while its copies are being made, and this is the usual answer."""
    if kind == "disk":
        available = exists().where(r.c.file_id == f.c.id, r.c.state == "available")
        if conn.scalar(select(exists().where(f.c.dataset_id == dataset_id, ~available))):
            return True
    there = exists().where(
        r.c.file_id == lk.c.file_id, r.c.storage_id == lk.c.storage_id, r.c.state == "available"
    )
    endpoints = select(ep.c.id).where(ep.c.kind == kind).scalar_subquery()
    lacking = (
        select(lk.c.file_id)
        .join(f, f.c.id == lk.c.file_id)
        .where(f.c.dataset_id == dataset_id, lk.c.storage_id.in_(endpoints), _live(now), ~there)
        .exists()
    )
    return bool(conn.scalar(select(lacking)))


def _move(conn: Connection, dataset_id: int, old: str, new: str, **values: Any) -> bool:
    stmt = update(d).where(d.c.id == dataset_id, d.c.state == old).values(state=new, **values)
    return bool(conn.execute(stmt).rowcount)


def advance(conn: Connection, settled_before: datetime, now: datetime) -> list[Message]:
    """Move each closed dataset that has all its wanted copies to ``complete`` / ``archived``;
    the events of the moves are added to the outbox here and returned."""
    if conn.scalar(select(exists().where(ru.c.state == "new"))):
        return []  # a rule not yet walked may want more copies of these files
    # A complete dataset whose rules wanted no tape copy is done: not looked at again.
    waiting = or_(d.c.state == "closed", and_(d.c.state == "complete", d.c.tape_wanted.is_(True)))
    candidates = conn.execute(
        select(d.c.id, d.c.name, d.c.state, d.c.closed_at)
        .where(waiting, d.c.closed_at <= settled_before)
        .order_by(d.c.id)
    ).all()
    events: list[Message] = []
    for dataset_id, name, state, closed_at in candidates:
        if _lacking(conn, dataset_id, now, "disk" if state == "closed" else "tape"):
            continue  # the usual answer while copies are being made: no counting
        p = progress(conn, dataset_id, now)
        if p.without_copy or p.missing_disk:
            continue
        archived = p.archived
        if state == "closed":
            stamps: dict[str, Any] = {"completed_at": now, "tape_wanted": p.wanted_tape > 0}
            if archived:
                stamps["archived_at"] = now
            if not _move(conn, dataset_id, "closed", "archived" if archived else "complete", **stamps):
                continue  # another instance moved it first
            events.append(_completed(name, p, closed_at, now))
            if archived:
                events.append(_archived(name, p, now))
        elif archived and _move(conn, dataset_id, "complete", "archived", archived_at=now):
            events.append(_archived(name, p, now))
    outbox.add(conn, events)
    return events


def _completed(name: str, p: Progress, closed_at: datetime, now: datetime) -> DatasetCompleted:
    return DatasetCompleted(
        id=fact_id("dataset.completed", name), dataset=name, files=p.files, bytes=p.bytes,
        closed=closed_at, completed=now,
    )  # fmt: skip


def _archived(name: str, p: Progress, now: datetime) -> DatasetArchived:
    return DatasetArchived(
        id=fact_id("dataset.archived", name), dataset=name, files=p.files, bytes=p.bytes, archived=now
    )


# --- deleting -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeleteRequest:
    outcome: DeleteOutcome
    holders: list[str] = field(default_factory=list)  # rules without lifetime holding its files
    files: int = 0
    disk_copies: int = 0  # to be deleted by the replicator
    tape_copies: int = 0  # marked deleted


def holders(conn: Connection, dataset_id: int, now: datetime) -> list[str]:
    """The rules without a lifetime that hold a live lock on one of the dataset's files."""
    stmt = (
        select(lk.c.rule_id)
        .distinct()
        .select_from(lk.join(f, f.c.id == lk.c.file_id).join(ru, ru.c.id == lk.c.rule_id))
        .where(f.c.dataset_id == dataset_id, ru.c.lifetime.is_(None), _live(now))
        .order_by(lk.c.rule_id)
    )
    return list(conn.scalars(stmt).all())


def request_delete(conn: Connection, name: str, by: str, force: bool, now: datetime) -> DeleteRequest:
    """Start deleting a dataset: refuse while a rule without lifetime holds it (unless ``force``);
    else drop its files' locks, mark its tape copies ``deleted`` and its disk copies ``deleting``
    (the replicator removes their bytes), and set the dataset ``deleting``."""
    stmt = select(d.c.id, d.c.state).where(d.c.name == name)
    row = conn.execute(stmt.with_for_update() if conn.dialect.name == "postgresql" else stmt).first()
    if row is None:
        return DeleteRequest("unknown")
    dataset_id, state = row
    if state in GONE:
        return DeleteRequest("already")
    held = holders(conn, dataset_id, now)
    if held and not force:
        return DeleteRequest("held", held)
    of_dataset = select(f.c.id).where(f.c.dataset_id == dataset_id).scalar_subquery()
    conn.execute(lk.delete().where(lk.c.file_id.in_(of_dataset)))
    files = int(conn.scalar(select(func.count()).where(f.c.dataset_id == dataset_id)) or 0)
    _history(conn, dataset_id, now)
    tape, disk = mark_copies(conn, dataset_id, now)
    conn.execute(
        update(d).where(d.c.id == dataset_id).values(state="deleting", deleted_at=now, deleted_by=by)
    )
    return DeleteRequest("deleting", held, files, disk, tape)


def _history(conn: Connection, dataset_id: int, now: datetime) -> None:
    """One event per file, so ``spool trace`` tells why its copies went."""
    # Who asked is on the dataset's row (``deleted_by``); ``detail`` stays NULL: a JSON literal in
    # INSERT ... SELECT is typed differently by each backend.
    rows = select(
        f.c.name, literal(now, s.events.c.time.type), literal("cli"), literal("dataset.delete"),
        literal("ok"), literal(1),
    ).where(f.c.dataset_id == dataset_id)  # fmt: skip
    columns = ["name", "time", "daemon", "type", "outcome", "attempt"]
    conn.execute(insert(s.events).from_select(columns, rows))


def mark_copies(conn: Connection, dataset_id: int, now: datetime) -> tuple[int, int]:
    """Tape copies and copies without bytes -> ``deleted``; disk copies with bytes -> ``deleting``.
    Returns (tape copies marked, disk copies to delete). Run again while the dataset is
    ``deleting``: a copy a replicator or tape writer finished meanwhile is caught here."""
    of_dataset = select(f.c.id).where(f.c.dataset_id == dataset_id).scalar_subquery()
    tape_ids = select(ep.c.id).where(ep.c.kind == "tape").scalar_subquery()
    mine = r.c.file_id.in_(of_dataset)
    tape = conn.execute(
        update(r)
        .where(mine, r.c.storage_id.in_(tape_ids), r.c.state != "deleted")
        .values(state="deleted", updated=now)
    ).rowcount
    on_disk = and_(mine, r.c.storage_id.not_in(tape_ids))
    conn.execute(
        update(r)
        .where(on_disk, r.c.state.in_(("queued", "waiting", "failed")))
        .values(state="deleted", updated=now)
    )
    disk = conn.execute(
        update(r).where(on_disk, r.c.state.in_(("available", "bad"))).values(state="deleting", updated=now)
    ).rowcount
    return int(tape), int(disk)


@dataclass(frozen=True, slots=True)
class DoomedCopy:
    replica_id: int
    name: str
    storage: str
    pfn: str


def doomed_copies(conn: Connection, limit: int) -> list[DoomedCopy]:
    """Disk copies of deleting datasets whose bytes are still to be removed."""
    stmt = (
        select(r.c.id, f.c.name, ep.c.name, r.c.pfn)
        .join(f, f.c.id == r.c.file_id)
        .join(d, d.c.id == f.c.dataset_id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(d.c.state == "deleting", r.c.state == "deleting", ep.c.kind == "disk")
        .order_by(r.c.id)
        .limit(limit)
    )
    return [DoomedCopy(*row) for row in conn.execute(stmt)]


def copy_deleted(conn: Connection, copy: DoomedCopy, now: datetime) -> None:
    """The bytes of a doomed copy are gone: its row stays as a tombstone, with a history row."""
    moved = conn.execute(
        update(r)
        .where(r.c.id == copy.replica_id, r.c.state == "deleting")
        .values(state="deleted", updated=now)
    ).rowcount
    if moved:
        conn.execute(
            s.events.insert().values(
                name=copy.name, time=now, daemon="replicator", type="replica.deleted", outcome="ok",
                attempt=1, storage=copy.storage, detail={"pfn": copy.pfn, "why": "dataset deleted"},
            )
        )  # fmt: skip


def settle_deletions(conn: Connection, now: datetime) -> list[str]:
    """Catch copies finished since the delete began; a dataset none of whose copies is left but
    as a tombstone becomes ``deleted``, its ``dataset.deleted`` event in the outbox in the same
    transaction. Returns the datasets that did."""
    done: list[str] = []
    for dataset_id, name in conn.execute(select(d.c.id, d.c.name).where(d.c.state == "deleting")).all():
        mark_copies(conn, dataset_id, now)
        left = exists().where(r.c.file_id == f.c.id, f.c.dataset_id == dataset_id, r.c.state != "deleted")
        if not conn.scalar(select(left)) and _move(conn, dataset_id, "deleting", "deleted"):
            files = conn.scalar(select(func.count()).select_from(f).where(f.c.dataset_id == dataset_id))
            event = DatasetDeleted(
                id=fact_id("dataset.deleted", name), dataset=name, files=int(files or 0), deleted=now
            )
            outbox.add(conn, [event])
            done.append(name)
    return done


def in_dataset_being_deleted(conn: Connection, file_id: int) -> bool:
    return bool(
        conn.scalar(select(exists().where(f.c.id == file_id, f.c.dataset_id == d.c.id, d.c.state.in_(GONE))))
    )


# --- reading --------------------------------------------------------------------------------------
def states(conn: Connection, names: Sequence[str]) -> dict[str, str]:
    if not names:
        return {}
    return dict(conn.execute(select(d.c.name, d.c.state).where(d.c.name.in_(sorted(set(names))))).all())
