"""Catalogue side of replication: rules, locks, wanted copies, parked copies, endpoint health, reaping.

The states of a replica row and who moves them:

    queued    a copy is wanted and a request is on the bus            (ingest / rule evaluation)
    waiting   the request was parked: its endpoint is not writable     (replicator; re-sent on resume)
    available verified copy in place                                   (ingest, replicator)
    bad       the copy is missing or corrupt; a lock may ask for repair (replicator)
    failed    copying it failed for good (reason in the request row)    (replicator)
    deleting  the reaper is removing it                                (reaper; back to queued
                                                                        if a lock appeared)

A *lock* (rule x file x endpoint) is a rule's claim on a copy. While a live lock exists (no
``expires`` or a future one) the copy stays. A replica the replicator made carries a ``tombstone``
(the time it became eligible for deletion): the reaper deletes it once no live lock holds it, and
never when it is the file's last available copy. Copies ingest made have no tombstone and stay.

All functions take a synchronous ``Connection`` inside the caller's transaction (see
``Catalogue.read`` and ``write``): the same code serves SQLite in a worker thread and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    and_,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)

from common.catalogue import outbox
from common.catalogue import schema as s
from common.catalogue.datasets import GONE
from common.catalogue.filters import conditions
from common.catalogue.planning import Wanted, plan_batch
from common.catalogue.policy import PolicyError, Rule, rank_rules
from common.catalogue.sql import (
    bind_processor,
    check_fits,
    chunks,
    file_ids_sync,
    ignore_tail,
    insert_ignore_sync,
    insert_rows,
    json_processor,
    select_in,
    storage_ids_sync,
    upsert_tail,
    utcnow,
)
from common.logging import get_logger
from common.messages import MetaValue, ReplicaRequest

_log = get_logger(__name__)

f, r, ep, lk, ru, d = s.files, s.replicas, s.storage_endpoints, s.locks, s.rules, s.datasets
rd = s.rule_declarations
_RULE_SYNC_LOCK = 0x5350_4F4F_52  # arbitrary constant: "SPOOR" (rules)

# The per-file work of the replicator and of rule evaluation (``plan_copies``, ``replica_tasks``,
# ``record_copies``) goes to the driver as SQL text, as ingest's does (see ``sql.insert_rows``):
# SQLAlchemy Core's compilation and per-row parameter processing were ~15% of the replicator's CPU
# with small files. Values go through the columns' own bind processors (timestamps once a batch),
# the code's constants are SQL literals, and the rows are those the Core statements wrote (tests
# compare). The lookups probe unique keys (or the locks' (file_id, storage_id) index) by file.
_RULE_IDS_SQL = "SELECT id FROM rules WHERE id IN ({})"
_REPLICA_STATES_SQL = (
    "SELECT replicas.file_id, storage_endpoints.name, replicas.state FROM replicas"
    " JOIN storage_endpoints ON storage_endpoints.id = replicas.storage_id WHERE replicas.file_id IN ({})"
)
_LOCKED_SQL = (
    "SELECT locks.file_id, storage_endpoints.name FROM locks"
    " JOIN storage_endpoints ON storage_endpoints.id = locks.storage_id WHERE locks.file_id IN ({})"
)
_TASK_FILES_SQL = "SELECT name, id, size, adler32, sha256 FROM files WHERE name IN ({})"
_TASK_REPLICAS_SQL = (
    "SELECT replicas.file_id, replicas.storage_id, replicas.state, replicas.pfn, replicas.priority,"
    " storage_endpoints.name, storage_endpoints.kind FROM replicas"
    " JOIN storage_endpoints ON storage_endpoints.id = replicas.storage_id"
    " WHERE replicas.file_id IN ({}) ORDER BY storage_endpoints.name"
)
# Whether a lock is live is decided in Python, against the bound form of the time (the driver's
# values compare as the database compares them: text on SQLite, timestamptz on PostgreSQL).
_TASK_LOCKS_SQL = "SELECT file_id, storage_id, expires FROM locks WHERE file_id IN ({})"
# PostgreSQL: a placement's files, locked against the reaper's claim and finish (see ``plan_copies``).
_KEY_SHARE_FILES_SQL = "SELECT id FROM files WHERE id IN ({}) ORDER BY id FOR KEY SHARE"

# Columns bound per row; with the batch's timestamps (bound once) and the constants (SQL literals)
# they name every column but the autoincrement id (a test holds them to the schema).
LOCK_COLUMNS = ("rule_id", "file_id", "storage_id", "expires")
QUEUED_COLUMNS = ("file_id", "storage_id", "pfn", "priority")
QUEUED_CONSTANTS: Mapping[str, Any] = {
    "state": "queued", "cartridge": None, "fseq": None, "member_offset": None, "tombstone": None,
    "holder": None,
}  # fmt: skip
COPY_COLUMNS = ("file_id", "storage_id", "pfn")
COPY_CONSTANTS: Mapping[str, Any] = {
    "state": "available", "cartridge": None, "fseq": None, "member_offset": None, "priority": 3,
    "holder": None,
}  # fmt: skip
# A copy that had a row (queued, waiting, bad...) keeps its created, priority and any tombstone.
COPY_UPDATE = ("state", "pfn", "updated")
COPY_REQUEST_COLUMNS = ("id", "name", "attempts")
COPY_REQUEST_CONSTANTS: Mapping[str, Any] = {
    "kind": "replica", "path": None, "dataset": None, "state": "done", "reason": None, "error": None,
}  # fmt: skip
COPY_REQUEST_UPDATE = ("state", "attempts", "updated")
COPY_EVENT_COLUMNS = ("name", "attempt", "storage", "detail")
COPY_EVENT_CONSTANTS: Mapping[str, Any] = {"daemon": "replicator", "type": "replica.created", "outcome": "ok"}


@dataclass(frozen=True, slots=True)
class Source:
    storage: str
    pfn: str


@dataclass(frozen=True, slots=True)
class ReplicaTask:
    """What the replicator needs to know about one (file, destination)."""

    name: str
    size: int
    adler32: str
    state: str | None  # of the destination replica; None: no row
    pfn: str | None
    needed: bool  # a live lock holds this copy
    priority: int
    sources: tuple[Source, ...]  # available copies on disk endpoints (destination excluded)
    # The recorded sha256, checked on copies whose bytes this node reads; None before 0016.
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class RuleView:
    rule: Rule
    created: datetime
    replicas: dict[str, int]  # state -> copies this rule holds locks on
    declared_by: list[str]  # a config rule: the nodes whose files declare it


@dataclass(frozen=True, slots=True)
class EndpointUsage:
    name: str
    replicas: dict[str, int]
    bytes_available: int


@dataclass(frozen=True, slots=True)
class Reapable:
    replica_id: int
    name: str
    storage: str
    pfn: str


# --- rules ---------------------------------------------------------------------------------------
def _rule_row(rule: Rule, now: datetime, state: str) -> dict[str, Any]:
    row = {
        "id": rule.id, "origin": rule.origin, "datasets": rule.datasets,
        "meta_filters": list(rule.metadata), "endpoints": rule.endpoints, "copies": rule.copies,
        "lifetime": rule.lifetime, "priority": rule.priority, "state": state,
        "created": now, "updated": now,
    }  # fmt: skip
    check_fits(ru, row)
    return row


def _rule_of(row: Any) -> Rule:
    return Rule(
        id=row.id, endpoints=row.endpoints, copies=row.copies, datasets=row.datasets,
        metadata=tuple(row.meta_filters or ()), lifetime=row.lifetime, priority=row.priority,
        origin=row.origin, state=row.state,
    )  # fmt: skip


def _same_definition(a: Rule, b: Rule) -> bool:
    keys = ("endpoints", "copies", "datasets", "metadata", "lifetime", "priority")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _usable(rows: Iterable[Any]) -> Iterable[tuple[Any, Rule]]:
    """``(row, rule)`` for each stored rule that still compiles.

    A rule stored before dataset patterns ran on RE2 may use a backreference or lookaround: it is
    skipped (logged as ``rule_unusable``, once per load) rather than failing every daemon that
    loads the rules; ``spool rule remove <id>`` still removes it.
    """
    for row in rows:
        try:
            yield row, _rule_of(row)
        except PolicyError as exc:
            _log.error("rule_unusable", rule_id=row.id, reason=str(exc))


def load_rules(conn: Connection) -> list[Rule]:
    return [rule for _, rule in _usable(conn.execute(select(ru).order_by(ru.c.id)))]


@dataclass(frozen=True, slots=True)
class RuleSync:
    changed: list[str]  # stored anew (state ``new``: existing files are evaluated again) or removed
    refused: list[str]  # ids this file declares that a ``spool rule add`` rule holds: left as they are


def sync_config_rules(conn: Connection, rules: Sequence[Rule], node: str) -> RuleSync:
    """Make the catalogue's config rules agree with ``node``'s configuration file.

    Several nodes may share a catalogue, each with its own file (issue 19), so a config rule
    records which nodes' files declare it (``rule_declarations``), and one node's file changes only
    what it declares:

    - a rule it declares is stored if missing, and stored anew (as ``new``, so existing files are
      evaluated against it) when its definition differs — the file started last carries the
      operator's latest intent, and a warning names the other nodes declaring it;
    - a rule it no longer declares loses this node's declaration, and is removed (its copies
      released, as ``spool rule remove`` does) only when no node's file declares it any more;
    - a rule added with ``spool rule add`` is never replaced or removed by a file: a clash of ids
      is ``refused`` (the daemon logs it) and the rule stays as the operator added it.

    Concurrent syncs (nodes starting together) take turns: the SQLite write lock, and on
    PostgreSQL a transaction-scoped advisory lock.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_RULE_SYNC_LOCK)))
    now = utcnow()
    existing = {rule.id: rule for rule in load_rules(conn)}
    declarers: dict[str, set[str]] = {}
    for rule_id, who in conn.execute(select(rd.c.rule_id, rd.c.node)):
        declarers.setdefault(rule_id, set()).add(who)
    changed: list[str] = []
    refused: list[str] = []
    for rule in rules:
        old = existing.get(rule.id)
        if old is not None and old.origin != "config":
            refused.append(rule.id)
            continue
        had = declarers.get(rule.id, set())
        if old is not None and _same_definition(old, rule):
            if node not in had:
                conn.execute(rd.insert().values(rule_id=rule.id, node=node, declared=now))
            continue
        if old is not None:
            if had - {node}:
                others = sorted(had - {node})
                _log.warning("config_rule_redefined", rule_id=rule.id, node=node, also_declared_by=others)
            remove_rule(conn, rule.id)  # its locks, and its declarations, which are put back below
        conn.execute(ru.insert().values(**_rule_row(rule, now, "new")))
        rows = [{"rule_id": rule.id, "node": n, "declared": now} for n in sorted(had | {node})]
        conn.execute(rd.insert(), rows)
        changed.append(rule.id)
    declared = {rule.id for rule in rules}
    for old in existing.values():
        if old.origin != "config" or old.id in declared:
            continue
        conn.execute(delete(rd).where(rd.c.rule_id == old.id, rd.c.node == node))
        if not declarers.get(old.id, set()) - {node}:
            remove_rule(conn, old.id)
            changed.append(old.id)
    return RuleSync(changed, refused)


