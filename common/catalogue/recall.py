"""Catalogue side of recall: requests, their files, the tape copies to read, the copies delivered.

States of a recall file and who moves them (all in ``daemons/recall``)::

    queued   waiting to be served: from a disk copy at once, else from tape by the scheduler
    staging  being read from tape now by the instance named in ``holder`` (back to ``queued``
             when the read is given up, and once that instance's lease has run out: ``recover``)
    done     a verified copy is on the destination (pinned: tombstone = now + pin_seconds)
    failed   for good, with a reason code (``unknown_file``, ``checksum_mismatch``, ``no_copy``...)

A recall is ``active`` until every file is done or failed; the transaction that settles its last
file also moves it to ``done`` (or ``failed`` when some file failed), so exactly one process
decides completion. Settling locks the request row before recounting its files (``_settle``):
on PostgreSQL two deliveries committing together otherwise each missed the other's row and left
the recall ``active`` for ever (issue 14); ``complete_settled`` sweeps for any such recall.

Publishing is an outbox: ``announced`` flags on both tables are set only after the event went
out, and whatever is done but not announced is published again at start-up under the same
message ids (consumers drop duplicates by id).

Several recall instances (issue 19): a row ``staging`` names its reader (``holder``, an
``instances.id``; NULL for a scheduler alone on its catalogue, without a lease). Every statement
that settles or puts back a read row applies to the rows its caller holds, so an instance whose
lease ran out (and whose rows a survivor took over) records nothing: ``set_state``, ``fail``,
``deliver_many`` take the caller's ``holder``. A cartridge is read by one instance at a time
(``claim_cartridge``: a row in ``recall_cartridges``, the instance's while its lease stands).

The chosen tape copy of a queued file (``storage``, ``cartridge``, ``fseq``) is the scheduler's
plan, written before a mount so the mount loop can find "the next file of this cartridge ahead of
the head" with one indexed query, including files of requests that arrived during the mount.

Every function takes a synchronous ``Connection``; ``catalogue.recall`` (the repository) runs it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)

from common.catalogue import schema as s
from common.catalogue.instances import held_by_dead
from common.catalogue.sql import check_fits, chunks, storage_ids_sync, utcnow

f, r, ep, d = s.files, s.replicas, s.storage_endpoints, s.datasets
rc, rf, carts = s.recalls, s.recall_files, s.recall_cartridges

UNKNOWN_FILE = "unknown_file"
NO_COPY = "no_copy"
DAEMON = "recall"
# Operator states of an endpoint whose copies cannot be read now (they wait, they do not fail).
_UNREADABLE = ("down",)


# --- values --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecallSpec:
    """A ``recall.request`` as the catalogue records it."""

    id: str
    destination: str
    priority: int
    names: tuple[str, ...] = ()
    dataset: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class TapeCopy:
    storage: str  # tape endpoint (its library and pool)
    cartridge: str
    fseq: int


@dataclass(frozen=True, slots=True)
class DiskCopy:
    storage: str
    pfn: str


@dataclass(frozen=True, slots=True)
class PendingFile:
    """A queued file of an active recall, with every copy it could be served from."""

    recall_id: str
    name: str
    file_id: int
    size: int
    adler32: str
    destination: str
    priority: int
    requested: datetime
    chosen: TapeCopy | None  # the copy the scheduler planned to read
    tape: tuple[TapeCopy, ...] = ()  # available copies on readable tape endpoints
    disk: tuple[DiskCopy, ...] = ()  # available copies on readable disk endpoints
    # No usable copy now, but one will come: archiving in progress, or its endpoint is down.
    blocked: bool = False
    damaged: bool = False  # some tape copy was found corrupt (marked bad)
    sha256: str | None = None  # recorded at ingest; None before migration 0016

    @property
    def key(self) -> tuple[str, str]:
        return (self.recall_id, self.name)


@dataclass(frozen=True, slots=True)
class ReadItem:
    """A queued file planned on one cartridge: what the mount loop reads next."""

    recall_id: str
    name: str
    file_id: int
    size: int
    adler32: str
    destination: str
    copy: TapeCopy
    # The copy is a member of an aggregate: where its bytes start within the tape file (None: the
    # tape file is the file). The read covers ``size`` bytes from there, checked against ``adler32``.
    member_offset: int | None = None
    sha256: str | None = None  # recorded at ingest, checked on the bytes read; None before 0016

    @property
    def key(self) -> tuple[str, str]:
        return (self.recall_id, self.name)


@dataclass(frozen=True, slots=True)
class Recalled:
    """A ``file.recalled`` to publish."""

    recall_id: str
    name: str
    storage: str
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A ``recall.completed`` to publish (and to send to ``reply_to``)."""

    recall_id: str
    state: str  # done | failed
    files: int
    failed: tuple[str, ...]
    reply_to: str | None
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class Settled:
    """What a transaction settled and the caller must now announce."""

    recalled: tuple[Recalled, ...] = ()
    completed: tuple[Completion, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.recalled or self.completed)

    def __add__(self, other: Settled) -> Settled:
        return Settled(self.recalled + other.recalled, self.completed + other.completed)