def add_rule(conn: Connection, rule: Rule) -> None:
    if conn.scalar(select(ru.c.id).where(ru.c.id == rule.id)) is not None:
        raise KeyError(f"a rule with id {rule.id!r} already exists")
    conn.execute(ru.insert().values(**_rule_row(rule, utcnow(), "new")))


def remove_rule(conn: Connection, rule_id: str) -> int:
    """Delete a rule and its locks; returns how many copies it released. Copies still only
    queued / waiting / failed for nobody else are cancelled (their rows go)."""
    if conn.scalar(select(ru.c.id).where(ru.c.id == rule_id)) is None:
        raise KeyError(f"no rule with id {rule_id!r}")
    released = conn.execute(select(lk.c.file_id, lk.c.storage_id).where(lk.c.rule_id == rule_id)).all()
    conn.execute(delete(lk).where(lk.c.rule_id == rule_id))
    conn.execute(delete(rd).where(rd.c.rule_id == rule_id))
    conn.execute(delete(ru).where(ru.c.id == rule_id))
    for part in chunks(released):
        for fid, sid in part:
            _cancel_if_unwanted(conn, fid, sid)
    return len(released)


def _live_lock(file_id: Any, storage_id: Any, now: datetime) -> Any:
    return exists().where(
        lk.c.file_id == file_id,
        lk.c.storage_id == storage_id,
        or_(lk.c.expires.is_(None), lk.c.expires > now),
    )


def _cancel_if_unwanted(conn: Connection, file_id: int, storage_id: int) -> bool:
    res = conn.execute(
        delete(r).where(
            r.c.file_id == file_id,
            r.c.storage_id == storage_id,
            r.c.state.in_(("queued", "waiting", "failed")),
            ~_live_lock(file_id, storage_id, utcnow()),
        )
    )
    return bool(res.rowcount)


def rule_views(conn: Connection) -> list[RuleView]:
    counts: dict[str, dict[str, int]] = {}
    state = func.coalesce(r.c.state, literal_column("'missing'")).label("state")
    stmt = (
        select(lk.c.rule_id, state, func.count())
        .select_from(lk.outerjoin(r, and_(r.c.file_id == lk.c.file_id, r.c.storage_id == lk.c.storage_id)))
        .group_by(lk.c.rule_id, state)
    )
    for rule_id, state, n in conn.execute(stmt):
        counts.setdefault(rule_id, {})[state] = int(n)
    nodes: dict[str, list[str]] = {}
    for rule_id, node in conn.execute(select(rd.c.rule_id, rd.c.node).order_by(rd.c.node)):
        nodes.setdefault(rule_id, []).append(node)
    return [
        RuleView(rule, row.created, counts.get(row.id, {}), nodes.get(row.id, []))
        for row, rule in _usable(conn.execute(select(ru).order_by(ru.c.id)))
    ]


def new_rules(conn: Connection, created_before: datetime) -> list[Rule]:
    stmt = select(ru).where(ru.c.state == "new", ru.c.updated <= created_before).order_by(ru.c.id)
    return [rule for _, rule in _usable(conn.execute(stmt))]


def activate_rule(conn: Connection, rule_id: str) -> None:
    conn.execute(update(ru).where(ru.c.id == rule_id).values(state="active", updated=utcnow()))