@dataclass(frozen=True, slots=True)
class Created:
    new: bool  # False: the request id was known (a redelivery, or a conflict)
    files: int
    unknown: tuple[str, ...]
    settled: Settled = field(default_factory=Settled)
    # The request id was known for a request with other content: what differs (``id_conflict``).
    conflict: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified copy of a file now on ``destination`` at ``pfn``."""

    file_id: int
    name: str
    destination: str
    pfn: str
    pin_until: datetime
    source: str  # "A00001/12 (tape1)" or "disk2": for the history


@dataclass(frozen=True, slots=True)
class FileState:
    name: str
    state: str
    storage: str | None
    cartridge: str | None
    fseq: int | None
    reason: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class RecallView:
    id: str
    state: str
    destination: str
    dataset: str | None
    priority: int
    reply_to: str | None
    files: int
    done: int
    failed: int
    created: datetime
    updated: datetime
    completed: datetime | None
    file_states: tuple[FileState, ...] = ()

    @property
    def queued(self) -> int:
        return self.files - self.done - self.failed


# --- requests ------------------------------------------------------------------------------------
def create_recall(conn: Connection, spec: RecallSpec) -> Created | None:
    """Record a request and its files; None when it names a dataset the catalogue does not know.

    Idempotent on the request id: a redelivered message finds the recall and changes nothing.
    The same id with other content (destination, dataset, priority, names) changes nothing either
    and says what differs (``Created.conflict``): one id names one request.
    Unknown names become files ``failed`` with reason ``unknown_file``; the others are queued.
    A request with nothing left to do (every name unknown, an empty dataset) completes here.
    """
    known = conn.execute(
        select(rc.c.files, rc.c.destination, rc.c.dataset, rc.c.priority).where(rc.c.id == spec.id)
    ).first()
    if known is not None:
        return Created(False, int(known.files), (), conflict=_differs(conn, known, spec))
    ids: dict[str, int] = {}
    if spec.dataset is not None:
        ds = conn.scalar(select(d.c.id).where(d.c.name == spec.dataset))
        if ds is None:
            return None
        ids.update({n: i for n, i in conn.execute(select(f.c.name, f.c.id).where(f.c.dataset_id == ds))})
    names = list(dict.fromkeys(spec.names))
    for part in chunks(names):
        ids.update({n: i for n, i in conn.execute(select(f.c.name, f.c.id).where(f.c.name.in_(part)))})
    named = set(names)
    wanted = [*sorted(n for n in ids if n not in named), *names]  # the dataset's files, then names
    unknown = tuple(n for n in wanted if n not in ids)
    now = utcnow()
    row = {
        "id": spec.id, "state": "active", "destination": spec.destination, "dataset": spec.dataset,
        "priority": spec.priority, "reply_to": spec.reply_to, "correlation_id": spec.correlation_id,
        "files": len(wanted), "done": 0, "failed": len(unknown), "created": now, "updated": now,
        "completed": None, "announced": False,
    }  # fmt: skip
    check_fits(rc, row)
    conn.execute(rc.insert().values(**row))
    file_rows = [
        {"recall_id": spec.id, "name": n, "file_id": ids.get(n), "state": "queued" if n in ids else "failed",
         "storage": None, "cartridge": None, "fseq": None,
         "reason": None if n in ids else UNKNOWN_FILE,
         "error": None if n in ids else f"{n} is not in the catalogue", "updated": now, "announced": False}
        for n in wanted
    ]  # fmt: skip
    for rows in chunks(file_rows):
        conn.execute(rf.insert(), list(rows))
    _history(conn, [(n, "recall.failed", "failed", None, {"request_id": spec.id, "reason": UNKNOWN_FILE})
                    for n in unknown])  # fmt: skip
    return Created(True, len(wanted), unknown, Settled(completed=_settle(conn, [spec.id])))


def _differs(conn: Connection, known: Any, spec: RecallSpec) -> str | None:
    """What makes ``spec`` another request than the one recorded under its id, or None.

    Names: a request by names must name the same set; a request by dataset recorded the dataset's
    files of that moment plus its names, so its names must be among them (files added to the
    dataset since do not make a redelivery a conflict).
    """
    for what, recorded, given in (
        ("destination", known.destination, spec.destination),
        ("dataset", known.dataset, spec.dataset),
        ("priority", known.priority, spec.priority),
    ):
        if recorded != given:
            return f"{what} {recorded!r} (this request: {given!r})"
    recorded_names = set(conn.scalars(select(rf.c.name).where(rf.c.recall_id == spec.id)))
    given_names = set(spec.names)
    if spec.dataset is None and recorded_names != given_names:
        return f"{len(recorded_names)} other names"
    if not given_names <= recorded_names:
        return f"names without {len(given_names - recorded_names)} of this request's"
    return None


def recover(conn: Connection, now: datetime | None = None) -> int:
    """Put back the ``staging`` rows no live instance holds (their reader died, or its lease ran
    out), and drop such instances' cartridge claims; returns the rows put back. A live instance's
    rows are never touched.

    One conditional ``UPDATE``: two survivors running it at once on PostgreSQL do not both settle a
    row: the second waits for the first's row locks, re-checks the row (now ``queued``) and leaves
    it, so the counts of the two add up to the rows put back. SQLite serialises writers.
    """
    now = now or utcnow()
    res = conn.execute(
        update(rf)
        .where(rf.c.state == "staging", held_by_dead(rf.c.holder, now))
        .values(state="queued", holder=None, updated=now)
    )
    # The dead instances' cartridge claims too: free already (``claim_cartridge`` takes them over),
    # deleted so the table holds the cartridges being read and no more.
    conn.execute(delete(carts).where(held_by_dead(carts.c.holder, now)))
    return int(res.rowcount)


# --- several instances: who reads which cartridge --------------------------------------------
def claim_cartridge(conn: Connection, library: str, vid: str, holder: str, now: datetime) -> bool:
    """Take ``vid`` of ``library`` for ``holder`` (a live instance) to read; False when another
    live instance reads it.

    The row is free when its holder's lease ran out (or its instance row is gone): a dead
    instance's cartridge is taken over by the first survivor that wants it. Two claimants at once
    on PostgreSQL: the conditional ``UPDATE`` of the second waits for the first's row lock and
    re-checks the row, which names a live holder by then; two first inserts collide on the key and
    the loser's transaction runs again (``Catalogue.write``), finding the row taken.
    """
    if conn.execute(select(_live(holder, now))).scalar() is not True:
        return False  # our own lease ran out: take nothing more
    key = (carts.c.library == library, carts.c.vid == vid)
    taken = conn.execute(
        update(carts)
        .where(*key, or_(carts.c.holder == holder, held_by_dead(carts.c.holder, now)))
        .values(holder=holder, claimed=now)
    )
    if taken.rowcount == 1:
        return True
    if conn.execute(select(carts.c.vid).where(*key)).first() is not None:
        return False
    row = {"library": library, "vid": vid, "holder": holder, "claimed": now}
    check_fits(carts, row)
    conn.execute(carts.insert().values(**row))
    return True


def release_cartridge(conn: Connection, library: str, vid: str, holder: str) -> None:
    conn.execute(
        delete(carts).where(carts.c.library == library, carts.c.vid == vid, carts.c.holder == holder)
    )


def cartridges_held(conn: Connection, now: datetime, but: str | None = None) -> set[tuple[str, str]]:
    """(library, vid) of the cartridges live instances other than ``but`` are reading."""
    live = select(s.instances.c.id).where(s.instances.c.expires > now)
    stmt = select(carts.c.library, carts.c.vid).where(carts.c.holder.in_(live.scalar_subquery()))
    if but is not None:
        stmt = stmt.where(carts.c.holder != but)
    return {(row.library, row.vid) for row in conn.execute(stmt)}


def let_go(conn: Connection, holder: str) -> int:
    """A clean stop: put back the rows ``holder`` holds and free its cartridges, so the other
    instances go on at once rather than after its lease; returns the rows put back."""
    conn.execute(delete(carts).where(carts.c.holder == holder))
    res = conn.execute(
        update(rf)
        .where(rf.c.state == "staging", rf.c.holder == holder)
        .values(state="queued", holder=None, updated=utcnow())
    )
    return int(res.rowcount)


# --- what is pending -----------------------------------------------------------------------------
def pending(conn: Connection, limit: int, recall_id: str | None = None) -> list[PendingFile]:
    """Queued files of active recalls, most urgent first, each with its usable copies."""
    stmt = (
        select(
            rf.c.recall_id,
            rf.c.name,
            rf.c.file_id,
            rf.c.storage,
            rf.c.cartridge,
            rf.c.fseq,
            rc.c.destination,
            rc.c.priority,
            rc.c.created,
            f.c.size,
            f.c.adler32,
            f.c.sha256,
        )
        .join(rc, rc.c.id == rf.c.recall_id)
        .join(f, f.c.id == rf.c.file_id)
        .where(rf.c.state == "queued", rc.c.state == "active")
        .order_by(rc.c.priority.desc(), rc.c.created, rf.c.recall_id, rf.c.name)
        .limit(limit)
    )
    if recall_id is not None:
        stmt = stmt.where(rf.c.recall_id == recall_id)
    rows = conn.execute(stmt).all()
    copies = _copies(conn, list({row.file_id for row in rows}))
    out = []
    for row in rows:
        tape, disk, blocked, damaged = copies.get(row.file_id, ((), (), False, False))
        chosen = None
        if row.cartridge is not None and row.storage is not None and row.fseq is not None:
            chosen = TapeCopy(row.storage, row.cartridge, int(row.fseq))
        out.append(
            PendingFile(
                recall_id=row.recall_id,
                name=row.name,
                file_id=row.file_id,
                size=int(row.size),
                adler32=row.adler32,
                destination=row.destination,
                priority=row.priority,
                requested=row.created,
                chosen=chosen,
                tape=tape,
                disk=disk,
                blocked=blocked,
                damaged=damaged,
                sha256=row.sha256,
            )
        )
    return out


def _copies(
    conn: Connection, file_ids: Sequence[int]
) -> dict[int, tuple[tuple[TapeCopy, ...], tuple[DiskCopy, ...], bool, bool]]:
    tape: dict[int, list[TapeCopy]] = defaultdict(list)
    disk: dict[int, list[DiskCopy]] = defaultdict(list)
    blocked: set[int] = set()
    damaged: set[int] = set()
    stmt = (
        select(r.c.file_id, ep.c.name, ep.c.kind, ep.c.state, r.c.state, r.c.pfn, r.c.cartridge, r.c.fseq)
        .join(ep, ep.c.id == r.c.storage_id)
        .order_by(ep.c.name)
    )
    for part in chunks(file_ids):
        for fid, storage, kind, ep_state, state, pfn, cartridge, fseq in conn.execute(
            stmt.where(r.c.file_id.in_(part))
        ):
            readable = ep_state not in _UNREADABLE
            if kind == "disk" and state == "available" and readable:
                disk[fid].append(DiskCopy(storage, pfn))
            elif kind == "tape" and state == "available" and cartridge is not None and fseq is not None:
                if readable:
                    tape[fid].append(TapeCopy(storage, cartridge, int(fseq)))
                else:
                    blocked.add(fid)
            elif kind == "tape" and state in ("queued", "waiting", "archiving"):
                blocked.add(fid)  # the tape daemon has not written it yet
            elif kind == "tape" and state == "bad":
                damaged.add(fid)
    return {fid: (tuple(tape[fid]), tuple(disk[fid]), fid in blocked, fid in damaged) for fid in file_ids}


def assign(conn: Connection, plan: Sequence[tuple[str, str, TapeCopy | None]]) -> None:
    """Record the tape copy chosen for each (recall, name) still queued (None: forget it)."""
    if not plan:
        return
    now = utcnow()
    # One statement executed for every row (executemany): a 100,000-file plan is one round of the
    # driver, not 100,000 statements compiled and sent one by one.
    stmt = (
        update(rf)
        .where(rf.c.recall_id == bindparam("k_recall"), rf.c.name == bindparam("k_name"),
               rf.c.state == "queued")
        .values(storage=bindparam("c_storage"), cartridge=bindparam("c_cartridge"), fseq=bindparam("c_fseq"),
                updated=now)
    )  # fmt: skip
    conn.execute(
        stmt,
        [
            {"k_recall": recall_id, "k_name": name, "c_storage": copy.storage if copy else None,
             "c_cartridge": copy.cartridge if copy else None, "c_fseq": copy.fseq if copy else None}
            for recall_id, name, copy in plan
        ],
    )  # fmt: skip


def next_on_cartridge(conn: Connection, storages: Sequence[str], vid: str, after: int) -> list[ReadItem]:
    """The queued files planned on ``vid`` at its lowest position beyond ``after`` (the head):
    ``window_on_cartridge`` of one position."""
    return window_on_cartridge(conn, storages, vid, after, 1)


def window_on_cartridge(
    conn: Connection, storages: Sequence[str], vid: str, after: int, limit: int
) -> list[ReadItem]:
    """The queued files planned on ``vid`` at its ``limit`` lowest positions beyond ``after`` (the
    head's fseq), in tape order: a mount's read-ahead window, one query however many files it holds.

    A position is a tape file (fseq) or, in an aggregate, a member (fseq and ``member_offset``):
    an aggregate's members still queued at the head's fseq come next too, lowest offset first, so
    the mount reads them all before it moves on. Several rows at one position when several
    requests want that file (most urgent request first). Files planned on the cartridge while it is
    mounted show up here too: that is how a late request joins the mount when it is ahead of the head.
    """
    # The tape copy's offset within its tape file (NULL: a plain file). Joined on file, cartridge
    # and fseq: a file is on a cartridge at one place.
    copy = r.alias("copy")
    joined = rf.join(rc, rc.c.id == rf.c.recall_id).outerjoin(
        copy, (copy.c.file_id == rf.c.file_id) & (copy.c.cartridge == vid) & (copy.c.fseq == rf.c.fseq)
    )
    offset = func.coalesce(copy.c.member_offset, -1)
    where = (
        rf.c.state == "queued",
        rf.c.cartridge == vid,
        rf.c.storage.in_(list(storages)),
        or_(rf.c.fseq > after, (rf.c.fseq == after) & copy.c.member_offset.is_not(None)),
        rc.c.state == "active",
    )
    positions = (
        select(rf.c.fseq, offset.label("at"))
        .select_from(joined)
        .where(*where)
        .distinct()
        .order_by(rf.c.fseq, offset)
        .limit(limit)
    )
    stmt = (
        select(rf.c.recall_id, rf.c.name, rf.c.file_id, rf.c.storage, rf.c.fseq, f.c.size, f.c.adler32,
               rc.c.destination, copy.c.member_offset, f.c.sha256)
        .select_from(joined.join(f, f.c.id == rf.c.file_id))
        .where(*where, tuple_(rf.c.fseq, offset).in_(positions))
        .order_by(rf.c.fseq, offset, rc.c.priority.desc(), rc.c.created, rf.c.recall_id)
    )  # fmt: skip
    return [
        ReadItem(row.recall_id, row.name, row.file_id, int(row.size), row.adler32, row.destination,
                 TapeCopy(row.storage, vid, int(row.fseq)),
                 None if row.member_offset is None else int(row.member_offset), row.sha256)
        for row in conn.execute(stmt)
    ]  # fmt: skip


def _holding(holder: str | None) -> ColumnElement[bool]:
    """Rows ``holder`` holds; None: rows no instance holds (every ``queued`` row, and ``staging``
    rows of a scheduler without a lease)."""
    return rf.c.holder.is_(None) if holder is None else rf.c.holder == holder


def _live(holder: str, now: datetime) -> ColumnElement[bool]:
    """``holder``'s lease stands at ``now`` (in the statement that takes work for it)."""
    return exists().where(s.instances.c.id == holder, s.instances.c.expires > now)


def set_state(
    conn: Connection,
    keys: Sequence[tuple[str, str]],
    state: str,
    forget_copy: bool = False,
    holder: str | None = None,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Move rows between ``queued`` and ``staging`` (never out of done / failed); returns the keys
    moved.

    To ``staging``: ``queued`` rows only, marked as ``holder``'s, and with a holder only while its
    lease stands at ``now`` (checked in the statement: an instance whose lease ran out takes
    nothing more). Two instances staging one row: on PostgreSQL the second waits for the first's
    lock, re-checks the row (``staging`` by then) and leaves it, so a row is taken once.
    To ``queued``: the rows ``holder`` holds (None: rows nobody holds), their holder cleared; a row
    another instance holds is never moved, so a stale instance cannot put back its successor's.
    """
    if not keys:
        return []
    now = now or utcnow()
    values: dict[str, Any] = {"state": state, "updated": now}
    if forget_copy:
        values.update(storage=None, cartridge=None, fseq=None)
    if state == "staging":
        values["holder"] = holder
        where: tuple[ColumnElement[bool], ...] = (rf.c.state == "queued",)
        if holder is not None:
            where += (_live(holder, now),)
    else:
        values["holder"] = None
        where = (or_(rf.c.state == "queued", rf.c.state == "staging"), _holding(holder))
    moved: list[tuple[str, str]] = []
    # One statement per chunk of keys, the keys it moved returned (UPDATE ... RETURNING, both
    # backends): the caller learns which rows are its own without another query.
    for part in chunks(list(dict.fromkeys(keys))):
        stmt = (
            update(rf)
            .where(tuple_(rf.c.recall_id, rf.c.name).in_(list(part)), *where)
            .values(**values)
            .returning(rf.c.recall_id, rf.c.name)
        )
        moved += [(row.recall_id, row.name) for row in conn.execute(stmt)]
    return moved


# --- outcomes ------------------------------------------------------------------------------------
def deliver(conn: Connection, dl: Delivery, holder: str | None = None) -> Settled | None:
    """Record one verified copy (``deliver_many`` of one); None when the reaper is deleting the
    destination's copy right now: the caller tries again later."""
    settled, refused = deliver_many(conn, [dl], holder)
    return None if refused else settled


def deliver_many(
    conn: Connection, deliveries: Sequence[Delivery], holder: str | None = None
) -> tuple[Settled, tuple[int, ...]]:
    """Record verified copies on their destinations and settle every recall waiting for them there.

    ``holder``: the instance that read them from tape. A copy is recorded only when some row
    waiting for it is ``staging`` under that holder; then its waiting rows nobody holds are settled
    too. A copy none of whose rows the holder still holds (its lease ran out and a survivor put
    them back, or took them) records nothing: that instance is stale and the survivor reads and
    records the file. Without a holder (a copy served from disk): the rows nobody holds are settled.
    Rows another instance holds are never moved: their reader records them.

    Each copy is pinned: its tombstone becomes at least ``pin_until`` (the replicator's reaper
    deletes it after that, unless a rule holds it, and never while it is the last copy). A copy
    that was never tombstoned (made by ingest) stays so. A delivery whose destination copy the
    reaper is deleting right now records nothing: its file id is returned (second element) and the
    caller tries again later.

    One transaction and a few statements for a whole read-ahead window of a mount (issue 18): the
    copies locked and read in one statement, inserted and updated in one ``executemany`` each, the
    waiting recall files found and moved per chunk of file ids, the counters advanced once.
    """
    if not deliveries:
        return Settled(), ()
    now = utcnow()
    sids = storage_ids_sync(conn, {dl.destination for dl in deliveries})
    by_key = {(dl.file_id, sids[dl.destination]): dl for dl in deliveries}  # the last one wins
    order = {k: i for i, k in enumerate(by_key)}
    # Race (PostgreSQL): read unlocked, a copy could be claimed by the reaper (``deleting``) or
    # re-pinned by another delivery before the update below, which then turned a copy being
    # deleted back to ``available`` or shortened a pin. Locked (``FOR UPDATE``, as the reaper's
    # ``begin_delete`` locks a file's copies), the state and tombstone decided on are the ones
    # written over. A row not there yet is not locked: a concurrent insert fails on the unique
    # key and the transaction is run again (``Catalogue.write``).
    existing: dict[tuple[int, int], Any] = {}
    fids = sorted({fid for fid, _ in by_key})
    for part in chunks(fids):
        stmt = (
            select(r.c.id, r.c.file_id, r.c.storage_id, r.c.state, r.c.tombstone)
            .where(r.c.file_id.in_(part), r.c.storage_id.in_(sorted(set(sids.values()))))
            .order_by(r.c.file_id, r.c.storage_id)
            .with_for_update()
        )
        for found in conn.execute(stmt):
            if (found.file_id, found.storage_id) in by_key:
                existing[(found.file_id, found.storage_id)] = found
    refused = {k for k, row in existing.items() if row.state == "deleting"}
    placed = {k: dl for k, dl in by_key.items() if k not in refused}
    # The recall files waiting for these copies: found by file id alone (its own index), then
    # their requests by id; state and destination matched here. With the request's state or the
    # file's in the query, SQLite's planner (no statistics) took the state index instead and
    # scanned every queued file, or every active request, for each window. Locked (PostgreSQL):
    # the rows counted below are exactly the rows moved. Locked after the copies, as before, so
    # two deliveries lock in one order.
    candidates: list[Any] = []
    for part in chunks(sorted({fid for fid, _ in placed})):
        stmt = (
            select(rf.c.recall_id, rf.c.name, rf.c.file_id, rf.c.state, rf.c.holder)
            .where(rf.c.file_id.in_(part))
            .order_by(rf.c.file_id, rf.c.recall_id)
            .with_for_update()
        )
        candidates += [
            w for w in conn.execute(stmt)
            if w.state in ("queued", "staging") and w.holder in (None, holder)
        ]  # fmt: skip
    requests: dict[str, Any] = {}
    for part in chunks(sorted({w.recall_id for w in candidates})):
        heads = select(rc.c.id, rc.c.destination, rc.c.correlation_id).where(
            rc.c.id.in_(part), rc.c.state == "active"
        )
        requests.update({x.id: x for x in conn.execute(heads)})
    waiting: list[tuple[str, str, str | None, Delivery]] = []  # recall, name, correlation, delivery
    held: set[tuple[int, int]] = set()  # copies with a row ``staging`` under ``holder``
    for w in candidates:
        head = requests.get(w.recall_id)
        if head is None:
            continue
        k = (w.file_id, sids.get(head.destination, -1))
        got = placed.get(k)
        if got is not None:
            waiting.append((w.recall_id, w.name, head.correlation_id, got))
            if holder is not None and w.holder == holder and w.state == "staging":
                held.add(k)
    if holder is not None:  # a stale reader's copies: nothing recorded (see above)
        placed = {k: dl for k, dl in placed.items() if k in held}
        waiting = [w for w in waiting if (w[3].file_id, sids[w[3].destination]) in held]
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for k, dl in placed.items():
        row = existing.get(k)
        if row is None:
            inserts.append(
                {"file_id": dl.file_id, "storage_id": k[1], "pfn": dl.pfn, "state": "available",
                 "cartridge": None, "fseq": None, "created": now, "updated": now,
                 "tombstone": dl.pin_until, "priority": 3}
            )  # fmt: skip
        else:
            keep_forever = row.state == "available" and row.tombstone is None
            tombstone = None if keep_forever else max(row.tombstone or dl.pin_until, dl.pin_until)
            updates.append({"k_id": row.id, "v_pfn": dl.pfn, "v_tombstone": tombstone})
    if inserts:
        conn.execute(r.insert(), inserts)
    if updates:
        conn.execute(
            update(r)
            .where(r.c.id == bindparam("k_id"))
            .values(
                state="available", pfn=bindparam("v_pfn"), tombstone=bindparam("v_tombstone"), updated=now
            ),
            updates,
        )
    # Announced in the caller's order (the mount's: fseq), each file's requests by id.
    waiting.sort(key=lambda w: (order[(w[3].file_id, sids[w[3].destination])], w[0]))
    if waiting:
        conn.execute(
            update(rf)
            .where(
                rf.c.recall_id == bindparam("k_recall"),
                rf.c.name == bindparam("k_name"),
                or_(rf.c.state == "queued", rf.c.state == "staging"),
            )
            .values(state="done", reason=None, error=None, updated=now, announced=False, holder=None),
            [{"k_recall": rid, "k_name": name} for rid, name, _, _ in waiting],
        )
    _history(
        conn,
        [(dl.name, "file.recalled", "ok", dl.destination,
          {"request_id": rid, "source": dl.source, "pfn": dl.pfn})
         for rid, _, _, dl in waiting],
    )  # fmt: skip
    recalled = tuple(Recalled(rid, dl.name, dl.destination, corr) for rid, _, corr, dl in waiting)
    moved = Counter(rid for rid, _, _, _ in waiting)
    settled = Settled(recalled, _advance(conn, {rid: (n, 0) for rid, n in moved.items()}))
    return settled, tuple(sorted({fid for fid, _ in refused}))


def fail(
    conn: Connection, keys: Sequence[tuple[str, str]], reason: str, error: str, holder: str | None = None
) -> Settled:
    """Fail files for good (from queued / staging) and settle their recalls: the rows ``holder``
    holds (None: the rows nobody holds), never another instance's."""
    now = utcnow()
    by_recall: dict[str, list[str]] = defaultdict(list)
    for recall_id, name in keys:
        by_recall[recall_id].append(name)
    open_state = and_(rf.c.state.in_(("queued", "staging")), _holding(holder))
    moved: set[tuple[str, str]] = set()
    # Per request, the names still open (locked on PostgreSQL, so exactly these are moved and
    # counted), then one update of them: a request's many files are a few statements, not one each.
    for recall_id, names in by_recall.items():
        for part in chunks(list(dict.fromkeys(names))):
            where = (rf.c.recall_id == recall_id, rf.c.name.in_(part), open_state)
            open_names = set(conn.scalars(select(rf.c.name).where(*where).with_for_update()))
            if not open_names:
                continue
            conn.execute(
                update(rf)
                .where(*where)
                .values(state="failed", reason=reason, error=error, updated=now, holder=None)
            )
            moved.update((recall_id, n) for n in open_names)
    failed = [k for k in dict.fromkeys(keys) if k in moved]  # in the caller's order, as before
    _history(conn, [(n, "recall.failed", "failed", None, {"request_id": i, "reason": reason, "error": error})
                    for i, n in failed])  # fmt: skip
    return Settled(completed=_advance(conn, {i: (0, n) for i, n in Counter(i for i, _ in failed).items()}))


def tape_copy_bad(conn: Connection, file_id: int, storage: str, reason: str, error: str) -> bool:
    """Mark a tape copy ``bad`` (its data did not verify); True if another tape copy is usable."""
    sid = storage_ids_sync(conn, {storage})[storage]
    # Race (PostgreSQL): two reads of one file from two cartridges (two destinations) failing at
    # once each saw the other copy still usable and both put their files back in the queue for a
    # copy that was bad too (the next pass then failed them: a wasted pass, not a wrong outcome).
    # The file's tape copies are locked first, in storage order, so the second sees the first's.
    conn.execute(
        select(r.c.id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(r.c.file_id == file_id, ep.c.kind == "tape")
        .order_by(r.c.storage_id)
        .with_for_update(of=r)
    )
    conn.execute(
        update(r)
        .where(r.c.file_id == file_id, r.c.storage_id == sid, r.c.state == "available")
        .values(state="bad", updated=utcnow())
    )
    name = conn.scalar(select(f.c.name).where(f.c.id == file_id))
    if name is not None:
        _history(conn, [(name, "replica.bad", "bad", storage, {"reason": reason, "error": error})])
    return bool(_copies(conn, [file_id])[file_id][0])


def _settle(conn: Connection, recall_ids: Iterable[str]) -> tuple[Completion, ...]:
    """Refresh the counters of active recalls; complete those with nothing left (in this
    transaction, so one process only ever decides a completion).

    Race (issue 14): on PostgreSQL (READ COMMITTED) two transactions settling files of one recall
    at once (a disk copy served by the handler, a tape read by a mount) each recounted without the
    other's uncommitted row, and the last to commit wrote a counter one short: the recall stayed
    ``active`` for ever. Fix: lock the request rows (``SELECT ... FOR UPDATE``, in id order so two
    settlers never deadlock) *before* recounting. The lock is held to commit and the count is a
    later statement, so it sees every settlement committed before ours, and whoever settles after
    us waits and sees ours: the last one always counts them all. A request another settler
    completed meanwhile no longer matches ``state = 'active'`` when we get the lock (PostgreSQL
    re-checks the row), so completion is decided once. SQLite serialises writers; the clause is
    rendered as nothing there.
    """
    ids = sorted(set(recall_ids))
    if not ids:
        return ()
    now = utcnow()
    heads: dict[str, Any] = {}
    for part in chunks(ids):
        stmt = select(rc).where(rc.c.id.in_(part), rc.c.state == "active").order_by(rc.c.id).with_for_update()
        for row in conn.execute(stmt):
            heads[row.id] = row
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for part in chunks(list(heads)):
        stmt = (
            select(rf.c.recall_id, rf.c.state, func.count())
            .where(rf.c.recall_id.in_(part))
            .group_by(rf.c.recall_id, rf.c.state)
        )
        for rid, state, n in conn.execute(stmt):
            counts[rid][state] = int(n)
    out = []
    for rid, head in heads.items():
        done, failed = counts[rid].get("done", 0), counts[rid].get("failed", 0)
        values: dict[str, Any] = {"done": done, "failed": failed, "updated": now}
        complete = done + failed >= head.files
        if complete:
            values.update(state="failed" if failed else "done", completed=now)
        res = conn.execute(update(rc).where(rc.c.id == rid, rc.c.state == "active").values(**values))
        if complete and res.rowcount:
            out.append(_completion(conn, rid, values["state"], head))
    return tuple(out)


def _advance(conn: Connection, moved: dict[str, tuple[int, int]]) -> tuple[Completion, ...]:
    """Add the files this transaction moved to done / failed (``moved``: recall -> (done, failed))
    to their active recalls' counters; complete those with nothing left.

    ``_settle`` recounts a request's files, which costs a scan of all of them per settlement: a
    100,000-file request read 10^10 rows to complete. Adding is as safe under the same lock: the
    request rows are locked (in id order) before their counters are read, so a concurrent settler
    of the same request waits and then reads ours (PostgreSQL hands ``FOR UPDATE`` the newest
    row version), and the rows counted were locked and moved by this transaction itself. A counter
    a former bug left short (issue 14) is repaired by the sweep (``complete_settled``), which
    recounts.
    """
    ids = sorted(rid for rid, (done, failed) in moved.items() if done or failed)
    if not ids:
        return ()
    now = utcnow()
    heads: list[Any] = []
    for part in chunks(ids):
        stmt = select(rc).where(rc.c.id.in_(part), rc.c.state == "active").order_by(rc.c.id).with_for_update()
        heads += conn.execute(stmt).all()
    rows, complete = [], []
    for head in heads:
        done, failed = head.done + moved[head.id][0], head.failed + moved[head.id][1]
        state = "active"
        if done + failed >= head.files:
            state = "failed" if failed else "done"
            complete.append((head, state))
        rows.append({"k_id": head.id, "v_done": done, "v_failed": failed, "v_state": state,
                     "v_completed": now if state != "active" else None})  # fmt: skip
    # One statement for every request (executemany): a window settling files of 256 one-file
    # requests is one round, not 256. The rows are locked and ``active`` (above), so each is moved.
    if rows:
        conn.execute(
            update(rc)
            .where(rc.c.id == bindparam("k_id"), rc.c.state == "active")
            .values(done=bindparam("v_done"), failed=bindparam("v_failed"), state=bindparam("v_state"),
                    completed=bindparam("v_completed"), updated=now),
            rows,
        )  # fmt: skip
    return _completions(conn, complete)


def _completions(conn: Connection, complete: Sequence[tuple[Any, str]]) -> tuple[Completion, ...]:
    """``Completion``s of requests just completed (head row, state), their failed names read in
    one statement per chunk of failed requests."""
    failed: dict[str, list[str]] = defaultdict(list)
    for part in chunks([head.id for head, state in complete if state == "failed"]):
        stmt = (
            select(rf.c.recall_id, rf.c.name)
            .where(rf.c.recall_id.in_(part), rf.c.state == "failed")
            .order_by(rf.c.recall_id, rf.c.name)
        )
        for rid, name in conn.execute(stmt):
            failed[rid].append(name)
    return tuple(
        Completion(head.id, state, int(head.files), tuple(failed.get(head.id, ())), head.reply_to,
                   head.correlation_id)
        for head, state in complete
    )  # fmt: skip


def complete_settled(conn: Connection, limit: int = 1000) -> tuple[Completion, ...]:
    """The sweep: complete ``active`` recalls none of whose files is queued or staging.

    Repairs what the race above left in existing catalogues (a counter one short, so the last
    delivery never completed the request), and anything else that ever leaves a recall with
    nothing to do. Through ``_settle``, as a delivery would: the counters are recounted from the
    file rows under the row lock, and the completion goes out through the outbox (``announced``
    stays False until the caller publishes it).
    """
    open_files = select(rf.c.recall_id).where(
        rf.c.recall_id == rc.c.id, rf.c.state.in_(("queued", "staging"))
    )
    stuck = conn.scalars(
        select(rc.c.id).where(rc.c.state == "active", ~open_files.exists()).order_by(rc.c.id).limit(limit)
    ).all()
    return _settle(conn, stuck)


def _completion(conn: Connection, recall_id: str, state: str, head: Any) -> Completion:
    failed = conn.scalars(
        select(rf.c.name).where(rf.c.recall_id == recall_id, rf.c.state == "failed").order_by(rf.c.name)
    ).all()
    return Completion(recall_id, state, int(head.files), tuple(failed), head.reply_to, head.correlation_id)


def _history(conn: Connection, rows: Sequence[tuple[str, str, str, str | None, dict[str, Any]]]) -> None:
    if not rows:
        return
    now = utcnow()
    conn.execute(
        s.events.insert(),
        [
            {"name": name, "time": now, "daemon": DAEMON, "type": type_, "outcome": outcome, "attempt": 1,
             "storage": storage, "detail": detail}
            for name, type_, outcome, storage, detail in rows
        ],
    )  # fmt: skip


# --- the outbox ----------------------------------------------------------------------------------
def mark_announced(conn: Connection, settled: Settled) -> None:
    now = utcnow()
    if settled.recalled:
        stmt = (
            update(rf)
            .where(rf.c.recall_id == bindparam("k_recall"), rf.c.name == bindparam("k_name"))
            .values(announced=True)
        )
        conn.execute(stmt, [{"k_recall": x.recall_id, "k_name": x.name} for x in settled.recalled])
    for part in chunks([c.recall_id for c in settled.completed]):
        conn.execute(update(rc).where(rc.c.id.in_(part)).values(announced=True, updated=now))


def unannounced(conn: Connection, limit: int = 10_000) -> Settled:
    """Done files and complete recalls whose event was not published (the process died first)."""
    files = conn.execute(
        select(rf.c.recall_id, rf.c.name, rc.c.destination, rc.c.correlation_id)
        .join(rc, rc.c.id == rf.c.recall_id)
        .where(rf.c.state == "done", rf.c.announced.is_(False))
        .limit(limit)
    ).all()
    heads = conn.execute(
        select(rc).where(rc.c.state.in_(("done", "failed")), rc.c.announced.is_(False)).limit(limit)
    ).all()
    return Settled(
        tuple(Recalled(x.recall_id, x.name, x.destination, x.correlation_id) for x in files),
        tuple(_completion(conn, h.id, h.state, h) for h in heads),
    )


# --- views ---------------------------------------------------------------------------------------
def _view(row: Any, file_states: tuple[FileState, ...] = ()) -> RecallView:
    return RecallView(
        id=row.id, state=row.state, destination=row.destination, dataset=row.dataset,
        priority=row.priority, reply_to=row.reply_to, files=row.files, done=row.done,
        failed=row.failed, created=row.created, updated=row.updated, completed=row.completed,
        file_states=file_states,
    )  # fmt: skip


def status(conn: Connection, recall_id: str) -> RecallView | None:
    row = conn.execute(select(rc).where(rc.c.id == recall_id)).first()
    if row is None:
        return None
    stmt = (
        select(rf.c.name, rf.c.state, rf.c.storage, rf.c.cartridge, rf.c.fseq, rf.c.reason, rf.c.error)
        .where(rf.c.recall_id == recall_id)
        .order_by(rf.c.cartridge, rf.c.fseq, rf.c.name)
    )
    return _view(row, tuple(FileState(*x) for x in conn.execute(stmt)))


@dataclass(frozen=True, slots=True)
class RecallSummary:
    """``spool recall status`` of one request, counted in the catalogue: a 100,000-file request
    is a few grouped rows, not 100,000 file states."""

    view: RecallView  # without file_states
    cartridges: dict[str, dict[str, int]]  # cartridge ("-": none planned) -> state -> files
    failures: tuple[FileState, ...]  # the first ``limit`` failed files
    waiting: tuple[FileState, ...] | None  # the first ``limit`` queued and staging files, when asked for

    @property
    def waiting_total(self) -> int:
        return sum(c.get("queued", 0) + c.get("staging", 0) for c in self.cartridges.values())


def summary(
    conn: Connection, recall_id: str, with_waiting: bool = False, limit: int | None = None
) -> RecallSummary | None:
    """Counts per cartridge and state, and the failed (and, ``with_waiting``, the waiting) files in
    (cartridge, fseq, name) order: each list the first ``limit`` (None: all), the totals in the
    counts. A 100,000-file request listed whole took seconds; bounded, a page of it is one read."""
    row = conn.execute(select(rc).where(rc.c.id == recall_id)).first()
    if row is None:
        return None
    # States of a cartridge in the order they first appear in (fseq, name) order, as the per-file
    # view listed them: one file per fseq on a cartridge, so (min fseq, min name) gives that order.
    groups = conn.execute(
        select(rf.c.cartridge, rf.c.state, func.count(), func.min(rf.c.fseq), func.min(rf.c.name))
        .where(rf.c.recall_id == recall_id)
        .group_by(rf.c.cartridge, rf.c.state)
    ).all()
    cartridges: dict[str, dict[str, int]] = {}
    first_seen = sorted(groups, key=lambda g: (g[0] or "-", g[3] is None, g[3] or 0, g[4]))
    for cartridge, state, n, _, _ in first_seen:
        cartridges.setdefault(cartridge or "-", {})[state] = int(n)
    detail = (
        select(rf.c.name, rf.c.state, rf.c.storage, rf.c.cartridge, rf.c.fseq, rf.c.reason, rf.c.error)
        .order_by(rf.c.cartridge, rf.c.fseq, rf.c.name)
        .limit(limit)
    )
    # ``!=``, not an IN on the state, so the request's key leads the plan rather than the state
    # index across every request.
    failures = tuple(
        FileState(*x) for x in conn.execute(detail.where(rf.c.recall_id == recall_id, rf.c.state == "failed"))
    )
    waiting = None
    if with_waiting:
        open_rows = detail.where(rf.c.recall_id == recall_id, rf.c.state != "done", rf.c.state != "failed")
        waiting = tuple(FileState(*x) for x in conn.execute(open_rows))
    return RecallSummary(_view(row), dict(sorted(cartridges.items())), failures, waiting)


def list_recalls(conn: Connection, limit: int, active_only: bool = False) -> list[RecallView]:
    stmt = select(rc).order_by(rc.c.created.desc(), rc.c.id).limit(limit)
    if active_only:
        stmt = stmt.where(rc.c.state == "active")
    return [_view(row) for row in conn.execute(stmt)]