class RuleFile(NamedTuple):
    """A file a rule selects (``files_for_rule``)."""

    id: int
    name: str
    dataset: str
    metadata: dict[str, MetaValue]
    dataset_id: int

    @property
    def cursor(self) -> tuple[int, int]:
        """Where the next page starts: pass it as ``after``."""
        return (self.dataset_id, self.id)


def files_for_rule(
    conn: Connection, rule: Rule, *, after: tuple[int, int] = (0, 0), limit: int, metadata: bool = True
) -> list[RuleFile]:
    """Up to ``limit`` files the rule selects, after ``after`` (the last file's ``cursor`` of the
    previous page): dataset by dataset, in file id order within each (no dataset pattern: all
    files, by id).

    The dataset pattern is a Python regular expression (SQLite has no REGEXP), so it is applied to
    the dataset names here (thousands, not millions) and the files are then fetched by dataset id.
    One dataset per statement, each an index range (``dataset_id = ? AND id > ?``): asked for
    several datasets at once and ordered by id, the database read every remaining file of them
    and sorted them for each page, so a rule over a dataset of n files cost n^2 / 2,000 reads.
    ``metadata=False``: every file's metadata is ``{}``, not read (decoding it was a twentieth of
    a rule's evaluation, and placing files needs it only for rules with metadata filters).
    """
    # A deleted dataset's files want no copy (``common.catalogue.datasets``): left out.
    live = d.c.state.not_in(GONE)
    names = {i: name for i, name in conn.execute(select(d.c.id, d.c.name).where(live))}
    meta = f.c.meta if metadata else literal_column("NULL")
    base = select(f.c.id, f.c.name, f.c.dataset_id, meta).where(*conditions(list(rule.filters), f.c.id))
    after_ds, after_id = after
    if rule.datasets is None:
        gone = select(d.c.id).where(~live)
        stmt = base.where(f.c.id > after_id, f.c.dataset_id.not_in(gone)).order_by(f.c.id).limit(limit)
        return [RuleFile(i, n, names[ds], dict(m or {}), ds) for i, n, ds, m in conn.execute(stmt)]
    out: list[RuleFile] = []
    for ds in sorted(i for i, name in names.items() if i >= after_ds and rule.dataset_matches(name)):
        start = after_id if ds == after_ds else 0
        stmt = base.where(f.c.dataset_id == ds, f.c.id > start).order_by(f.c.id).limit(limit - len(out))
        out += [RuleFile(i, n, names[ds], dict(m or {}), ds) for i, n, _, m in conn.execute(stmt)]
        if len(out) >= limit:
            break
    return out


def placement_item(conn: Connection, name: str) -> tuple[str, str, dict[str, MetaValue]] | None:
    """(name, dataset, metadata) of one file, as ``plan_copies`` takes it; None when the file is
    unknown or its dataset deleted (such a file wants no copy)."""
    row = conn.execute(
        select(f.c.name, d.c.name, f.c.meta)
        .join(d, d.c.id == f.c.dataset_id)
        .where(f.c.name == name, d.c.state.not_in(GONE))
    ).first()
    return None if row is None else (row[0], row[1], dict(row[2] or {}))


# --- planning copies -----------------------------------------------------------------------------
def plan_copies(
    conn: Connection,
    items: Sequence[tuple[str, str, Mapping[str, MetaValue]]],
    rules: Sequence[Rule],
    endpoints: Mapping[str, Mapping[str, str]],
) -> list[list[Wanted]]:
    """For each (name, dataset, metadata): record the locks its rules need and return the copies
    still to be made. Idempotent: run again (a redelivered event), it adds nothing and returns
    the copies that are still missing, so they can be requested again."""
    # A rule removed since the caller loaded it (ingest caches rules for a few seconds) no longer
    # places anything: its locks would outlive it.
    stored = {rid for (rid,) in select_in(conn, _RULE_IDS_SQL, list(dict.fromkeys(x.id for x in rules)))}
    rules = [x for x in rules if x.id in stored]
    if not rules:
        return [[] for _ in items]
    now = utcnow()
    ids = file_ids_sync(conn, [name for name, _, _ in items])
    if conn.dialect.name == "postgresql" and ids:
        # Race (PostgreSQL, READ COMMITTED): the copies read below, unlocked, and the locks written
        # after them could straddle the reaper's claim (``begin_delete``) or its end
        # (``finish_delete``): a copy read ``available`` or ``deleting`` was then claimed or
        # deleted before our lock was visible, and the rule held a copy gone for good, with
        # nothing requested. Both lock the file row ``FOR UPDATE``, which conflicts with ``FOR KEY
        # SHARE``: taken here, before the read, they wait for this placement's commit and then
        # see its locks; a claim or end already under way makes this wait, then read its outcome.
        # (Inserting a lock takes the same share lock on its file: placements do not wait for
        # one another.)
        for _ in select_in(conn, _KEY_SHARE_FILES_SQL, sorted(ids.values())):
            pass
    expiry = bind_processor(lk.c.expires, conn.dialect)
    plan = plan_batch(
        items,
        rank_rules(rules, endpoints),  # the same for every file
        file_ids=ids,
        states=_replica_states(conn, list(ids.values())),
        locked=_locked_storages(conn, list(ids.values())),
        storage_ids=storage_ids_sync(conn, set(endpoints)),
        kinds={name: attrs.get("kind", "disk") for name, attrs in endpoints.items()},
        expires=lambda lifetime: expiry(now + timedelta(seconds=lifetime)),
    )
    dialect = conn.dialect
    stamp = bind_processor(lk.c.created, dialect)(now)  # every timestamp column is a UTCDateTime
    lock_tail = ignore_tail(dialect, ("rule_id", "file_id", "storage_id"))
    insert_rows(conn, lk, LOCK_COLUMNS, plan.locks, shared={"created": stamp}, tail=lock_tail)
    insert_rows(
        conn,
        r,
        QUEUED_COLUMNS,
        plan.create,
        shared={"created": stamp, "updated": stamp},
        constants=QUEUED_CONSTANTS,
        tail=ignore_tail(dialect, ("file_id", "storage_id")),
    )
    for fid, sid, prio in plan.requeue:  # rare (bad or failed copies): Core statements
        conn.execute(
            update(r)
            .where(r.c.file_id == fid, r.c.storage_id == sid)
            .values(state="queued", priority=prio, updated=now)
        )
    return plan.wanted


def _replica_states(conn: Connection, file_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for fid, storage, state in select_in(conn, _REPLICA_STATES_SQL, file_ids):
        out.setdefault(fid, {})[storage] = state
    return out


def _locked_storages(conn: Connection, file_ids: Sequence[int]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for fid, storage in select_in(conn, _LOCKED_SQL, file_ids):
        out.setdefault(fid, set()).add(storage)
    return out


# --- the replicator's view of one copy ---------------------------------------------------------
def replica_task(conn: Connection, name: str, storage: str) -> ReplicaTask | None:
    """What the replicator needs to know about one copy (``replica_tasks`` for one pair)."""
    return replica_tasks(conn, [(name, storage)])[0]


def replica_tasks(conn: Connection, items: Sequence[tuple[str, str]]) -> list[ReplicaTask | None]:
    """What the replicator needs to know about each (name, destination) pair, in one transaction
    and a handful of statements: its handlers ask together (a batcher), not one round trip each."""
    now = bind_processor(lk.c.expires, conn.dialect)(utcnow())  # as the driver reads ``expires``
    files = {name: (fid, size, adler, sha) for name, fid, size, adler, sha in select_in(
        conn, _TASK_FILES_SQL, list(dict.fromkeys(n for n, _ in items))
    )}  # fmt: skip
    sids = storage_ids_sync(conn, {st for _, st in items})
    fids = sorted({fid for fid, _, _, _ in files.values()})
    dest: dict[tuple[int, int], tuple[str, str, int]] = {}
    sources: dict[int, list[tuple[int, str, str]]] = {}
    for fid, sid, state, pfn, prio, ep_name, kind in select_in(conn, _TASK_REPLICAS_SQL, fids):
        dest[(fid, sid)] = (state, pfn, prio)
        if state == "available" and kind == "disk":
            sources.setdefault(fid, []).append((sid, ep_name, pfn))
    live = {
        (fid, sid)
        for fid, sid, expires in select_in(conn, _TASK_LOCKS_SQL, fids)
        if expires is None or expires > now
    }
    out: list[ReplicaTask | None] = []
    for name, storage in items:
        found = files.get(name)
        if found is None:
            out.append(None)
            continue
        fid, size, adler, sha = found
        sid = sids[storage]
        row = dest.get((fid, sid))
        out.append(
            ReplicaTask(
                name=name,
                size=size,
                adler32=adler,
                state=row[0] if row else None,
                pfn=row[1] if row else None,
                needed=(fid, sid) in live,
                priority=row[2] if row else 3,
                sources=tuple(Source(n, pfn) for s_id, n, pfn in sources.get(fid, []) if s_id != sid),
                sha256=sha,
            )
        )
    return out


def set_replica_state(
    conn: Connection, name: str, storage: str, state: str, *, only_from: Iterable[str] | None = None
) -> bool:
    """Move the replica of ``name`` on ``storage`` to ``state`` (only from the given states)."""
    fid = conn.scalar(select(f.c.id).where(f.c.name == name))
    if fid is None:
        return False
    sid = storage_ids_sync(conn, {storage})[storage]
    stmt = update(r).where(r.c.file_id == fid, r.c.storage_id == sid)
    if only_from is not None:
        stmt = stmt.where(r.c.state.in_(list(only_from)))
    return bool(conn.execute(stmt.values(state=state, updated=utcnow())).rowcount)


def cancel_copy(conn: Connection, name: str, storage: str) -> bool:
    fid = conn.scalar(select(f.c.id).where(f.c.name == name))
    if fid is None:
        return False
    sid = storage_ids_sync(conn, {storage})[storage]
    return _cancel_if_unwanted(conn, fid, sid)


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """A verified copy the replicator placed (one row of a batched registration)."""

    request_id: str
    name: str
    storage: str
    pfn: str
    attempt: int
    source: str
    correlation_id: str | None = None  # the file's (its file.ready's), kept on its history row


def record_copies(conn: Connection, records: Sequence[CopyRecord]) -> None:
    """Mark the copies available (tombstoned: reapable once no lock holds them), their requests
    done, and add one history row each."""
    if not records:
        return
    now = utcnow()
    ids = file_ids_sync(conn, [c.name for c in records])
    sids = storage_ids_sync(conn, {c.storage for c in records})
    # In (name, storage) order: concurrent batches lock the rows in the same order (PostgreSQL).
    wanted = {
        (ids[c.name], sids[c.storage]): c
        for c in sorted(records, key=lambda c: (c.name, c.storage))
        if c.name in ids  # a file removed meanwhile: nothing to record
    }
    dialect = conn.dialect
    stamp = bind_processor(r.c.updated, dialect)(now)  # every timestamp column is a UTCDateTime
    # One statement for both cases: a copy without a row gets one (tombstoned now); a copy that
    # had one (queued, waiting, bad...) becomes available there, keeping any earlier tombstone.
    insert_rows(
        conn,
        r,
        COPY_COLUMNS,
        [(fid, sid, c.pfn) for (fid, sid), c in wanted.items()],
        shared={"created": stamp, "updated": stamp, "tombstone": stamp},
        constants=COPY_CONSTANTS,
        tail=upsert_tail(dialect, ("file_id", "storage_id"), COPY_UPDATE, table=r, fill=("tombstone",)),
    )
    # One row per request id, as the upserts one after another left it: the first record's name,
    # the last one's attempt (PostgreSQL refuses to update a row twice in one statement).
    requests: dict[str, tuple[str, str, int]] = {}
    for c in records:
        first = requests.get(c.request_id)
        requests[c.request_id] = (c.request_id, c.name if first is None else first[1], c.attempt)
    insert_rows(
        conn,
        s.requests,
        COPY_REQUEST_COLUMNS,
        list(requests.values()),
        shared={"created": stamp, "updated": stamp},
        constants=COPY_REQUEST_CONSTANTS,
        tail=upsert_tail(dialect, ("id",), COPY_REQUEST_UPDATE),
    )
    detail = json_processor(s.events.c.detail, dialect)
    insert_rows(
        conn,
        s.events,
        COPY_EVENT_COLUMNS,
        [
            (
                c.name,
                c.attempt,
                c.storage,
                detail(
                    {"request_id": c.request_id, "source": c.source, "pfn": c.pfn}
                    | ({"correlation_id": c.correlation_id} if c.correlation_id else {})
                ),
            )
            for c in records
        ],
        shared={"time": stamp},
        constants=COPY_EVENT_CONSTANTS,
    )


# --- parked copies and endpoint health ---------------------------------------------------------
def park(conn: Connection, name: str, storage: str, priority: int) -> bool:
    """Remember a copy whose endpoint is not writable (the message is acked: the catalogue holds
    the wait, however long, and the replicator re-sends it when the endpoint is writable).

    False, and nothing parked, when the endpoint is writable by now: the caller decided from its
    view as last read, and an instance that resumed the endpoint meanwhile has already re-sent what
    was parked, so a copy parked after that would wait for the next pause's end. The endpoint's row
    is read ``FOR SHARE`` on PostgreSQL: a resume (``transfers.resume``, ``FOR UPDATE``) or an
    operator's change waits for this park to commit, and the re-send after it sees the copy."""
    health = select(ep.c.state, ep.c.health).where(ep.c.name == storage)
    if conn.dialect.name == "postgresql":
        health = health.with_for_update(read=True)
    row = conn.execute(health).first()
    if row is not None and row.state == "online" and row.health == "ok":
        return False
    fid = conn.scalar(select(f.c.id).where(f.c.name == name))
    if fid is None:
        return True
    sid = storage_ids_sync(conn, {storage})[storage]
    now = utcnow()
    res = conn.execute(
        update(r)
        .where(r.c.file_id == fid, r.c.storage_id == sid, r.c.state != "available")
        .values(state="waiting", priority=priority, updated=now)
    )
    if not res.rowcount:
        insert_ignore_sync(
            conn, r,
            [{"file_id": fid, "storage_id": sid, "pfn": name, "state": "waiting", "cartridge": None,
              "fseq": None, "member_offset": None, "created": now, "updated": now, "tombstone": None,
              "priority": priority}],
            ["file_id", "storage_id"],
        )  # fmt: skip
    return True


def waiting(
    conn: Connection,
    storage: str,
    limit: int,
    *,
    parked_before: datetime,
    after: tuple[int, int] | None = None,
) -> list[tuple[int, int, str]]:
    """(priority, replica id, name) of copies parked on ``storage`` before ``parked_before``, most
    urgent first; page on with ``after`` = the last row's (priority, id). Copies parked again
    while being re-sent have a later time, so one resume sends each parked copy once."""
    stmt = (
        select(r.c.priority, r.c.id, f.c.name)
        .join(f, f.c.id == r.c.file_id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name == storage, r.c.state == "waiting", r.c.updated <= parked_before)
        .order_by(r.c.priority.desc(), r.c.id)
        .limit(limit)
    )
    if after is not None:
        prio, rid = after
        stmt = stmt.where(or_(r.c.priority < prio, and_(r.c.priority == prio, r.c.id > rid)))
    return [(prio, rid, name) for prio, rid, name in conn.execute(stmt)]


def waiting_count(conn: Connection, storage: str) -> int:
    stmt = (
        select(func.count())
        .select_from(r.join(ep, ep.c.id == r.c.storage_id))
        .where(ep.c.name == storage, r.c.state == "waiting")
    )
    return int(conn.scalar(stmt) or 0)


def set_health(conn: Connection, storage: str, health: str, reason: str | None) -> None:
    conn.execute(
        update(ep)
        .where(ep.c.name == storage)
        .values(health=health, health_reason=reason, health_since=utcnow())
    )


def endpoint_usage(conn: Connection) -> list[EndpointUsage]:
    counts: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    stmt = (
        select(ep.c.name, r.c.state, func.count(), func.coalesce(func.sum(f.c.size), 0))
        .join(r, r.c.storage_id == ep.c.id)
        .join(f, f.c.id == r.c.file_id)
        .group_by(ep.c.name, r.c.state)
    )
    for name, state, n, size in conn.execute(stmt):
        counts.setdefault(name, {})[state] = int(n)
        if state == "available":
            sizes[name] = int(size)
    names = conn.scalars(select(ep.c.name).order_by(ep.c.id)).all()
    return [EndpointUsage(n, counts.get(n, {}), sizes.get(n, 0)) for n in names]


# --- reaping -----------------------------------------------------------------------------------
def expire_locks(conn: Connection) -> int:
    return int(conn.execute(delete(lk).where(lk.c.expires.is_not(None), lk.c.expires <= utcnow())).rowcount)


def reapable(conn: Connection, limit: int) -> list[Reapable]:
    """Tombstoned copies no live lock holds, whose file keeps another available copy; plus copies
    a killed reaper left half-deleted (``deleting``)."""
    now = utcnow()
    other = r.alias("other")
    other_copy = exists().where(
        other.c.file_id == r.c.file_id, other.c.id != r.c.id, other.c.state == "available"
    )
    stmt = (
        select(r.c.id, f.c.name, ep.c.name, r.c.pfn)
        .join(f, f.c.id == r.c.file_id)
        .join(ep, ep.c.id == r.c.storage_id)
        .join(d, d.c.id == f.c.dataset_id)
        .where(
            # A deleted dataset's copies are the dataset deletion's (they stay, as tombstones).
            d.c.state.not_in(GONE),
            or_(
                r.c.state == "deleting",
                and_(
                    r.c.state == "available",
                    r.c.tombstone.is_not(None),
                    r.c.tombstone <= now,
                    ~_live_lock(r.c.file_id, r.c.storage_id, now),
                    other_copy,
                ),
            ),
            ep.c.kind == "disk",
        )
        .order_by(r.c.id)
        .limit(limit)
    )
    return [Reapable(*row) for row in conn.execute(stmt)]


def copies_on(
    conn: Connection, storage: str, *, dataset: str | None = None, names: Sequence[str] = ()
) -> list[Reapable]:
    """Available copies on ``storage`` of a dataset's files, or of the named files (``spool rse
    evict``); the caller claims each with ``begin_evict``, which refuses the last copy and a
    copy a rule holds."""
    stmt = (
        select(r.c.id, f.c.name, ep.c.name, r.c.pfn)
        .join(f, f.c.id == r.c.file_id)
        .join(ep, ep.c.id == r.c.storage_id)
        .where(ep.c.name == storage, r.c.state == "available")
        .order_by(f.c.name)
    )
    if dataset is not None:
        stmt = stmt.join(d, d.c.id == f.c.dataset_id).where(d.c.name == dataset)
    if names:
        out: list[Reapable] = []
        for part in chunks(list(names)):
            out += [Reapable(*row) for row in conn.execute(stmt.where(f.c.name.in_(part)))]
        return out
    return [Reapable(*row) for row in conn.execute(stmt)]


def begin_delete(conn: Connection, replica_id: int) -> bool:
    """The reaper's claim of one copy ``reapable`` listed: re-checked here, in the claim's own
    transaction, that the copy is still reapable (its tombstone still passed, no live lock, not
    the last available copy); the listing is older than the claim by up to a whole pass.

    Race: a recall that delivered to this copy after the listing pinned it (tombstone moved into
    the future) and announced ``file.recalled``; the claim did not look at the tombstone and the
    copy was deleted under the recall. ``recall.deliver`` locks the copy's row; the claim below
    waits for it (PostgreSQL) and compares the tombstone in the update that claims the copy."""
    return _claim(conn, replica_id, expired_only=True)


def begin_evict(conn: Connection, replica_id: int) -> bool:
    """An operator's claim of one copy (``spool rse evict``): as the reaper's, but whatever the
    copy's tombstone: a copy ingest made (never tombstoned) or one a recall pinned is the
    operator's to free. Still never the last available copy, never one a live lock holds."""
    return _claim(conn, replica_id, expired_only=False)


def _claim(conn: Connection, replica_id: int, *, expired_only: bool) -> bool:
    """Claim one copy for deletion (state ``deleting``), re-checking under the write lock
    (PostgreSQL: row locks on the file and its copies) that it is still unneeded and not the
    last one. True too for a copy already ``deleting`` (a killed claimant's: finish it)."""
    row = conn.execute(select(r.c.file_id, r.c.storage_id, r.c.state).where(r.c.id == replica_id)).first()
    if row is None:
        return False
    if row.state == "deleting":
        return True
    if conn.dialect.name == "postgresql":
        # Race (PostgreSQL, READ COMMITTED): locking the file's copies covers the count of other
        # copies below, not the live-lock check: a rule placing this copy (``plan_copies``)
        # *inserts* its lock, an uncommitted insert is invisible here, so the claim went ahead
        # and the rule was left holding a deleted copy, with no request to make it again. The
        # file row is locked first: FOR UPDATE conflicts with the FOR KEY SHARE that a placement
        # takes on its files before reading their copies (and that inserting a lock row holds),
        # so a placement under way makes us wait, then see its lock. Locking the copies also
        # waits for a delivery pinning this one (``recall.deliver`` locks its row).
        _lock_file(conn, row.file_id)
        conn.execute(select(r.c.id).where(r.c.file_id == row.file_id).with_for_update())
    now = utcnow()
    if conn.scalar(select(_live_lock(row.file_id, row.storage_id, now))):
        return False
    others = conn.scalar(
        select(func.count()).where(r.c.file_id == row.file_id, r.c.id != replica_id, r.c.state == "available")
    )
    if not others:
        return False
    # Compared in the update: the row as it is now (locked on PostgreSQL; SQLite's writer lock).
    claim = update(r).where(r.c.id == replica_id, r.c.state == "available")
    if expired_only:
        claim = claim.where(r.c.tombstone.is_not(None), r.c.tombstone <= now)
    return bool(conn.execute(claim.values(state="deleting", updated=now)).rowcount)


def _lock_file(conn: Connection, file_id: int) -> None:
    conn.execute(select(f.c.id).where(f.c.id == file_id).with_for_update())


def finish_delete(
    conn: Connection, item: Reapable, *, by: str = "replicator", why: str = "no rule needs it"
) -> bool:
    """The copy's bytes are gone: drop its row and add a history row. Returns True when the copy
    was asked for again instead: a live lock holds it now.

    Race (SQLite too): a placement meeting the copy while it is ``deleting`` records its lock and
    asks for nothing (the copy counts as present, see ``planning.PRESENT``); the row then went and the rule
    held a copy missing for good. Here, with the bytes gone, such a copy goes back to ``queued``
    (no tombstone, as a copy a placement asks for) and a ``replica.request`` for it goes to the
    outbox in this transaction: any relay publishes it, a kill loses nothing. PostgreSQL: the file
    row is locked first, as in the claim, so a placement under way is waited for and its lock seen.
    """
    row = conn.execute(
        select(r.c.file_id, r.c.storage_id, r.c.priority).where(r.c.id == item.replica_id)
    ).first()
    lock = None
    if row is not None:
        if conn.dialect.name == "postgresql":
            _lock_file(conn, row.file_id)
        now = utcnow()
        lock = conn.scalar(
            select(lk.c.rule_id)
            .where(
                lk.c.file_id == row.file_id,
                lk.c.storage_id == row.storage_id,
                or_(lk.c.expires.is_(None), lk.c.expires > now),
            )
            .order_by(lk.c.rule_id)
            .limit(1)
        )
    if lock is None:
        conn.execute(delete(r).where(r.c.id == item.replica_id))
    else:
        assert row is not None
        conn.execute(
            update(r)
            .where(r.c.id == item.replica_id)
            .values(state="queued", tombstone=None, cartridge=None, fseq=None, updated=utcnow())
        )
        again = ReplicaRequest(name=item.name, destination=item.storage, rule_id=lock, priority=row.priority)
        outbox.add(conn, [again])
    detail: dict[str, Any] = {"pfn": item.pfn, "why": why}
    if lock is not None:
        detail["requested_again_for"] = lock
    conn.execute(
        s.events.insert().values(
            name=item.name,
            time=utcnow(),
            daemon=by,
            type="replica.deleted",
            outcome="ok",
            attempt=1,
            storage=item.storage,
            detail=detail,
        )
    )
    return lock is not None
